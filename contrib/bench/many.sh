#!/usr/bin/env bash
# A store with many resources (QUALITY.md: 10,000; issue 18: 100,000), against the bars:
#   list --json        the CLI's listing, every resource described (< 0.3 s at 10k, < 1 s at 100k)
#   ls -l images/      through a mount (< 1 s at 10k, < 2 s at 100k)
#   open               of one resource through the mount (< 1 ms): median and p90 of 100
#   RSS                of the mount daemon: idle after mounting, and idle after the `ls -l`s
# The resources are copies of one small encrypted image (64 KiB of data; the same header
# and data key in each), made with cp: creating 100,000 through the CLI would take longer
# than the measurements. The store is kept in /var/tmp/encimg-many-N for the next run.
#
#   sudo bash contrib/bench/many.sh          MANY_COUNTS (default "10000 100000")
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
E="${CARGO_TARGET_DIR:-$ROOT/target}/release/encimg"
secs() { python3 -c "import sys; print('%.2f' % ((int(sys.argv[2]) - int(sys.argv[1])) / 1e9))" "$@"; }
rss() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
printf '%-8s %12s %12s %12s %14s %14s %14s\n' resources "list --json" "ls -l (1st)" "ls -l (2nd)" "open med/p90" "RSS idle MiB" "after ls MiB"
for N in ${MANY_COUNTS:-10000 100000}; do
  W=/var/tmp/encimg-many-$N
  export ENCIMG_STORE=$W/store
  if [ ! -f "$W/complete" ]; then
    rm -rf "$W"; mkdir -p "$W"
    "$E" init >/dev/null
    head -c 64K /dev/urandom > "$W/seed.raw"
    "$E" import "$W/seed.raw" images/seed --encrypt >/dev/null
    (cd "$W/store/images" && seq -f "img%07g" 1 $((N - 1)) |
      xargs -P2 -n 2000 sh -c 'for n; do cp --sparse=always seed.eimg "$n.eimg"; done' _)
    touch "$W/complete"
  fi
  "$E" list --json >/dev/null   # warm: the bars are about the listing, not the disk
  t0=$(date +%s%N); "$E" list --json >/dev/null; t1=$(date +%s%N)
  list=$(secs "$t0" "$t1")
  mkdir -p "$W/mnt"
  "$E" mount "$W/mnt" >/dev/null
  pid=$(pgrep -f "encimg mount $W/mnt" | head -1)
  sleep 1; idle=$(rss "$pid")
  t0=$(date +%s%N); ls -l "$W/mnt/images" >/dev/null; t1=$(date +%s%N)
  ls1=$(secs "$t0" "$t1")
  t0=$(date +%s%N); ls -l "$W/mnt/images" >/dev/null; t1=$(date +%s%N)
  ls2=$(secs "$t0" "$t1")
  open=$(python3 - "$W/mnt/images" <<'PY'
import os, sys, time
ts = []
for i in range(1, 10001, 100):
    p = os.path.join(sys.argv[1], "img%07d" % i)
    t = time.perf_counter(); fd = os.open(p, os.O_RDONLY); t1 = time.perf_counter(); os.close(fd)
    ts.append(t1 - t)
ts.sort()
print("%.0f/%.0f us" % (ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.9)] * 1e6))
PY
)
  sleep 3; after=$(rss "$pid")
  "$E" umount "$W/mnt" >/dev/null
  printf '%-8s %11ss %11ss %11ss %14s %14s %14s\n' "$N" "$list" "$ls1" "$ls2" "$open" "$idle" "$after"
done
echo "($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
