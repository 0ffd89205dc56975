#!/usr/bin/env bash
# Build libfuse's own high-performance passthrough example (example/passthrough_hp.cc, C++,
# multi-threaded, clone_fd, splice) against the libfuse3 installed here, and print its path.
# The benchmarks mount it over a raw file on the same disk: a FUSE daemon with no encryption
# and no cache, written by the FUSE maintainers, is the FUSE ceiling encimg is measured against.
#
# The source is the upstream tarball of the Debian source package the installed libfuse3-dev
# comes from, fetched over HTTPS from deb.debian.org with that package's .dsc, and checked
# against the sha256 the .dsc lists (an integrity check; the .dsc's signature is not checked).
# One patch: before libfuse 3.17, passthrough_hp's --num-threads set only the idle-thread
# limit, leaving at most 10 workers; it now sets the worker limit as well, as later ones do. The binary
# is cached under DEST (default: target/bench in the tree). Needs root only to install packages.
#
#   bash contrib/bench/fuse-passthrough.sh [DEST]        # prints /path/to/passthrough_hp
#   bash contrib/bench/fuse-passthrough.sh mount DIR MNT  # mounts DIR at MNT, prints the PID
#   BENCH_PASSTHROUGH=/path/to/passthrough_hp             # use this binary instead
#
# `mount` runs it the way the benchmarks compare it with `encimg mount`: 16 worker threads,
# clone_fd, no splice, in the foreground of a background process (its stderr in MNT.log); it
# returns once MNT is mounted. Unmount MNT (fusermount3 -u) to stop it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
die() { echo "fuse-passthrough: $*" >&2; exit 1; }

if [ "${1:-}" = mount ]; then
  [ $# = 3 ] || die "usage: fuse-passthrough.sh mount DIR MNT"
  src=$2 mnt=$3
  bin=$(bash "$0") || exit 1
  # Started from a command substitution, so this shell never reaps it (and never reports
  # how it died: the log says).
  pid=$("$bin" --foreground --nosplice --clone-fd --num-threads=16 "$src" "$mnt" \
    </dev/null >/dev/null 2>"${mnt%/}.log" & echo $!)
  for _ in $(seq 100); do
    if awk -v m="$(readlink -f "$mnt")" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; then
      echo "$pid"; exit 0
    fi
    kill -0 "$pid" 2>/dev/null || die "passthrough_hp did not mount $mnt: $(tail -1 "${mnt%/}.log")"
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  die "passthrough_hp did not mount $mnt within 10 s"
fi

DEST=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/bench}
if [ -n "${BENCH_PASSTHROUGH:-}" ]; then
  [ -x "$BENCH_PASSTHROUGH" ] || die "BENCH_PASSTHROUGH=$BENCH_PASSTHROUGH is not executable"
  readlink -f "$BENCH_PASSTHROUGH"; exit 0
fi

need=()
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v g++ >/dev/null || need+=(g++)
command -v curl >/dev/null || need+=(curl)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs ${need[*]} (run as root to install them)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    || die "could not install ${need[*]}"
fi

# The Debian source package the installed libfuse3-dev was built from.
SRCVER=$(dpkg-query -W -f='${source:Version}' libfuse3-dev 2>/dev/null) \
  || die "libfuse3-dev is not a Debian package here; set BENCH_PASSTHROUGH"
SRCVER=${SRCVER#*:}   # no epoch in file names
VER=${SRCVER%-*}
[ "$VER" = "$(pkg-config --modversion fuse3)" ] || die "libfuse3-dev $SRCVER is not libfuse $(pkg-config --modversion fuse3)"
BIN=$DEST/passthrough_hp-$VER-threads
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

POOL=${DEBIAN_POOL:-https://deb.debian.org/debian/pool/main/f/fuse3}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
TARBALL=fuse3_$VER.orig.tar.xz
DSC=fuse3_$SRCVER.dsc
curl -fsS -o "$TMP/$TARBALL" "$POOL/$TARBALL" 2>/dev/null || die "could not download $POOL/$TARBALL"
curl -fsS -o "$TMP/$DSC" "$POOL/$DSC" 2>/dev/null || die "could not download $POOL/$DSC"
want=$(awk -v f="$TARBALL" '/^Checksums-Sha256:/ { s = 1; next } s && $3 == f { print $1; exit }' "$TMP/$DSC")
got=$(sha256sum "$TMP/$TARBALL" | cut -d' ' -f1)
[ -n "$want" ] && [ "$want" = "$got" ] || die "$TARBALL: sha256 $got does not match $DSC ($want)"
tar -xJf "$TMP/$TARBALL" -C "$TMP" "fuse-$VER/example" 2>/dev/null || die "$TARBALL has no fuse-$VER/example"
SRC=$TMP/fuse-$VER/example/passthrough_hp.cc
if ! grep -q fuse_loop_cfg_set_max_threads "$SRC"; then
  sed -i 's/fuse_loop_cfg_set_idle_threads(loop_config, fs.num_threads);/fuse_loop_cfg_set_max_threads(loop_config, fs.num_threads); &/' "$SRC"
  grep -q fuse_loop_cfg_set_max_threads "$SRC" || die "could not patch $SRC to set the worker limit"
fi
mkdir -p "$DEST" || die "cannot create $DEST"
# Built in DEST and renamed, so an interrupted build never leaves a binary that looks done.
# shellcheck disable=SC2046  # pkg-config prints a list of flags
g++ -O2 -std=c++17 -w -o "$DEST/.passthrough_hp.$$" "$SRC" $(pkg-config --cflags --libs fuse3) \
  -lpthread || { rm -f "$DEST/.passthrough_hp.$$"; die "could not build passthrough_hp $VER"; }
mv "$DEST/.passthrough_hp.$$" "$BIN"
echo "$BIN"
