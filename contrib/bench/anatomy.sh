#!/usr/bin/env bash
# Where the time of a cold 4 KiB random read goes: the same fio job (randread, libaio, direct,
# queue depth $ANATOMY_QD) on a raw file, through libfuse's passthrough_hp example over that file
# (the FUSE ceiling: no encryption; contrib/bench/fuse-passthrough.sh builds it), through
# `encimg mount` on a store on the same disk, and through `encimg mount` on a store in tmpfs
# (FUSE and decryption without the device).
# For each it prints what fio saw (IOPS, mean latency) beside what the kernel counted while
# it ran: the block layer's own read latency and I/Os in flight (/sys/class/block/DEV/stat),
# CPU time, context switches and interrupts per read (/proc/stat), and the share of all CPUs
# busy (steal time counts as not ours). The README's notes on what bounds random reads come from this.
#
# fio runs time-based (the counters need it running throughout), so a fast target reads some
# blocks twice; the mounts use a 16 MiB sector cache, as contrib/bench/run.sh does, so
# repeats are rarely served from it.
#
# Run as root:  bash contrib/bench/anatomy.sh
# Environment:  ANATOMY_QD (default 16), ANATOMY_SIZE (default 1G), ANATOMY_RUNTIME (s, 6),
#               ANATOMY_REPS (default 2), BENCH_DIR (parent of the work dir, default /var/tmp)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
QD=${ANATOMY_QD:-16}
SIZE=${ANATOMY_SIZE:-1G}
RUNTIME=${ANATOMY_RUNTIME:-6}
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -ge 4 ]] || { echo "anatomy: ANATOMY_RUNTIME must be whole seconds, at least 4" >&2; exit 1; }
REPS=${ANATOMY_REPS:-2}
die() { echo "anatomy: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (drops the page cache, mounts FUSE)"
for t in fio python3 fusermount3; do
  command -v "$t" >/dev/null || die "$t is missing (bash contrib/bench/run.sh installs it)"
done
# (contrib/bench/fuse-passthrough.sh installs what building the passthrough row needs.)
(cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/encimg
PT=contrib/bench/fuse-passthrough.sh
bash "$ROOT/$PT" >/dev/null || { echo "anatomy: no passthrough row" >&2; PT=; }

W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" encimg-anatomy.XXXXXX)
T=$(mktemp -d -p /dev/shm encimg-anatomy.XXXXXX)
W=$(readlink -f "$W"); T=$(readlink -f "$T")
FIO=
cleanup() {
  set +e
  [ -n "$FIO" ] && kill "$FIO" 2>/dev/null && wait "$FIO" 2>/dev/null
  grep -q " $W/pt " /proc/mounts && fusermount3 -u -z "$W/pt"
  for d in "$W" "$T"; do
    grep -q " $d/mnt " /proc/mounts && { ENCIMG_STORE=$d/store "$BIN" umount "$d/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$d/mnt"; }
  done
  rm -rf "$W" "$T"
}
trap cleanup EXIT

# The block device under the work dir (a partition has its own stat file too).
DEV=$(basename "$(readlink -f "$(df --output=source "$W" | tail -1)")")
STAT=/sys/class/block/$DEV/stat
[ -r "$STAT" ] || die "no block-layer statistics for $DEV ($STAT)"

# counters: busy and total CPU ticks, context switches, interrupts, then the device's
# reads completed, ms spent reading, and weighted ms in flight.
counters() {
  # cpu: user nice system idle iowait irq softirq steal (guest time is already in user).
  awk '/^cpu /{b=$2+$3+$4+$7+$8; t=b+$5+$6+$9} /^ctxt/{c=$2} /^intr/{n=$2}
       END{printf "%d %d %d %d ", b, t, c, n}' /proc/stat
  awk '{print $1, $4, $11}' "$STAT"
  date +%s%N
}

run() {  # LABEL FILE
  sync; echo 3 > /proc/sys/vm/drop_caches
  local a b
  fio --name=anatomy --filename="$2" --direct=1 --rw=randread --bs=4k --ioengine=libaio \
    --iodepth="$QD" --size="$SIZE" --runtime="$RUNTIME" --time_based --output-format=json \
    --output="$W/fio.json" >/dev/null &
  FIO=$!
  sleep 1; a=$(counters | tr '\n' ' '); sleep $((RUNTIME - 2)); b=$(counters | tr '\n' ' ')
  wait "$FIO"; FIO=
  python3 - "$1" "$W/fio.json" "$a" "$b" "$(getconf CLK_TCK)" <<'PY'
import json, sys
label, path, a, b, hz = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), int(sys.argv[5])
a, b = [int(x) for x in a], [int(x) for x in b]
d = [y - x for x, y in zip(a, b)]
busy, total, ctxt, intr, dreads, dms, dq, ns = d
r = json.load(open(path))["jobs"][0]["read"]
secs = ns / 1e9
n = max(r["iops"] * secs, 1)  # reads in the window, at fio's rate
on_device = "tmpfs" not in label
dev = f"{dms * 1000 / dreads:>4.0f} us" if on_device and dreads else "   - us"
inflight = f"{dq / (ns / 1e6):>4.1f}" if on_device else "   -"
print(f"{label:<13} fio {r['iops']:>7.0f} IOPS {r['lat_ns']['mean'] / 1000:>4.0f} us | "
      f"device {dev}, {inflight} in flight | "
      f"CPU {100 * busy / total:>3.0f}% busy, {busy / hz * 1e6 / n:>4.1f} us/read, "
      f"{ctxt / n:>3.1f} cs/read, {intr / n:>4.2f} irq/read")
PY
}

export ENCIMG_STORE
echo "fio randread 4k qd$QD direct, $SIZE, ${RUNTIME}s; device $DEV; $(nproc) CPUs; encimg $(git -C "$ROOT" describe --always --dirty 2>/dev/null)"
mkdir -p "$W/raw" "$W/pt"
fio --name=fill --filename="$W/raw/disk.raw" --rw=write --bs=1M --size="$SIZE" --direct=1 >/dev/null
for d in "$W" "$T"; do
  ENCIMG_STORE=$d/store
  mkdir -p "$d/mnt"
  "$BIN" init >/dev/null
  "$BIN" create disks/d --size "$SIZE" --encrypt >/dev/null
  "$BIN" mount "$d/mnt" --cache-size 16M >/dev/null
  fio --name=fill --filename="$d/mnt/disks/d" --rw=write --bs=1M --size="$SIZE" --direct=1 >/dev/null
  "$BIN" umount "$d/mnt" >/dev/null
done
for _ in $(seq "$REPS"); do
  run "raw file" "$W/raw/disk.raw"
  if [ -n "$PT" ] && pid=$(bash "$ROOT/$PT" mount "$W/raw" "$W/pt"); then
    run "passthrough" "$W/pt/disk.raw"
    fusermount3 -u "$W/pt"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null || true
  fi
  for d in "$W" "$T"; do
    ENCIMG_STORE=$d/store
    "$BIN" mount "$d/mnt" --cache-size 16M >/dev/null
    run "encimg $( [ "$d" = "$W" ] && echo disk || echo tmpfs)" "$d/mnt/disks/d"
    "$BIN" umount "$d/mnt" >/dev/null
  done
done
