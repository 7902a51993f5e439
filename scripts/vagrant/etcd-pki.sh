#!/usr/bin/env bash
# The etcd PKI of docs/control-plane.md, with openssl: one CA (ECDSA P-256), a member
# certificate (serverAuth + clientAuth; SANs DNS:etcd, DNS:localhost, 127.0.0.1 and the given
# member IPs), and a client certificate per etcd user (clientAuth, CN = the user).
#
#   etcd-pki.sh OUT_DIR MEMBER_IP[,MEMBER_IP...] USER...
set -euo pipefail
out=${1:?usage: etcd-pki.sh OUT_DIR MEMBER_IPS USER...} ips=${2:?member IPs}
shift 2
mkdir -p "$out"
cd "$out"
days=30
if [ ! -s ca.pem ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
  openssl req -x509 -new -key ca-key.pem -subj "/CN=nodeproxy etcd CA" -days $days \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem 2>/dev/null
fi
issue() {  # NAME CN EXTENSIONS
  [ -s "$1.pem" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days $days \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
  chmod 0600 "$1-key.pem"
}
sans="DNS:etcd,DNS:localhost,IP:127.0.0.1"
for ip in ${ips//,/ }; do sans+=",IP:$ip"; done
issue member member "$(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth' "$sans")"
for user in "$@"; do
  issue "user-$user" "$user" "extendedKeyUsage=clientAuth"
done
ls "$out" >/dev/null
