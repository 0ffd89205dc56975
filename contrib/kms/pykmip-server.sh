#!/usr/bin/env bash
# A PyKMIP server (Debian python3-pykmip) with TLS client-certificate authentication, for
# trying encimg's KMIP key service and for its tests.
#
#   bash contrib/kms/pykmip-server.sh [--daemon] DIR [PORT]
#   bash contrib/kms/pykmip-server.sh --stop DIR
#
# Makes, in DIR (once): a CA, a server certificate for 127.0.0.1 and a client certificate
# with its key (ECDSA P-256, clientAuth), the server's config, policy directory and SQLite
# database; then runs the server in the foreground on 127.0.0.1:PORT (default 5696), its
# log in DIR/server.log. The region URI to use is written to DIR/uri:
#   kmip://127.0.0.1:PORT?ca=DIR/ca.pem&cert=DIR/client.pem&key=DIR/client.key
# Stop it with Ctrl-C or SIGTERM. With --daemon it runs in the background in a process
# group of its own (PyKMIP forks a process per client) and the script returns once the
# server listens; --stop DIR stops that group. Needs openssl and python3-pykmip.
set -euo pipefail
mode=foreground
case ${1:-} in
--daemon) mode=daemon; shift ;;
--stop)
  pid=$(cat "${2:?usage: pykmip-server.sh --stop DIR}/pid" 2>/dev/null) || exit 0
  kill -TERM -- "-$pid" 2>/dev/null || true
  sleep 0.3
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$2/pid"
  exit 0
  ;;
esac
dir=${1:?usage: pykmip-server.sh [--daemon] DIR [PORT]}
port=${2:-5696}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
umask 077
cd "$dir"

if [ ! -f client.key ]; then
  ec() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }
  ec ca.key
  openssl req -x509 -new -key ca.key -subj "/CN=encimg test KMIP CA" -days 3650 -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  ec server.key
  openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.pem 2>/dev/null
  ec client.key.tmp
  openssl pkcs8 -topk8 -nocrypt -in client.key.tmp -out client.key && rm client.key.tmp
  openssl req -new -key client.key -subj "/CN=encimg" -out client.csr 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' > client.ext
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out client.pem 2>/dev/null
  rm -f ./*.csr ./*.ext
fi
mkdir -p policies
cat > server.conf <<CONF
[server]
hostname=127.0.0.1
port=$port
certificate_path=$dir/server.pem
key_path=$dir/server.key
ca_path=$dir/ca.pem
auth_suite=TLS1.2
enable_tls_client_auth=True
policy_path=$dir/policies
database_path=$dir/pykmip.db
logging_level=INFO
CONF
echo "kmip://127.0.0.1:$port?ca=$dir/ca.pem&cert=$dir/client.pem&key=$dir/client.key" > uri
if [ "$mode" = daemon ]; then
  setsid pykmip-server -f "$dir/server.conf" -l "$dir/server.log" </dev/null >/dev/null 2>&1 &
  echo $! > pid
  for _ in $(seq 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "KMIP server on 127.0.0.1:$port (pid $(cat pid)); region URI in $dir/uri"
      exit 0
    fi
    kill -0 "$(cat pid)" 2>/dev/null || { echo "pykmip-server.sh: the server exited; see $dir/server.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "pykmip-server.sh: the server is not listening after 30 s; see $dir/server.log" >&2
  exit 1
fi
exec pykmip-server -f "$dir/server.conf" -l "$dir/server.log"
