#!/usr/bin/env bash
# End-to-end benchmark of encimg against its peers (the "Performance" bars of the project's
# QUALITY.md): the same fio jobs on
#   disk        fio directly on a raw file (the disk baseline)
#   qemu-raw    qemu-storage-daemon FUSE export of a raw file
#   qemu-luks   qemu-storage-daemon FUSE export of a LUKS image (aes-256-xts-plain64)
#   fuse-pt     libfuse's passthrough_hp example (16 threads, clone_fd, no splice, no
#               encryption) over a raw file: what a FUSE daemon reaches here with no
#               encryption (contrib/bench/fuse-passthrough.sh builds it from Debian's libfuse
#               source). Read jobs only: its O_DIRECT writes fail with EINVAL (the payload
#               it hands to pwrite is not aligned).
#   encimg-aes  an encimg disk (AES-256-XTS) through `encimg mount`
#   encimg-sm4  an encimg disk (SM4-XTS) through the same mount
#   encimg-ring the AES disk through a mount serving FUSE over io_uring (`mount --io-uring`);
#               only where the kernel has it (Linux 6.14+): the fuse module's enable_uring
#               is turned on for the run and put back after
# plus copy-with-new-key vs cp, rekey-by-rewrap time, daemon peak RSS, and sector-crypto
# throughput (criterion) vs `openssl speed`. Prints one table and writes the results as JSON.
#
# Run as root (installs packages, drops the page cache, mounts FUSE):
#   bash contrib/bench/run.sh
# Environment:
#   BENCH_SIZE     size of every target (default 1G; K/M/G suffixes are powers of 1024)
#   BENCH_RUNTIME  seconds: reads stop after this (or one pass), writes run this long (default 10)
#   BENCH_ROUNDS   rounds of each fio job but the hot read, the targets taken in turn in each;
#                  the table shows each target's median round (default 3; 1 for a quick look)
#   BENCH_CACHE    encimg --cache-size for every run (default 16M)
#   BENCH_CRYPTO   0 skips `cargo bench` (default 1)
#   BENCH_OUT      where the JSON results go (default ./bench-results.json in the caller's cwd)
#   BENCH_KEEP     1 keeps the work dir's raw fio output (images are deleted regardless)
#   BENCH_DIR      parent of the temp work dir (default /var/tmp: the same disk as the tree)
#   BENCH_TARGETS  only these targets (default: all; e.g. "encimg-aes encimg-sm4" while tuning)
#   BENCH_JOBS     only these fio jobs (default: all; e.g. "seqread randread-qd1")
#   BENCH_PASSTHROUGH  a passthrough_hp binary to use instead of building libfuse's example
set -euo pipefail

CALLER_PWD=$PWD
[ -z "${BENCH_PASSTHROUGH:-}" ] || export BENCH_PASSTHROUGH=$(readlink -f "$BENCH_PASSTHROUGH")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
T0=$(date +%s)

