#!/usr/bin/env bash
# Reading through a system store's account mount against a personal mount of the same
# image, on the same machine in the same run: access checks are per open, not per read,
# so the ratio should be ~1.0.
#
#   sudo bash contrib/bench/accounts.sh      (root: makes a user, mounts FUSE)
# Environment: ACCT_SIZE (default 512M), ACCT_RUNS (default 3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZE=${ACCT_SIZE:-512M}
RUNS=${ACCT_RUNS:-3}
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
W=$(mktemp -d /var/tmp/encimg-acct-bench.XXXXXX)
chmod 755 "$W"
install -m755 "${CARGO_TARGET_DIR:-$ROOT/target}/release/encimg" "$W/encimg"
E=$W/encimg
U=eibench$$
useradd -M -s /usr/sbin/nologin "$U"
SERVE=
cleanup() {
  [ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
  "$E" umount "$W/personal-mnt" >/dev/null 2>&1 || true
  for m in "$W"/run/*; do fusermount3 -u -z "$m" 2>/dev/null || true; done
  userdel "$U" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
truncate -s "$SIZE" "$W/img.raw"
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$W/img.raw"
chown "$U" "$W/img.raw"

# Personal store, mounted by root.
ENCIMG_STORE=$W/personal "$E" init >/dev/null
ENCIMG_STORE=$W/personal "$E" import "$W/img.raw" images/i --encrypt >/dev/null
mkdir -p "$W/personal-mnt"
ENCIMG_STORE=$W/personal "$E" mount "$W/personal-mnt" --cache-size 16M >/dev/null

# System store, the user's account, served by encimg serve.
"$E" --system --store "$W/sys" init >/dev/null
"$E" --store "$W/sys" serve --mountpoint "$W/run" --socket "$W/sock" --cache-size 16M 2>/dev/null &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/sock" ] && break; sleep 0.1; done
(cd "$W" && setpriv --reuid="$U" --regid="$U" --clear-groups env ENCIMG_SOCKET="$W/sock" "$E" --system import img.raw images/i --encrypt >/dev/null)

read_mbps() { # FILE USER
  local best=0 t0 t1 mbps
  for _ in $(seq "$RUNS"); do
    t0=$(date +%s%N)
    setpriv --reuid="$2" --regid="$2" --clear-groups dd if="$1" of=/dev/null bs=1M iflag=direct status=none
    t1=$(date +%s%N)
    mbps=$(( $(stat -c %s "$1") * 1000 / (t1 - t0) ))
    [ "$mbps" -gt "$best" ] && best=$mbps
  done
  echo "$best"
}
p=$(read_mbps "$W/personal-mnt/images/i" root)
s=$(read_mbps "$W/run/$U/images/i" "$U")
printf '%-28s %10s\n' "mount" "MB/s (best of $RUNS, O_DIRECT 1M)"
printf '%-28s %10s\n' "personal (root's mount)" "$p" "system (account's mount)" "$s"
python3 -c "print('ratio system/personal: %.2f' % ($s / $p))"
echo "($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
