#!/usr/bin/env bash
# A SoftHSM2 token (Debian softhsm2) in a directory of its own, for trying encimg's PKCS#11
# key service and for its tests.
#
#   bash contrib/kms/softhsm-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf (tokens in DIR/tokens), a user PIN in DIR/pin (mode 0600) and
# initializes token LABEL (default encimg) in a free slot, once. Use it with
#   export SOFTHSM2_CONF=DIR/softhsm2.conf
# and the region URI it writes to DIR/uri:
#   pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=LABEL?pin-source=DIR/pin
set -euo pipefail
dir=${1:?usage: softhsm-token.sh DIR [LABEL]}
label=${2:-encimg}
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
umask 077
module=/usr/lib/softhsm/libsofthsm2.so
[ -f "$module" ] || module=$(find /usr/lib -name libsofthsm2.so -print -quit)
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF=$dir/softhsm2.conf
if [ ! -f "$dir/pin" ]; then
  head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/pin"
  head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/so-pin"
fi
if ! softhsm2-util --show-slots | grep -q "Label: *$label *\$"; then
  softhsm2-util --init-token --free --label "$label" --pin "$(cat "$dir/pin")" --so-pin "$(cat "$dir/so-pin")" >/dev/null
fi
echo "pkcs11:module-path=$module;token=$label?pin-source=$dir/pin" > "$dir/uri"
cat "$dir/uri"