SIZE_H=${BENCH_SIZE:-1G}
SIZE=$(numfmt --from=iec "$SIZE_H")
RUNTIME=${BENCH_RUNTIME:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CACHE=${BENCH_CACHE:-16M}
OUT=${BENCH_OUT:-$CALLER_PWD/bench-results.json}
PASS=bench-secret-not-a-real-one   # the LUKS passphrase (benchmark only)

log() { printf '[bench %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (drops the page cache, installs packages, mounts FUSE)"
[ -e /dev/fuse ] || die "/dev/fuse is missing"

# ---------------------------------------------------------------------------------------------
# 1. Tools and build
# ---------------------------------------------------------------------------------------------
apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need=()
command -v fio >/dev/null || need+=(fio)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v lscpu >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then log "installing ${need[*]}"; apt_install "${need[@]}"; fi
# qemu-storage-daemon moved between packages across Debian releases (qemu-system-common in
# bookworm, its own package later, qemu-utils in backports): try each until it appears.
if ! command -v qemu-storage-daemon >/dev/null; then
  for p in qemu-storage-daemon qemu-system-common qemu-utils; do
    log "installing $p for qemu-storage-daemon"
    apt_install "$p" 2>/dev/null || true
    command -v qemu-storage-daemon >/dev/null && break
  done
  command -v qemu-storage-daemon >/dev/null || die "could not install qemu-storage-daemon"
fi
command -v cargo >/dev/null || die "cargo is needed (https://rustup.rs)"

log "building encimg (cargo build --release)"
if ! build_out=$(cargo build --release 2>&1); then
  printf '%s\n' "$build_out" >&2
  die "cargo build --release failed"
fi
# The FUSE ceiling: libfuse's passthrough example, built against the installed libfuse3
# (only when the fuse-pt column is wanted).
PT=$ROOT/contrib/bench/fuse-passthrough.sh PT_BIN=
if [ -z "${BENCH_TARGETS:-}" ] || [[ " $BENCH_TARGETS " == *" fuse-pt "* ]]; then
  if PT_BIN=$(bash "$PT"); then
    log "fuse-pt: $PT_BIN"
  else
    log "no fuse-pt column: could not build libfuse's passthrough_hp (see above)"
    PT_BIN=
  fi
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release/encimg
[ -x "$BIN" ] || die "no binary at $BIN"

# ---------------------------------------------------------------------------------------------
# 2. Work dir and cleanup (on any exit: unmount, stop daemons we started, delete the images)
# ---------------------------------------------------------------------------------------------
W=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" encimg-bench.XXXXXX)
R=$W/results            # raw fio JSON and the key/value facts report.py reads
mkdir -p "$R/fio" "$W/mnt"
export ENCIMG_STORE=$W/store
QSD_PIDS=()             # qemu-storage-daemon pids we started
PT_PID=                 # the passthrough_hp we started
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_WAS=              # its value before the run, when we turned it on

alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
encimg_pid() { pgrep -n -f "encimg mount $W/mnt" || true; }

stop_pid() {  # TERM, wait up to 10 s, then KILL
  local pid=$1 i
  alive "$pid" || return 0
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid f
  set +e
  trap - EXIT INT TERM
  if is_mounted "$W/mnt"; then
    "$BIN" umount "$W/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$W/mnt"
  fi
  pid=$(encimg_pid); [ -n "$pid" ] && stop_pid "$pid"
  for pid in "${QSD_PIDS[@]}"; do stop_pid "$pid"; done
  is_mounted "$W/pt.mnt" && { fusermount3 -u "$W/pt.mnt" || fusermount3 -u -z "$W/pt.mnt"; }
  [ -n "$PT_PID" ] && stop_pid "$PT_PID"
  for f in "$W"/*.exp; do
    [ -e "$f" ] && is_mounted "$f" && { fusermount3 -u "$f" || fusermount3 -u -z "$f"; }
  done
  [ -n "$URING_WAS" ] && echo "$URING_WAS" > "$URING_PARAM"
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    find "$W" -mindepth 1 -maxdepth 1 ! -name results -exec rm -rf {} +
    log "kept raw results in $R"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fact() { printf '%s\t%s\n' "$1" "$2" >> "$R/facts.tsv"; }   # facts for report.py
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now_ns() { date +%s%N; }
# Percent of all CPUs busy over half a second while this script is idle: other people's load.
cpu_busy_pct() {
  local a b
  a=$(head -1 /proc/stat); sleep 0.5; b=$(head -1 /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x); split(b, y); tot = 0
    for (i = 2; i <= n; i++) tot += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%.0f", (tot > 0) ? 100 * (tot - idle) / tot : 0 }'
}

log "work dir $W, size $SIZE_H ($SIZE bytes), ${RUNTIME}s per fio job, encimg --cache-size $CACHE"
fact size_bytes "$SIZE"
fact runtime_s "$RUNTIME"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number, not $ROUNDS"
fact rounds "$ROUNDS"
fact cache_size "$CACHE"
fact cache_bytes "$(numfmt --from=iec "$CACHE")"
fact cpu_model "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
fact cpus "$(nproc)"
fact cpu_flags "$(grep -m1 -o -w -E 'aes|vaes|vpclmulqdq|gfni|avx2|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')"
fact loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
fact kernel "$(uname -r)"
fact fio_version "$(fio --version)"
fact qemu_version "$(qemu-storage-daemon --version | head -1)"
fact openssl_version "$(openssl version)"
fact encimg_commit "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
fact workdir "$W"

# ---------------------------------------------------------------------------------------------
# 3. Targets
# ---------------------------------------------------------------------------------------------
# disk: a plain file; fio writes it fully in the fill pass below.
truncate -s "$SIZE" "$W/disk.raw"

# qemu-storage-daemon: one daemon per export. The export's mountpoint is a regular file.
# cache.direct=on (O_DIRECT on the image, aio=native) so qemu keeps no page cache: cold reads.
start_qsd() {  # NAME NODE [qsd args...]
  local name=$1 node=$2; shift 2
  touch "$W/$name.exp"
  qemu-storage-daemon "$@" \
    --export "type=fuse,id=exp-$name,node-name=$node,mountpoint=$W/$name.exp,writable=on" \
    --pidfile "$W/$name.qpid" --daemonize
  QSD_PIDS+=("$(cat "$W/$name.qpid")")
  is_mounted "$W/$name.exp" || die "qemu-storage-daemon export $name is not mounted"
}
truncate -s "$SIZE" "$W/qraw.img"
start_qsd qemu-raw fmt-raw \
  --blockdev "driver=file,node-name=file-raw,filename=$W/qraw.img,cache.direct=on,aio=native" \
  --blockdev "driver=raw,node-name=fmt-raw,file=file-raw"

# LUKS1 container, aes-256 xts plain64 (what dm-crypt calls aes-xts-plain64). A short PBKDF
# iteration time only speeds up opening; it does not touch the data path.
qemu-img create -q -f luks --object "secret,id=sec0,data=$PASS" \
  -o key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=100 \
  "$W/luks.img" "$SIZE"
start_qsd qemu-luks fmt-luks \
  --object "secret,id=sec0,data=$PASS" \
  --blockdev "driver=file,node-name=file-luks,filename=$W/luks.img,cache.direct=on,aio=native" \
  --blockdev "driver=luks,node-name=fmt-luks,file=file-luks,key-secret=sec0"

# fuse-pt: passthrough_hp of a directory with one raw file.
if [ -n "$PT_BIN" ]; then
  mkdir -p "$W/pt-src" "$W/pt.mnt"
  truncate -s "$SIZE" "$W/pt-src/disk.raw"
  PT_PID=$(bash "$PT" mount "$W/pt-src" "$W/pt.mnt") || die "could not mount passthrough_hp"
  fact passthrough "$(basename "$PT_BIN")"
fi

# encimg: a store with an AES disk (service key) and an SM4 disk (SM4 CMK), both blank.
"$BIN" init >/dev/null
"$BIN" create disks/aes --size "$SIZE" --encrypt >/dev/null
"$BIN" key create --spec SM4 --alias sm4 >/dev/null
"$BIN" create disks/sm4 --size "$SIZE" --key alias/sm4 >/dev/null
"$BIN" key create --spec AES_256 --alias aes2 >/dev/null   # for copy and rekey
"$BIN" key create --spec AES_256 --alias aes3 >/dev/null   # for rekey

# The mount is restarted before every fio job on an encimg disk, so each job starts with a
# cold sector cache; the daemon's VmHWM is recorded before each unmount.
ENC_PID=
mount_encimg() {  # [--io-uring]
  local i
  "$BIN" mount "$W/mnt" --cache-size "$CACHE" "$@" >/dev/null
  ENC_PID=$(encimg_pid)
  [ -n "$ENC_PID" ] || die "encimg mount daemon not found"
  [ $# = 0 ] && return 0
  for i in $(seq 50); do   # the rings start a moment after the mount is live
    tail -3 "$ENCIMG_STORE/mount.log" | grep -q "serving through FUSE over io_uring" && return 0
    sleep 0.1
  done
  die "encimg-ring: the mount does not serve through io_uring ($(tail -1 "$ENCIMG_STORE/mount.log"))"
}
mount_for() {  # TARGET: mount encimg the way TARGET is served
  case $1 in
    encimg-ring) mount_encimg --io-uring ;;
    encimg-*) mount_encimg ;;
  esac
}
umount_encimg() {  # LABEL (recorded with the daemon's peak RSS)
  local hwm
  hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$ENC_PID/status" 2>/dev/null || echo 0)
  fact "hwm_kb:$1" "$hwm"
  "$BIN" umount "$W/mnt" >/dev/null
}

declare -A TARGET=(
  [disk]=$W/disk.raw
  [qemu-raw]=$W/qemu-raw.exp
  [qemu-luks]=$W/qemu-luks.exp
  [fuse-pt]=$W/pt.mnt/disk.raw
  [encimg-aes]=$W/mnt/disks/aes
  [encimg-sm4]=$W/mnt/disks/sm4
  [encimg-ring]=$W/mnt/disks/aes
)
TARGETS=(disk qemu-raw qemu-luks fuse-pt encimg-aes encimg-sm4)
[ -n "$PT_BIN" ] || TARGETS=(disk qemu-raw qemu-luks encimg-aes encimg-sm4)
[ -w "$URING_PARAM" ] && TARGETS+=(encimg-ring)
if [ -n "${BENCH_TARGETS:-}" ]; then
  for t in $BENCH_TARGETS; do
    [ -n "${TARGET[$t]:-}" ] || die "unknown target $t (${TARGETS[*]})"
    [ "$t" != fuse-pt ] || [ -n "$PT_BIN" ] || die "target fuse-pt: passthrough_hp could not be built"
  done
  read -r -a TARGETS <<<"$BENCH_TARGETS"
fi
if [[ " ${TARGETS[*]} " == *" encimg-ring "* ]]; then
  [ -w "$URING_PARAM" ] || die "target encimg-ring: this kernel has no FUSE over io_uring ($URING_PARAM)"
  URING_WAS=$(cat "$URING_PARAM")
  echo Y > "$URING_PARAM"
fi

# fio on TARGET-NAME with JOB-NAME and the job's options; output in $R/fio/JOB.TARGET.json,
# or JOB.TARGET.rN.json for round N of a job run in rounds ($ROUND set).
run_fio() {  # JOB TARGET fio-options...
  local job=$1 t=$2 out; shift 2
  out="$R/fio/$job.$t${ROUND:+.r$ROUND}.json"
  drop_caches
  fact "busy:$job.$t" "$(cpu_busy_pct)"   # what others use of the CPUs skews the numbers
  mount_for "$t"
  fio --name="$job" --filename="${TARGET[$t]}" --direct=1 --output-format=json \
    --output="$out" "$@" >/dev/null \
    || { log "fio $job on $t failed"; rm -f "$out"; }
  case $t in encimg-*) umount_encimg "$job.$t${ROUND:+.r$ROUND}" ;; esac
}

# ---------------------------------------------------------------------------------------------
# 4. Fill every target with data (fio's random buffers), so reads decrypt real sectors
# ---------------------------------------------------------------------------------------------
for t in "${TARGETS[@]}"; do
  log "fill $t"
  FILL="--rw=write --bs=1M --ioengine=libaio --iodepth=4 --size=$SIZE --end_fsync=1"
  if [ "$t" = encimg-ring ] && [[ " ${TARGETS[*]} " == *" encimg-aes "* ]]; then
    continue   # the AES disk, filled as encimg-aes
  fi
  if [ "$t" = fuse-pt ]; then   # the file under it (see above), not counted
    # shellcheck disable=SC2086
    fio --name=fill --filename="$W/pt-src/disk.raw" --direct=1 $FILL >/dev/null || die "fill failed"
    continue
  fi
  # shellcheck disable=SC2086
  run_fio fill "$t" $FILL
done

# ---------------------------------------------------------------------------------------------
# 5. The fio jobs, job by job across all targets (so drift in machine load hits all alike).
#    Caches dropped before each job; the encimg mount restarted before each of its jobs.
#    Read jobs read every block at most ONCE (size-based, fio's random map; the 4 jobs each
#    get their own quarter of the file), stopped after $RUNTIME s: a time-based read that wraps
#    around would serve its second pass from the page cache of a daemon whose backing I/O is
#    buffered, which is not a cold read. Write jobs are time-based and end with fsync
#    (--end_fsync=1), which fio counts in their time.
# ---------------------------------------------------------------------------------------------
Q=$(( SIZE / 4 / 1048576 * 1048576 ))   # a quarter of the file, MiB-aligned
ONCE="--size=$SIZE --runtime=$RUNTIME"
TIMED="--runtime=$RUNTIME --time_based"
JOBS=(
  "seqread        $ONCE  --rw=read      --bs=1M --ioengine=psync"
  "seqwrite       $TIMED --rw=write     --bs=1M --ioengine=psync --end_fsync=1"
  "randread-qd16  $ONCE  --rw=randread  --bs=4k --ioengine=libaio --iodepth=16"
  "randread-4jobs $ONCE  --rw=randread  --bs=4k --ioengine=psync --numjobs=4 --group_reporting --size=$Q --offset_increment=$Q"
  "randread-qd1   $ONCE  --rw=randread  --bs=4k --ioengine=psync"
  "randwrite-qd1  $TIMED --rw=randwrite --bs=4k --ioengine=psync --end_fsync=1"
  "hotread        --size=$SIZE --rw=read --bs=1M --ioengine=psync --direct=0 --invalidate=0"
)
# Hot reads: a buffered pass (not counted), then a second buffered pass by a new process (a
# new open), nothing dropped between: what each target serves from the kernel's page cache.
run_hot() {  # TARGET fio-options...
  local t=$1; shift
  drop_caches
  fact "busy:hotread.$t" "$(cpu_busy_pct)"
  mount_for "$t"
  fio --name=warm --filename="${TARGET[$t]}" --output=/dev/null "$@" >/dev/null \
    && fio --name=hotread --filename="${TARGET[$t]}" --output-format=json \
      --output="$R/fio/hotread.$t.json" "$@" >/dev/null \
    || { log "fio hotread on $t failed"; rm -f "$R/fio/hotread.$t.json"; }
  case $t in encimg-*) umount_encimg "hotread.$t" ;; esac
}
for spec in "${JOBS[@]}"; do
  read -r job opts <<<"$spec"
  if [ -n "${BENCH_JOBS:-}" ] && ! [[ " $BENCH_JOBS " == *" $job "* ]]; then continue; fi
  if [ "$job" = hotread ]; then
    fact "job:$job" "$(echo $opts), second pass"
  else
    fact "job:$job" "$(echo $opts) --direct=1"
  fi
  # Every job but the hot read (a second pass of its own) in rounds, the targets in turn in
  # each, in reverse order every other round: the device drifts over a run by more than FUSE's
  # share of a 4 KiB read (and a write's throughput with it), so one pass per target can put a
  # ratio either side of a bar; the report takes each target's median round.
  rounds=1
  [[ $job != hotread ]] && rounds=$ROUNDS
  for r in $(seq "$rounds"); do
    ROUND=
    [ "$rounds" -gt 1 ] && ROUND=$r
    order=("${TARGETS[@]}")
    if (( r % 2 == 0 )); then
      order=()
      for t in "${TARGETS[@]}"; do order=("$t" "${order[@]}"); done
    fi
    for t in "${order[@]}"; do
      [[ $t = fuse-pt && $job = *write* ]] && continue   # reads only (see above)
      log "$job on $t${ROUND:+ (round $r of $rounds)}"
      # shellcheck disable=SC2086  # $opts is a list of options
      if [ "$job" = hotread ]; then run_hot "$t" $opts; else run_fio "$job" "$t" $opts; fi
    done
  done
  ROUND=
done

# The peers are done: stop them so they cost nothing below.
for pid in "${QSD_PIDS[@]}"; do stop_pid "$pid"; done
QSD_PIDS=()
is_mounted "$W/pt.mnt" && fusermount3 -u "$W/pt.mnt"
[ -n "$PT_PID" ] && stop_pid "$PT_PID"
PT_PID=

# ---------------------------------------------------------------------------------------------
# 6. Copy with the key replaced (full re-encryption) vs cp of a same-size written raw file.
#    encimg copy fsyncs its output, so the peer is `cp --sparse=never` followed by `sync FILE`
#    (cp alone is also recorded). Caches dropped before each.
# ---------------------------------------------------------------------------------------------
log "cp --sparse=never of the $SIZE_H raw file"
drop_caches
t1=$(now_ns); cp --sparse=never "$W/disk.raw" "$W/cp.raw"; t2=$(now_ns); sync "$W/cp.raw"; t3=$(now_ns)
fact cp_ms "$(( (t2 - t1) / 1000000 ))"
fact cp_sync_ms "$(( (t3 - t1) / 1000000 ))"
rm -f "$W/cp.raw"
log "encimg copy disks/aes disks/aes2 --key alias/aes2"
drop_caches
t1=$(now_ns)
if "$BIN" copy disks/aes disks/aes2 --key alias/aes2 >/dev/null; then
  t2=$(now_ns); fact encimg_copy_ms "$(( (t2 - t1) / 1000000 ))"
else
  log "encimg copy failed; no copy figures"
fi
"$BIN" delete disks/aes2 >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
# 6b. Cross-region copy to five regions (SPEC §7), all on this disk, vs five
#     `cp --sparse=never` of the same file and a sync of all five. The source (a snapshot of
#     the written AES disk) is read once and encrypted five times under five new data keys.
# ---------------------------------------------------------------------------------------------
REGIONS=""
for i in 1 2 3 4 5; do
  "$BIN" region add "bench-r$i" >/dev/null && REGIONS="$REGIONS${REGIONS:+,}bench-r$i"
done
"$BIN" snapshot disks/aes snapshots/xr >/dev/null
log "five cp --sparse=never of the $SIZE_H raw file, then sync"
drop_caches
t1=$(now_ns)
for i in 1 2 3 4 5; do cp --sparse=never "$W/disk.raw" "$W/cp$i.raw"; done
sync "$W"/cp?.raw; t2=$(now_ns)
fact cp5_sync_ms "$(( (t2 - t1) / 1000000 ))"
rm -f "$W"/cp?.raw
log "encimg copy snapshots/xr --to-region $REGIONS"
drop_caches
t1=$(now_ns)
if "$BIN" copy snapshots/xr snapshots/xr --to-region "$REGIONS" >/dev/null; then
  t2=$(now_ns); fact xregion5_ms "$(( (t2 - t1) / 1000000 ))"
else
  log "encimg copy --to-region failed; no cross-region figures"
fi
for i in 1 2 3 4 5; do
  "$BIN" --region "bench-r$i" delete snapshots/xr >/dev/null 2>&1 || true
  "$BIN" region remove "bench-r$i" >/dev/null 2>&1 || true
done
"$BIN" delete snapshots/xr >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
# 7. Rekey by rewrap: a 64 MiB image (written) vs a 64 GiB sparse disk, alternating between two
#    AES CMKs so every run really rewraps. Wall time of the whole command, 7 runs each.
# ---------------------------------------------------------------------------------------------
log "rekey (rewrap) 64 MiB vs 64 GiB"
head -c 64M /dev/urandom > "$W/r64m.raw"
"$BIN" import "$W/r64m.raw" images/r64m --encrypt >/dev/null
"$BIN" create disks/r64g --size 64G --encrypt >/dev/null
us64m=() us64g=()
for i in $(seq 7); do
  key=alias/aes$(( 2 + i % 2 ))
  t1=$(now_ns); "$BIN" rekey images/r64m --key "$key" >/dev/null || break; t2=$(now_ns)
  "$BIN" rekey disks/r64g --key "$key" >/dev/null || break; t3=$(now_ns)
  us64m+=("$(( (t2 - t1) / 1000 ))") us64g+=("$(( (t3 - t2) / 1000 ))")
done
if [ ${#us64g[@]} = 7 ]; then
  fact rekey_64m_us "${us64m[*]}"
  fact rekey_64g_us "${us64g[*]}"
else
  log "encimg rekey failed; no rekey figures"
fi

# ---------------------------------------------------------------------------------------------
# 8. Sector crypto, one core: openssl speed vs encimg's criterion bench, back to back.
# ---------------------------------------------------------------------------------------------
log "openssl speed aes-256-xts, sm4-ctr (4096-byte blocks, 3 s each)"
ossl() { openssl speed -evp "$1" -bytes 4096 -seconds 3 2>/dev/null | awk 'END { sub(/k$/, "", $NF); print $NF }'; }
fact openssl_aes_256_xts_kBps "$(ossl aes-256-xts)"
fact openssl_sm4_ctr_kBps "$(ossl sm4-ctr)"
if [ "${BENCH_CRYPTO:-1}" = 1 ]; then
  log "cargo bench --bench crypto (4 KiB sectors; compiles criterion the first time)"
  if cargo bench --quiet --bench crypto --no-run > "$R/criterion-build.txt" 2>&1 &&
     cargo bench --quiet --bench crypto -- --warm-up-time 1 --measurement-time 3 '/4KiB$' \
       > "$R/criterion.txt" 2>&1; then
    fact criterion_dir "$TARGET_DIR/criterion"
    fact criterion_since "$T0"
  else
    log "cargo bench failed; continuing without it:"
    tail -5 "$R/criterion-build.txt" "$R/criterion.txt" 2>/dev/null >&2 || true
  fi
fi

# ---------------------------------------------------------------------------------------------
# 9. Report
# ---------------------------------------------------------------------------------------------
fact loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"
fact total_s "$(( $(date +%s) - T0 ))"
python3 "$ROOT/contrib/bench/report.py" "$R" "$OUT"
[ "${BENCH_KEEP:-0}" = 1 ] && cp "$OUT" "$R/results.json"
log "done in $(( $(date +%s) - T0 ))s; results: $OUT"
