#!/usr/bin/env bash
# Build the Debian package: target/debian/encimg_VERSION-1_ARCH.deb.
#
# It holds the binary, the man pages and the bash/zsh/fish completions (generated here from
# the clap definitions by the binary itself), mount.fuse.encimg, the systemd service
# encimg.service and an example mount unit. Install it with `sudo apt install ./target/debian/encimg_*.deb`.
#
# cargo-deb is installed on first use into $ENCIMG_TOOLS (default /var/tmp/encimg-tools),
# outside the clone, so fresh clones on the same machine reuse it. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${ENCIMG_TOOLS:-/var/tmp/encimg-tools}
deb_version=3.8.0
if ! "$tools/bin/cargo-deb" --version 2>/dev/null | grep -qx "cargo-deb $deb_version"; then
  echo "deb.sh: installing cargo-deb $deb_version into $tools" >&2
  cargo install --quiet --locked --root "$tools" cargo-deb --version "$deb_version" >&2
fi
command -v dpkg-deb >/dev/null || { echo "deb.sh: dpkg-deb is needed (Debian's dpkg)" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet
assets=$PWD/target/deb-assets                  # where Cargo.toml's [package.metadata.deb] looks
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$target/release/encimg" man --dir "$assets/man" >&2
"$target/release/encimg" completions bash > "$assets/completions/encimg.bash"
"$target/release/encimg" completions zsh > "$assets/completions/_encimg"
"$target/release/encimg" completions fish > "$assets/completions/encimg.fish"
if [ "$target" != "$PWD/target" ]; then            # cargo-deb takes the binary from ./target
  mkdir -p target/release && cp "$target/release/encimg" target/release/encimg
fi

out=$("$tools/bin/cargo-deb" --no-build --strip --quiet --output target/debian)
echo "$out"
