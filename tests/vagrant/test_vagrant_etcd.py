"""The shared control plane: etcd on cp (TLS, client certificates, roles), the agents on
node1/node2 and the CA service read the config from it (docs/control-plane.md).

A policy applied with ``nodeproxy config apply`` on cp is enforced on the nodes; applying
the original config again lifts it (the cluster is left as the other tests expect it).
"""

from __future__ import annotations

import json

from tests.vagrant.cluster import Cluster, poll

NP = "/opt/nodeproxy/venv/bin/nodeproxy"
ADMIN = "set -a; . /etc/nodeproxy/etcd/admin.env; set +a;"
DENY_CLIENT = """\
policies:
- name: npv-deny-client
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]]]
"""


def nodes(cluster: Cluster, *extra: str) -> tuple[int, dict[str, object]]:
    res = cluster.sh("cp", f"{ADMIN} {NP} nodes -o json {' '.join(extra)}", check=False)
    return res.rc, json.loads(res.out or "{}")


def test_agents_and_ca_read_the_config_from_etcd(cluster: Cluster) -> None:
    for vm in ("node1", "node2"):
        _, dump = cluster.http_get(vm, "http://127.0.0.1:15000/config_dump")
        store = json.loads(dump)["configStore"]
        assert store["state"] == "live", store
        assert store["url"].startswith("etcd://172.30.187.10:2379"), store
    rc, fleet = nodes(cluster, "--wait", "60", "--expect", "2")
    assert rc == 0, fleet
    names = {m["name"] for m in fleet["members"]}  # type: ignore[attr-defined]
    assert {"node1", "node2"} <= names, fleet
    ca = cluster.sh("cp", "cat /etc/nodeproxy/ca.env").out
    assert "--config etcd://127.0.0.1:2379" in ca
    # The roles: a node's certificate may read the config but not write it.
    node1 = ("etcd://172.30.187.10:2379?ca=ca.pem&cert=user-node1.pem&key=user-node1-key.pem"
             "&server-name=etcd")
    denied = cluster.sh("node1", f"cd /etc/nodeproxy/etcd && {NP} config apply "
                                 f"/etc/nodeproxy/config.yaml --store '{node1}'", check=False)
    assert denied.rc != 0
    assert "permission denied" in denied.err, denied


def test_a_policy_applied_on_cp_is_enforced_on_the_nodes(cluster: Cluster) -> None:
    assert cluster.echo("client-0", "echo-0", "before").rc == 0
    cluster.sh("cp", f"cat > /tmp/npv-deny.yaml <<'YAML'\n{DENY_CLIENT}YAML")
    try:
        applied = cluster.sh(
            "cp", f"{ADMIN} {NP} config apply /etc/nodeproxy/config.yaml /tmp/npv-deny.yaml")
        assert "/nodeproxy/v1/policies/default/npv-deny-client" in applied.out, applied
        rc, fleet = nodes(cluster, "--wait", "60", "--expect", "2")
        assert rc == 0, fleet
        poll(lambda: cluster.echo("client-0", "echo-0", "denied?").rc != 0, 60,
             lambda: "client-0 still reaches echo-0 after the deny policy was applied")
    finally:
        cluster.sh("cp", f"{ADMIN} {NP} config apply /etc/nodeproxy/config.yaml")
    rc, fleet = nodes(cluster, "--wait", "60", "--expect", "2")
    assert rc == 0, fleet
    poll(lambda: cluster.echo("client-0", "echo-0", "again").rc == 0, 60,
         lambda: "client-0 does not reach echo-0 after the deny policy was removed")
