#!/usr/bin/env bash
# First run: install what is needed (as root on Debian), build, create the default store with
# a demo encrypted disk holding an ext4 filesystem, mount the store, and say where.
#   ENCIMG_STORE      store directory (default: $XDG_DATA_HOME/encimg or ~/.local/share/encimg)
#   ENCIMG_DEMO_MNT   mountpoint (default: $XDG_RUNTIME_DIR/encimg or /tmp/encimg-$USER)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fdisk >/dev/null || need+=(fdisk)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "demo: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "demo: please install ${need[*]} (sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "demo: cargo is needed (https://rustup.rs)" >&2; exit 1; }

echo "demo: building (cargo build --release)"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/encimg"

"$BIN" init
if ! "$BIN" info disks/demo >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/root"
  cat > "$tmp/root/HELLO.txt" <<TXT
This file lives in an ext4 filesystem inside disks/demo, an encimg disk encrypted with
AES-256-XTS under the store's service key. You are reading it through the FUSE mount.
TXT
  truncate -s 256M "$tmp/demo.raw"
  mkfs.ext4 -q -L encimg-demo -d "$tmp/root" "$tmp/demo.raw"
  "$BIN" import "$tmp/demo.raw" disks/demo --encrypt
  echo "demo: created disks/demo (256 MiB, encrypted, ext4 inside)"
fi

MNT="${ENCIMG_DEMO_MNT:-${XDG_RUNTIME_DIR:-/tmp}/encimg}"
[ -n "${XDG_RUNTIME_DIR:-}" ] || MNT="${ENCIMG_DEMO_MNT:-/tmp/encimg-$(id -un)}"
mkdir -p "$MNT"
if grep -q " $MNT fuse" /proc/mounts; then
  echo "demo: already mounted at $MNT"
else
  "$BIN" mount "$MNT"
fi

cat <<MSG

encimg store:  $("$BIN" info disks/demo --json | sed -n 's/.*"file": "\(.*\)\/disks\/demo.eimg".*/\1/p')
mounted at:    $MNT
  ls -l $MNT/disks                       # plaintext views of the encrypted disks
  mkdir -p /mnt/demo && mount -o loop $MNT/disks/demo /mnt/demo && cat /mnt/demo/HELLO.txt
  umount /mnt/demo                       # then:
  $BIN umount $MNT
binary:        $BIN   (install -m755 $BIN /usr/local/bin/ to use 'encimg')
MSG
