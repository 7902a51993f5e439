#!/usr/bin/env bash
# Provision the running cluster over ssh (faster than vagrant's provisioners under TCG).
#
#   provision.sh SSH_CONFIG BUNDLE_DIR
#
# BUNDLE_DIR holds venv.tar (host-built, see run-suite.sh), guest/ (scripts/vagrant/guest) and, when the
# repository has them, systemd/ (the real units).  NPV_CA_LIFETIME sets the CA service's
# certificate lifetime (short, so rotation happens during the tests); NPV_NODE_LIFETIME the
# bootstrap node certificates' (short, so the agents must renew them during the tests).
#
# cp also runs the waypoint default/waypoint (cluster.yaml) on its own private address, as the
# packaged nodeproxy-waypoint@ unit: `nodeproxy install --systemd --waypoint` lays it down, the
# node credentials for node "cp" sit where the unit's LoadCredential= expects them
# (/etc/nodeproxy/{node-cert,node-key,bundle}.pem), and it starts while the nodes provision.
set -euo pipefail
cfg=$1 bundle=$2
priv=${NPV_PRIV_CIDR_PREFIX:-172.30.187}
lifetime=${NPV_CA_LIFETIME:-90s}
node_lifetime=${NPV_NODE_LIFETIME:-180s}
np=/opt/nodeproxy/venv/bin/nodeproxy
s() { local vm=$1; shift; ssh -F "$cfg" "$vm" "$@"; }

