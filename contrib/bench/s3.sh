#!/usr/bin/env bash
# An object-storage region against its baselines, on one s3s-fs server in the same run:
#   seqread    a cold sequential read of an encrypted image through `encimg mount`, against a
#              plain download of the same objects (curl, SigV4, 8 GETs in parallel)
#   randread   4 KiB random reads (fio, psync, O_DIRECT, 15 s) through `encimg mount`, against
#              s3backer (Debian, --encrypt, 4 MiB blocks) over the same server, both cold
#   first byte a cold `head -c 1` through a fresh mount (median of three)
#
#   sudo bash contrib/bench/s3.sh        S3_SIZE (default 256M)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZE=${S3_SIZE:-256M}
S3S=${ENCIMG_S3S_FS:-/var/tmp/encimg-tools/bin/s3s-fs}
[ -x "$S3S" ] || { echo "s3.sh: needs s3s-fs (bash contrib/test.sh builds it)" >&2; exit 1; }
command -v s3backer >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3backer fio >/dev/null
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
E="${CARGO_TARGET_DIR:-$ROOT/target}/release/encimg"
W=$(mktemp -d /var/tmp/encimg-s3-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$W/data/enc" "$W/data/s3b" "$W/mnt" "$W/sb"
"$S3S" --host 127.0.0.1 --port "$PORT" --access-key AK --secret-key SKBENCH --domain "localhost:$PORT" "$W/data" >/dev/null 2>&1 &
S3PID=$!
cleanup() {
  "$E" umount "$W/mnt" >/dev/null 2>&1 || true
  umount "$W/sb" 2>/dev/null || true
  pkill -f "s3backer.*$W" 2>/dev/null || true
  kill "$S3PID" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
sleep 1
export AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKBENCH AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT ENCIMG_STORE=$W/store
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$W/img.raw"
"$E" init >/dev/null
"$E" region add lib --location s3://enc/b >/dev/null
"$E" --region lib import "$W/img.raw" images/i --encrypt >/dev/null
bytes=$(stat -c %s "$W/img.raw")
now() { date +%s%N; }
mbps() { python3 -c "print(round($1 / (($3 - $2) / 1e9) / 1e6))"; }
fresh_mount() {
  "$E" umount "$W/mnt" >/dev/null 2>&1 || true
  rm -rf "$W/store/regions/lib/cache"
  sync; echo 3 > /proc/sys/vm/drop_caches
  "$E" --region lib mount "$W/mnt" --cache-size 16M >/dev/null
}

median() { sort -n | sed -n 2p; }   # of three runs

# Plain download of the image's block objects, the server's files cold as in every run.
keys=$(cd "$W/data/enc" && find b/images/i.obj -type f | grep -v '/ptr$')
obj_bytes=$(cd "$W/data/enc" && cat $keys | wc -c)
dl=$(for _ in 1 2 3; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now)
  printf '%s\n' $keys | xargs -P8 -I{} curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user AK:SKBENCH -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "http://127.0.0.1:$PORT/enc/{}"
  t1=$(now)
  mbps "$obj_bytes" "$t0" "$t1"
done | median)

first_ms=$(for _ in 1 2 3; do
  fresh_mount
  t0=$(now); head -c 1 "$W/mnt/images/i" >/dev/null; t1=$(now)
  python3 -c "print(round(($t1 - $t0) / 1e6, 1))"
done | median)
seq=$(for _ in 1 2 3; do
  fresh_mount
  t0=$(now); dd if="$W/mnt/images/i" of=/dev/null bs=1M status=none; t1=$(now)
  mbps "$bytes" "$t0" "$t1"
done | median)
fresh_mount
enc_iops=$(fio --name=r --filename="$W/mnt/images/i" --rw=randread --bs=4k --direct=1 \
  --ioengine=psync --runtime=15 --time_based --readonly --output-format=json | \
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
"$E" umount "$W/mnt" >/dev/null

# s3backer over the same server, encrypted, the same data; read cold after a remount.
sb() { s3backer --baseURL="http://localhost:$PORT/" --accessId=AK --accessKey=SKBENCH \
  --region=us-east-1 --blockSize=4M --size="$SIZE" --encrypt --password=bench "$@" s3b "$W/sb"; }
sb >/dev/null 2>&1
dd if="$W/img.raw" of="$W/sb/file" bs=4M conv=fsync status=none
umount "$W/sb"
# s3backer clears its mounted flag on the way out: wait for it to be gone.
for _ in $(seq 100); do pgrep -f "s3backer.*$W" >/dev/null || break; sleep 0.1; done
sync; echo 3 > /proc/sys/vm/drop_caches
sb --force >/dev/null
sb_iops=$(fio --name=r --filename="$W/sb/file" --rw=randread --bs=4k --direct=1 \
  --ioengine=psync --runtime=15 --time_based --readonly --output-format=json | \
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
umount "$W/sb"

printf '%-44s %10s\n' "" "result"
printf '%-44s %10s\n' "seqread through encimg mount (MB/s)" "$seq" \
  "plain download of the objects (MB/s)" "$dl" \
  "4 KiB randread, encimg (IOPS)" "$enc_iops" \
  "4 KiB randread, s3backer --encrypt (IOPS)" "$sb_iops" \
  "first byte of a cold image (ms)" "$first_ms"
python3 -c "print('seqread / download: %.2f (bar 0.8)' % ($seq / $dl)); print('randread / s3backer: %.2f (bar 2.0)' % ($enc_iops / max($sb_iops, 1)))"
echo "($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $SIZE)"
