#!/usr/bin/env bash
# Key services side by side: the local key store, a KMIP server (PyKMIP, TLS with client
# certificates) and a PKCS#11 token (SoftHSM2), on the same machine in the same run.
#
#   bash contrib/bench/kms.sh            (root: it mounts FUSE)
#
# For each service it reports:
#   open       first opens of a resource through the mount (open+close of a file nobody
#              else holds, so every open unwraps its data key): mean microseconds per open,
#              and the requests the service served per open (PyKMIP's own log; for PKCS#11
#              and local, encimg's count of calls into the service)
#   rewrap     `encimg rekey RES --key K` (rewrap) of a 64 MiB image and of a 64 GiB disk:
#              mean milliseconds per command, process start and service connection included
# Environment: KMS_OPENS (default 300), KMS_REWRAPS (default 10).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OPENS=${KMS_OPENS:-300}
REWRAPS=${KMS_REWRAPS:-10}
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
E="${CARGO_TARGET_DIR:-$ROOT/target}/release/encimg"
W=$(mktemp -d /var/tmp/encimg-kms-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  for m in "$W"/mnt-*; do [ -d "$m" ] && { "$E" umount "$m" >/dev/null 2>&1 || fusermount3 -u -z "$m" 2>/dev/null || true; }; done
  bash "$ROOT/contrib/kms/pykmip-server.sh" --stop "$W/kmip"
  rm -rf "$W"
}
trap cleanup EXIT
export ENCIMG_STORE=$W/store
"$E" init >/dev/null
bash "$ROOT/contrib/kms/pykmip-server.sh" --daemon "$W/kmip" "$PORT" >/dev/null
bash "$ROOT/contrib/kms/softhsm-token.sh" "$W/hsm" >/dev/null
export SOFTHSM2_CONF=$W/hsm/softhsm2.conf
"$E" region add kmip --kms "$(cat "$W/kmip/uri")" >/dev/null
"$E" region add pkcs11 --kms "$(cat "$W/hsm/uri")" >/dev/null
truncate -s 64M "$W/img.raw"
mkfs.ext4 -q "$W/img.raw"

kmip_requests() { cat "$W"/kmip/server.log* | grep -c "Processing operation" || true; }

printf '%-8s  %14s  %16s  %18s  %18s\n' service "open (us)" "requests/open" "rewrap 64M (ms)" "rewrap 64G (ms)"
for region in local kmip pkcs11; do
  R=(--region "$region")
  "$E" "${R[@]}" key create --alias k1 >/dev/null
  "$E" "${R[@]}" key create --alias k2 >/dev/null
  "$E" "${R[@]}" import "$W/img.raw" images/i --key alias/k1 >/dev/null
  "$E" "${R[@]}" create disks/big --size 64G --key alias/k1 >/dev/null
  mnt=$W/mnt-$region
  mkdir -p "$mnt"
  "$E" "${R[@]}" mount "$mnt" >/dev/null
  before=$(kmip_requests)
  us=$(python3 - "$mnt/images/i" "$OPENS" <<'PY'
import os, sys, time
p, n = sys.argv[1], int(sys.argv[2])
os.close(os.open(p, os.O_RDONLY))   # warm the dentry
t = time.perf_counter()
for _ in range(n):
    os.close(os.open(p, os.O_RDONLY))
    time.sleep(0.002)               # let FUSE's asynchronous release close the volume
print(round(((time.perf_counter() - t) / n - 0.002) * 1e6))
PY
)
  sleep 1; after=$(kmip_requests)
  "$E" umount "$mnt" >/dev/null
  if [ "$region" = kmip ]; then
    rq=$(python3 -c "print(round(($after - $before) / ($OPENS + 1), 2))")
  else
    rq="-"
  fi
  rewrap() {
    local res=$1 t0 t1
    t0=$(date +%s%N)
    for _ in $(seq "$REWRAPS"); do
      "$E" "${R[@]}" rekey "$res" --key alias/k2 >/dev/null
      "$E" "${R[@]}" rekey "$res" --key alias/k1 >/dev/null
    done
    t1=$(date +%s%N)
    python3 -c "print(round(($t1 - $t0) / 1e6 / (2 * $REWRAPS), 1))"
  }
  printf '%-8s  %14s  %16s  %18s  %18s\n' "$region" "$us" "$rq" "$(rewrap images/i)" "$(rewrap disks/big)"
done
echo "($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