echo "--> copy bundle + install (cp, node1, node2 in parallel)"
pids=()
for vm in cp node1 node2; do
  ( tar -C "$bundle" -cf - . | s "$vm" 'rm -rf /tmp/npv && mkdir /tmp/npv && tar -C /tmp/npv -xf - && sudo /tmp/npv/guest/install.sh' 2>&1 | sed "s/^/    [$vm] /" ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for vm in cp node1 node2; do
  s "$vm" test -x $np || { echo "install failed on $vm" >&2; exit 1; }
done

echo "--> cp: etcd (TLS, client certificates, roles; docs/control-plane.md), config applied"
# The PKI is made on the host with openssl (scripts/vagrant/etcd-pki.sh); each VM gets only
# the CA certificate and its own client certificate.  Debian's etcd binaries (host package
# etcd-server, same Debian 12) are copied to cp.
pki=$(dirname "$bundle")/etcd-pki
"$(dirname "$0")/etcd-pki.sh" "$pki" "$priv.10" root admin ca node1 node2
store() {  # USER HOST: the agent-side etcd:// URL for USER
  echo "etcd://$2:2379?ca=/etc/nodeproxy/etcd/ca.pem&cert=/etc/nodeproxy/etcd/user-$1.pem&key=/etc/nodeproxy/etcd/user-$1-key.pem&server-name=etcd"
}
tar -C /usr/bin -cf - etcd etcdctl | s cp 'sudo tar -C /usr/local/bin -xf -'
tar -C "$pki" -cf - ca.pem member.pem member-key.pem user-root.pem user-root-key.pem \
    user-admin.pem user-admin-key.pem user-ca.pem user-ca-key.pem \
  | s cp 'sudo rm -rf /tmp/npv-etcd-pki && sudo mkdir -m 0700 /tmp/npv-etcd-pki && sudo tar -C /tmp/npv-etcd-pki -xf -'
s cp sudo /tmp/npv/guest/etcd.sh "$priv.10" /tmp/npv-etcd-pki 2>&1 | sed "s/^/    [cp] /"

echo "--> cp: CA, node certificates ($node_lifetime), CA service (lifetime $lifetime; placement from etcd)"
s cp sudo bash -seu <<SH
[ -d /var/lib/nodeproxy/ca ] || $np ca init --dir /var/lib/nodeproxy/ca
install -d -m 0700 /root/npv-certs
for n in node1 node2; do
  $np ca issue-node --dir /var/lib/nodeproxy/ca --node \$n --out-cert /root/npv-certs/\$n.crt \
    --out-key /root/npv-certs/\$n.key --out-bundle /root/npv-certs/bundle.pem --force \
    --lifetime $node_lifetime
done
echo 'NODEPROXY_CA_ARGS="--dir /var/lib/nodeproxy/ca --config $(store ca 127.0.0.1) --listen 0.0.0.0:15012 --lifetime $lifetime"' > /etc/nodeproxy/ca.env
systemctl enable -q nodeproxy-ca
systemctl restart nodeproxy-ca
# The waypoint's node credentials (node "cp": only the waypoint's identity), at the paths of
# the unit's LoadCredential=.
$np ca issue-node --dir /var/lib/nodeproxy/ca --node cp --out-cert /etc/nodeproxy/node-cert.pem \
  --out-key /etc/nodeproxy/node-key.pem --out-bundle /etc/nodeproxy/bundle.pem --force
SH

echo "--> cp: waypoint default/waypoint on $priv.10 (nodeproxy install --systemd --waypoint; background)"
wp_args="--config /etc/nodeproxy/config.yaml --ca-address https://$priv.10:15012 --listen-ip $priv.10"
wp_args+=" --readiness-addr 0.0.0.0:15121 --metrics-addr 0.0.0.0:15120 --admin-addr 127.0.0.1:15100"
(
s cp sudo bash -seu <<SH 2>&1 | sed "s/^/    [cp] /"
# Pod ranges: the waypoint tunnels to the pods (via their node), and answers the clients' agents.
ip route replace 10.251.1.0/24 via $priv.11 dev eth1
ip route replace 10.251.2.0/24 via $priv.12 dev eth1
$np install --systemd --waypoint default/waypoint --waypoint-args "$wp_args"
unit="nodeproxy-waypoint@\$(systemd-escape default/waypoint).service"
# Type=notify: returns once the waypoint sent READY=1 (certificate issued, listening).
if ! systemctl enable -q --now "\$unit"; then
  systemctl status --no-pager "\$unit" || true
  journalctl -u "\$unit" --no-pager -n 40
  exit 1
fi
echo "\$unit: \$(systemctl is-active "\$unit")"
SH
) &
wp_pid=$!

echo "--> nodes: node certificate, pods, agent"
declare -A pods=([node1]="client-0:10.251.1.2 intruder-0:10.251.1.3"
                 [node2]="echo-0:10.251.2.2 web-v1:10.251.2.3 web-v2:10.251.2.4")
pids=()
for i in 1 2; do
  vm=node$i other=$((3 - i))
  (
    s cp sudo tar -C /root/npv-certs -cf - "$vm.crt" "$vm.key" bundle.pem \
      | s "$vm" 'rm -rf /tmp/npv-certs && mkdir -m 0700 /tmp/npv-certs && tar -C /tmp/npv-certs -xf -'
    tar -C "$pki" -cf - ca.pem "user-$vm.pem" "user-$vm-key.pem" \
      | s "$vm" 'sudo install -d -m 0700 /etc/nodeproxy/etcd && sudo tar -C /etc/nodeproxy/etcd -xf -'
    s "$vm" sudo bash -seu <<SH 2>&1 | sed "s/^/    [$vm] /"
c=/tmp/npv-certs
install -m 0644 \$c/$vm.crt /etc/nodeproxy/node.crt
install -m 0600 \$c/$vm.key /etc/nodeproxy/node.key
install -m 0644 \$c/bundle.pem /etc/nodeproxy/bundle.pem
rm -rf \$c
echo 'NODEPROXY_RUN_ARGS="--config $(store $vm $priv.10) --node $vm --ca-address https://$priv.10:15012 --node-cert /etc/nodeproxy/node.crt --node-key /etc/nodeproxy/node.key --ca-bundle /etc/nodeproxy/bundle.pem --state-dir /var/lib/nodeproxy"' > /etc/nodeproxy/agent.env
/opt/npv-test/pods.sh $i $other $priv ${pods[$vm]}
systemctl enable -q nodeproxy
systemctl restart nodeproxy
SH
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
wait "$wp_pid" || { echo "the waypoint did not start on cp" >&2; exit 1; }

echo "--> wait for agents and the waypoint ready (/healthz/ready on 15021, cp: 15121)"
for spec in node1:15021:nodeproxy cp:15121:nodeproxy-waypoint@default-waypoint node2:15021:nodeproxy; do
  IFS=: read -r vm port unit <<<"$spec"
  for t in $(seq 1 90); do
    if s "$vm" python3 - "$port" <<'PY' 2>/dev/null; then break; fi
import urllib.request, sys
url = f"http://127.0.0.1:{sys.argv[1]}/healthz/ready"
sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)
PY
    if [ "$t" = 90 ]; then
      echo "$unit on $vm not ready after 180 s" >&2
      s "$vm" sudo journalctl -u "$unit" --no-pager -n 40 >&2 || true
      exit 1
    fi
    sleep 2
  done
  echo "    [$vm] $unit ready"
done
