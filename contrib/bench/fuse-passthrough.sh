#!/usr/bin/env bash
# Build libfuse's own high-performance passthrough example (example/passthrough_hp.cc, C++,
# multi-threaded, clone_fd, splice) against the libfuse3 installed here, and print its path.
# The benchmarks mount it over a raw file on the same disk: a FUSE daemon with no encryption
# and no cache, written by the FUSE maintainers, is the FUSE ceiling encimg is measured against.
#
# The source is the upstream tarball of the Debian source package the installed libfuse3-dev
# comes from (deb.debian.org; its sha256 checked against that package's .dsc). The binary
# is cached under DEST (default: target/bench in the tree). Needs root only to install packages.
#
#   bash contrib/bench/fuse-passthrough.sh [DEST]     # prints /path/to/passthrough_hp
#   BENCH_PASSTHROUGH=/path/to/passthrough_hp          # run.sh/anatomy.sh use it instead
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/bench}
die() { echo "fuse-passthrough: $*" >&2; exit 1; }

if [ -n "${BENCH_PASSTHROUGH:-}" ]; then
  [ -x "$BENCH_PASSTHROUGH" ] || die "BENCH_PASSTHROUGH=$BENCH_PASSTHROUGH is not executable"
  echo "$BENCH_PASSTHROUGH"; exit 0
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
BIN=$DEST/passthrough_hp-$VER
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

POOL=${DEBIAN_POOL:-http://deb.debian.org/debian/pool/main/f/fuse3}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
TARBALL=fuse3_$VER.orig.tar.xz
DSC=fuse3_$SRCVER.dsc
curl -fsS -o "$TMP/$TARBALL" "$POOL/$TARBALL" || die "could not download $POOL/$TARBALL"
curl -fsS -o "$TMP/$DSC" "$POOL/$DSC" || die "could not download $POOL/$DSC"
want=$(awk -v f="$TARBALL" '/^Checksums-Sha256:/ { s = 1; next } s && $3 == f { print $1; exit }' "$TMP/$DSC")
got=$(sha256sum "$TMP/$TARBALL" | cut -d' ' -f1)
[ -n "$want" ] && [ "$want" = "$got" ] || die "$TARBALL: sha256 $got does not match $DSC ($want)"
tar -xJf "$TMP/$TARBALL" -C "$TMP" "fuse-$VER/example"
mkdir -p "$DEST"
# shellcheck disable=SC2046  # pkg-config prints a list of flags
g++ -O2 -std=c++17 -w -o "$TMP/passthrough_hp" "$TMP/fuse-$VER/example/passthrough_hp.cc" \
  $(pkg-config --cflags --libs fuse3) -lpthread || die "could not build passthrough_hp $VER"
mv "$TMP/passthrough_hp" "$BIN"
echo "$BIN"
