#!/usr/bin/env bash
# Provision the running cluster over ssh (faster than vagrant's provisioners under TCG).
#
#   provision.sh SSH_CONFIG BUNDLE_DIR
#
# BUNDLE_DIR holds venv.tar (host-built, see run-suite.sh), guest/ (scripts/vagrant/guest) and, when the
# repository has them, systemd/ (the real units).  NPV_CA_LIFETIME sets the CA service's
# certificate lifetime (short, so rotation happens during the tests); NPV_NODE_LIFETIME the
# bootstrap node certificates' (short, so the agents must renew them during the tests).
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

echo "--> cp: CA, node certificates ($node_lifetime), CA service (lifetime $lifetime)"
s cp sudo bash -seu <<SH
[ -d /var/lib/nodeproxy/ca ] || $np ca init --dir /var/lib/nodeproxy/ca
install -d -m 0700 /root/npv-certs
for n in node1 node2; do
  $np ca issue-node --dir /var/lib/nodeproxy/ca --node \$n --out-cert /root/npv-certs/\$n.crt \
    --out-key /root/npv-certs/\$n.key --out-bundle /root/npv-certs/bundle.pem --force \
    --lifetime $node_lifetime
done
echo 'NODEPROXY_CA_ARGS="--dir /var/lib/nodeproxy/ca --config /etc/nodeproxy/config.yaml --listen 0.0.0.0:15012 --lifetime $lifetime"' > /etc/nodeproxy/ca.env
systemctl enable -q nodeproxy-ca
systemctl restart nodeproxy-ca
SH

echo "--> nodes: node certificate, pods, agent"
declare -A pods=([node1]="client-0:10.251.1.2 intruder-0:10.251.1.3" [node2]="echo-0:10.251.2.2")
pids=()
for i in 1 2; do
  vm=node$i other=$((3 - i))
  (
    s cp sudo tar -C /root/npv-certs -cf - "$vm.crt" "$vm.key" bundle.pem \
      | s "$vm" 'rm -rf /tmp/npv-certs && mkdir -m 0700 /tmp/npv-certs && tar -C /tmp/npv-certs -xf -'
    s "$vm" sudo bash -seu <<SH 2>&1 | sed "s/^/    [$vm] /"
c=/tmp/npv-certs
install -m 0644 \$c/$vm.crt /etc/nodeproxy/node.crt
install -m 0600 \$c/$vm.key /etc/nodeproxy/node.key
install -m 0644 \$c/bundle.pem /etc/nodeproxy/bundle.pem
rm -rf \$c
echo 'NODEPROXY_RUN_ARGS="--config /etc/nodeproxy/config.yaml --node $vm --ca-address https://$priv.10:15012 --node-cert /etc/nodeproxy/node.crt --node-key /etc/nodeproxy/node.key --ca-bundle /etc/nodeproxy/bundle.pem --state-dir /var/lib/nodeproxy"' > /etc/nodeproxy/agent.env
/opt/npv-test/pods.sh $i $other $priv ${pods[$vm]}
systemctl enable -q nodeproxy
systemctl restart nodeproxy
SH
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

echo "--> wait for agents ready (/healthz/ready on 15021)"
for vm in node1 node2; do
  for t in $(seq 1 90); do
    if s "$vm" python3 - <<'PY' 2>/dev/null; then break; fi
import urllib.request, sys
sys.exit(0 if urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=3).status == 200 else 1)
PY
    if [ "$t" = 90 ]; then
      echo "agent on $vm not ready after 180 s" >&2
      s "$vm" sudo journalctl -u nodeproxy --no-pager -n 40 >&2 || true
      exit 1
    fi
    sleep 2
  done
  echo "    [$vm] ready"
done
