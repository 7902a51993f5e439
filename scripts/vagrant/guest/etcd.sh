#!/usr/bin/env bash
# cp (as root): etcd with TLS and client-certificate auth as a transient systemd unit, the
# users and roles of docs/control-plane.md, then the cluster config applied to it.
#
#   etcd.sh PRIV_IP PKI_DIR        PKI_DIR: ca.pem, member*.pem, user-{root,admin,ca}*.pem
set -euo pipefail
ip=$1 pki=$2
e=/etc/nodeproxy/etcd
install -d -m 0700 $e /var/lib/npv-etcd
install -m 0644 "$pki/ca.pem" $e/ca.pem
for f in member user-root user-admin user-ca; do
  install -m 0644 "$pki/$f.pem" $e/$f.pem
  install -m 0600 "$pki/$f-key.pem" $e/$f-key.pem
done
rm -rf "$pki"
ctl() {
  ETCDCTL_API=3 etcdctl --endpoints https://127.0.0.1:2379 --cacert $e/ca.pem \
    --cert $e/user-root.pem --key $e/user-root-key.pem --dial-timeout 5s --command-timeout 20s "$@"
}
tls="--cert-file $e/member.pem --key-file $e/member-key.pem --trusted-ca-file $e/ca.pem"
tls+=" --client-cert-auth --peer-cert-file $e/member.pem --peer-key-file $e/member-key.pem"
tls+=" --peer-trusted-ca-file $e/ca.pem --peer-client-cert-auth"
systemctl reset-failed npv-etcd 2>/dev/null || true
# shellcheck disable=SC2086
systemd-run -q --unit=npv-etcd -p Restart=on-failure /usr/local/bin/etcd --name cp \
  --data-dir /var/lib/npv-etcd/data \
  --listen-client-urls "https://$ip:2379,https://127.0.0.1:2379" \
  --advertise-client-urls "https://$ip:2379" \
  --listen-peer-urls https://127.0.0.1:2380 --initial-advertise-peer-urls https://127.0.0.1:2380 \
  --initial-cluster cp=https://127.0.0.1:2380 --max-txn-ops 200000 \
  --max-request-bytes 67108864 $tls
for _ in $(seq 240); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.5; done
ctl endpoint health
if [ ! -e /var/lib/npv-etcd/roles-done ]; then
  ctl user add root --no-password >/dev/null
  ctl role add root >/dev/null
  ctl user grant-role root root >/dev/null
  ctl role add nodeproxy-admin >/dev/null
  ctl role grant-permission nodeproxy-admin readwrite --prefix /nodeproxy/ >/dev/null
  ctl user add admin --no-password >/dev/null
  ctl user grant-role admin nodeproxy-admin >/dev/null
  ctl role add nodeproxy-reader >/dev/null
  ctl role grant-permission nodeproxy-reader read --prefix /nodeproxy/v1/ >/dev/null
  for n in node1 node2; do
    ctl role add "nodeproxy-node-$n" >/dev/null
    ctl role grant-permission "nodeproxy-node-$n" readwrite "/nodeproxy/nodes/v1/$n" >/dev/null
    ctl user add "$n" --no-password >/dev/null
    ctl user grant-role "$n" nodeproxy-reader >/dev/null
    ctl user grant-role "$n" "nodeproxy-node-$n" >/dev/null
  done
  ctl user add ca --no-password >/dev/null
  ctl user grant-role ca nodeproxy-reader >/dev/null
  ctl auth enable
  touch /var/lib/npv-etcd/roles-done
fi
store="etcd://127.0.0.1:2379?ca=$e/ca.pem&cert=$e/user-admin.pem&key=$e/user-admin-key.pem&server-name=etcd"
# Quoted: an unquoted & in the URL would end the assignment when the file is sourced.
printf "NODEPROXY_STORE='%s'\n" "$store" > $e/admin.env
NODEPROXY_STORE=$store /opt/nodeproxy/venv/bin/nodeproxy config apply /etc/nodeproxy/config.yaml
