#!/usr/bin/env bash
# Run the whole test suite: installs what the tests need (as root, on Debian), then
# `cargo test`. Real-mount tests need root, /dev/fuse and loop devices; they run here.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fio >/dev/null || need+=(fio)
command -v losetup >/dev/null || need+=(mount)
command -v python3 >/dev/null || need+=(python3)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)      # image formats (import/export)
command -v fdisk >/dev/null || need+=(fdisk)
command -v man >/dev/null || need+=(man-db)
command -v jq >/dev/null || need+=(jq)                    # the README's decrypt recipe
command -v pykmip-server >/dev/null || need+=(python3-pykmip)   # key services (tests/kms.rs)
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing ${need[*]}; install them (sudo apt-get install -y ${need[*]})" >&2
  fi
fi
# The interop tests decrypt with OpenSSL through Python's cryptography package.
if ! python3 -c 'import cryptography' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-cryptography >/dev/null \
      || pip install -q cryptography
  else
    pip install -q --user cryptography
  fi
fi

# A real S3 server for tests/s3.rs: s3s-fs from crates.io, built once per machine into
# /var/tmp/encimg-tools (outside the clone).
tools=${ENCIMG_TOOLS:-/var/tmp/encimg-tools}
if [ ! -x "$tools/bin/s3s-fs" ]; then
  echo "test.sh: building s3s-fs (once) into $tools" >&2
  cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary --root "$tools"
fi
export ENCIMG_S3S_FS=$tools/bin/s3s-fs

# The Debian package, built here so tests/package.rs can install it (root only; it
# installs system-wide and purges afterwards).
if [ "$(id -u)" = 0 ] && command -v dpkg-deb >/dev/null; then
  ENCIMG_DEB=$PWD/$(bash contrib/deb.sh | tail -1)
  export ENCIMG_DEB
fi

# The suite's output, then one line a person can read: the overall result and the counts
# summed over every test binary (criterion's smoke runs and fio output come before it).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS
status=0
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The real-mount tests again, every mount serving through FUSE over io_uring
# (`mount --io-uring`, here through ENCIMG_IO_URING), where the kernel has it (Linux 6.14+):
# the fuse module's enable_uring parameter is on for this pass and put back after.
uring=/sys/module/fuse/parameters/enable_uring
if [ $# = 0 ] && [ "$(id -u)" = 0 ] && [ -w "$uring" ]; then
  was=$(cat "$uring")
  trap 'echo "$was" > "$uring"; rm -f "$log"' EXIT
  echo Y > "$uring"
  echo "test.sh: the real-mount tests again, through FUSE over io_uring" >&2
  ENCIMG_IO_URING=1 cargo test --no-fail-fast --test mount --test page_cache --test adversarial \
    --test crash_kill --test crash_reencrypt 2>&1 | tee -a "$log" || status=$?
fi
awk -v status="$status" -v secs="$((SECONDS - start))" -f contrib/test-summary.awk "$log"
exit "$status"
