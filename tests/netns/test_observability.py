"""Observability on a real mesh (root): `explain` agrees with what the data path did, scraped
counters equal the bytes and connections actually exchanged on both reporters, and the
operator CLI works inside a node's netns.  One 2-node mesh (iptables) for the whole module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.waiting import wait_until
from tests.netns.mesh_fixtures import (
    NODEPROXY,
    ROLES,
    SERVICES,
    WEB_PORT,
    WEB_VIP,
    MeshEnv,
    mesh_env,
    metric_value,
    poll,
)

pytestmark = pytest.mark.privileged

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
FAILED = "istio_tcp_connections_failed_total"
SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/shop/sa/server"
DENY_DEFAULT_TO_SHOP = {
    "name": "deny-default", "namespace": "shop", "scope": "Namespace", "action": "Deny",
    "rules": [[[{"namespaces": ["default"]}]]],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshEnv]:
    workdir: Path = tmp_path_factory.mktemp("observability")
    with mesh_env(workdir, "iptables", roles=ROLES, services=SERVICES) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _reset(env: MeshEnv) -> Iterator[None]:
    env.reset()
    yield
    env.reset()


def cli_in_node(env: MeshEnv, node: str, *args: str) -> tuple[int, str, str]:
    """`nodeproxy ARGS` inside the node's netns (where the agent's admin API listens)."""
    proc = env.cluster.exec(node, [*NODEPROXY, *args])
    return proc.returncode, proc.stdout, proc.stderr


def explain(env: MeshEnv, node: str, source: str, target: str) -> dict[str, Any]:
    code, out, err = cli_in_node(env, node, "explain", "--from", source, "--to", target,
                                 "-o", "json")
    assert code == 0, err
    return dict(json.loads(out))


def delta(before: str, after: str, name: str, **labels: str) -> float:
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)


def test_allowed_connection_counts_exact_bytes_on_both_reporters(env: MeshEnv) -> None:
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    doc = explain(env, "node1", "n1p1", target)
    assert doc["verdict"] == "allowed"
    [hop] = doc["outcomes"]
    assert (hop["path"], hop["endpoint"], hop["via"]) == \
        ("HBONE", "shop/n2p1", f"{env.ip('n2p1')}:15008")
    assert hop["expectedIdentities"] == [SERVER_ID]
    assert doc["source"]["presentedIdentity"] == CLIENT_ID

    before = {n: env.mesh.metrics(n) for n in env.node_names}
    [res] = env.connect("n1p1", target, "M" * 1000)
    assert res["ok"], f"{res}\n{env.logs()}"
    request, response = res["bytes_sent"], res["bytes_received"]
    assert (request, response) == (1000, len(res["reply"].encode()))
    labels = {"source_workload": "n1p1", "source_workload_namespace": "default",
              "source_principal": CLIENT_ID, "destination_workload": "n2p1",
              "destination_workload_namespace": "shop", "destination_principal": SERVER_ID,
              "connection_security_policy": "mutual_tls", "response_flags": "-"}
    for node, reporter in (("node1", "source"), ("node2", "destination")):
        def closed(n: str = node, r: str = reporter) -> bool:
            return delta(before[n], env.mesh.metrics(n), CLOSED, reporter=r, **labels) == 1

        def why(n: str = node) -> str:
            return f"{n}: no closed connection\n{env.logs(n)}"

        poll(closed, 10, why)
        after = env.mesh.metrics(node)
        got = {m: delta(before[node], after, m, reporter=reporter, **labels)
               for m in (OPENED, CLOSED, SENT, RECEIVED)}
        # sent = response bytes (destination -> source), received = request bytes (Istio).
        assert got == {OPENED: 1, CLOSED: 1, SENT: response, RECEIVED: request}, \
            f"{node} reporter={reporter}: {got}"


def test_denied_connection_matches_explain_and_counts_deny(env: MeshEnv) -> None:
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    env.apply_config(env.doc(policies=[DENY_DEFAULT_TO_SHOP]))
    doc = explain(env, "node1", "default/n1p1", target)
    assert doc["verdict"] == "denied"
    [hop] = doc["outcomes"]
    assert (hop["path"], hop["policy"], hop["rule"], hop["responseFlags"]) == \
        ("HBONE", "shop/deny-default", 0, "DENY")

    before = env.mesh.metrics("node2")
    [res] = env.connect("n1p1", target, "MARKER-denied")
    assert not res["ok"]
    assert server.received() == b""
    after = env.mesh.metrics("node2")
    labels = {"reporter": "destination", "source_principal": CLIENT_ID,
              "destination_workload": "n2p1", "response_flags": "DENY"}
    assert delta(before, after, FAILED, **labels) == 1
    assert delta(before, after, OPENED, reporter="destination",
                 destination_workload="n2p1") == 0
    wait_until(lambda: "deny-default" in env.mesh.log("node2"), 5,  # the log writer thread
               lambda: env.mesh.log_tail("node2"))


def test_service_vip_reaches_exactly_the_explained_endpoints(env: MeshEnv) -> None:
    target = f"{WEB_VIP}:{WEB_PORT}"
    doc = explain(env, "node1", env.ip("n1p1"), target)
    assert doc["service"] == "default/web.default.svc.cluster.local"
    assert doc["selection"].startswith("round-robin")
    explained = {h["endpoint"]: h for h in doc["outcomes"]}
    assert set(explained) == {"default/n1p2", "default/n2p2"}
    assert {h["path"] for h in explained.values()} == {"HBONE"}

    servers = {pod: env.serve(pod, int(explained[f"default/{pod}"]["address"].split(":")[1]),
                              tag=f"default/{pod}")
               for pod in ("n1p2", "n2p2")}
    results = env.connect("n1p1", target, "lb", count=10)
    assert all(r["ok"] for r in results), results
    assert {r["tag"] for r in results} == set(explained)
    for server in servers.values():
        assert b"lb" in server.received()


def test_passthrough_matches_explain(env: MeshEnv) -> None:
    server = env.serve("n2p3")  # protocol TCP: outside the mesh
    target = env.addr("n2p3", server.port)
    doc = explain(env, "node1", "n1p1", target)
    [hop] = doc["outcomes"]
    assert (doc["verdict"], hop["path"], hop["via"]) == ("not enforced", "PASSTHROUGH", target)

    before = env.mesh.metrics("node1")
    [res] = env.connect("n1p1", target, "plain")
    assert res["ok"], res
    labels = {"reporter": "source", "source_workload": "n1p1", "destination_workload": "n2p3",
              "connection_security_policy": "unknown"}
    poll(lambda: delta(before, env.mesh.metrics("node1"), CLOSED, **labels) == 1, 10,
         lambda: env.logs("node1"))
    after = env.mesh.metrics("node1")
    assert delta(before, after, SENT, **labels) == res["bytes_received"]
    assert delta(before, after, RECEIVED, **labels) == res["bytes_sent"]


def test_listing_commands_inside_the_node_netns(env: MeshEnv) -> None:
    code, out, err = cli_in_node(env, "node1", "workloads", "-o", "json")
    assert code == 0, err
    assert {w["name"] for w in json.loads(out)} == set(ROLES)
    code, out, err = cli_in_node(env, "node1", "workloads")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE",
                                           "WAYPOINT", "PROTOCOL"]
    code, out, err = cli_in_node(env, "node2", "certificates", "-o", "json")
    assert code == 0, err
    certs = {c["identity"]: c for c in json.loads(out)}
    assert SERVER_ID in certs
    assert certs[SERVER_ID]["chain"][0]["serial"] == certs[SERVER_ID]["serial"]
    # Table form: the workload certificates, then the node certificate used towards the CA.
    code, out, err = cli_in_node(env, "node2", "certificates")
    assert code == 0, err
    assert out.splitlines()[-1].startswith(
        "node certificate spiffe://cluster.local/node/node2 serial "), out
    code, out, err = cli_in_node(env, "node1", "connections")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["WORKLOAD", "DIRECTION", "LOCAL"]
    # Outside the node's netns nothing listens on the admin port: one clear line, exit 1.
    code, out, err = cli_in_node(env, "fabric", "services")
    assert code == 1
    assert err.startswith("error: cannot reach the agent's admin API at 127.0.0.1:15000")


def test_public_readiness_names_no_pod_and_admin_says_which(env: MeshEnv) -> None:
    """15021 listens on every address: its body is counts only.  The detail (pods, errors)
    is on the loopback-only admin API."""
    assert env.mesh.http("node1", 15021, "/healthz/ready") == (200, "ready\n")
    status, body = env.mesh.http("node1", 15000, "/healthz/ready")
    assert status == 200
    assert re.fullmatch(r"ready: [1-9]\d* pod\(s\) enrolled on node1\n", body), body
