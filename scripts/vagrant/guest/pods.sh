#!/usr/bin/env bash
# Create this node's pods the way a CNI plugin would: one network namespace per pod, a veth
# pair (node side gets the pod gateway /32, pod side the pod IP /32, default route via the
# gateway), host routes to the local pods, and a route to the other node's pod range via its
# private IP.  Each pod also gets a cgroup v2 directory, /sys/fs/cgroup/nodeproxy-lab/<netns>
# (as meshlab's pods): eBPF capture (--redirect ebpf) attaches there, so a pod's client
# processes run inside it (tests/vagrant/cluster.py).  Then start each pod's app (an echo
# server on 8080) as a transient unit.
#
#   pods.sh NODE_INDEX OTHER_INDEX PRIV_PREFIX POD[:IP] ...      e.g. pods.sh 1 2 172.30.187 client-0:10.251.1.2
set -euo pipefail
i=$1 other=$2 priv=$3
shift 3
gw=10.251.$i.1
n=0
for spec in "$@"; do
  pod=${spec%%:*} ip=${spec#*:}
  ns=pv-$pod
  n=$((n + 1))
  veth=pvh$n
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
  fi
  ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip addr replace "$gw/32" dev "$veth"
  ip link set "$veth" up
  ip route replace "$ip/32" dev "$veth" src "$gw"
  ip -n "$ns" link set lo up
  ip -n "$ns" addr replace "$ip/32" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route replace "$gw/32" dev eth0 scope link
  ip -n "$ns" route replace default via "$gw" dev eth0 src "$ip"
  mkdir -p "/sys/fs/cgroup/nodeproxy-lab/$ns"
  systemctl is-active -q "pv-app-$pod" || systemd-run -q --unit="pv-app-$pod" \
    ip netns exec "$ns" /usr/bin/python3 /opt/npv-test/podnet.py serve 8080
done
ip route replace "10.251.$other.0/24" via "$priv.$((10 + other))" dev eth1
echo "pods: node$i has $n pod(s); 10.251.$other.0/24 via $priv.$((10 + other))"
