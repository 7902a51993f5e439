"""The real agent on a 2-node namespace cluster, in both redirect backends (root).

One cluster + CA service + two ``nodeproxy run`` agents per backend is shared by the tests of
this module (module-scoped, parametrized fixture); ``env`` puts it back into the base state
after every test (agents running and ready, base config loaded, test servers stopped), so
tests stay independent.  Topology and roles: see ``mesh_fixtures.ROLES``.
"""

from __future__ import annotations

import collections
import re
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from meshlab import Packet
from tests.helpers.waiting import wait_until
from tests.netns.mesh_fixtures import (
    BACKENDS,
    ROLES,
    SERVICES,
    WEB_PORT,
    WEB_TARGET_PORT,
    WEB_VIP,
    MeshEnv,
    mesh_env,
    metric_value,
    netns_state,
    redirect_cli,
    state_diff,
)

pytestmark = pytest.mark.privileged

OPENED = "istio_tcp_connections_opened_total"
FAILED = "istio_tcp_connections_failed_total"


@pytest.fixture(scope="module", params=BACKENDS)
def shared_mesh(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshEnv]:
    workdir = tmp_path_factory.mktemp(f"mesh-{request.param}")
    with mesh_env(workdir, request.param, roles=ROLES, services=SERVICES) as env:
        yield env


@pytest.fixture
def env(shared_mesh: MeshEnv) -> Iterator[MeshEnv]:
    shared_mesh.reset()
    yield shared_mesh
    shared_mesh.reset()


def ok_results(env: MeshEnv, results: list[dict[str, object]], *nodes: str) -> None:
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{len(bad)} of {len(results)} connections failed: {bad[:3]}\n" \
                    + env.logs(*nodes)


def tls_records_to(packets: Sequence[Packet], port: int) -> int:
    """Packets to ``port`` whose payload starts with a TLS 1.2-framed record header."""
    return sum(1 for p in packets
               if p.dport == port and p.payload[:1] in (b"\x16", b"\x17")
               and p.payload[1:3] == b"\x03\x03")


# 1 -------------------------------------------------------------------------------------------
def test_mesh_cross_node_goes_through_hbone(env: MeshEnv) -> None:
    marker = "MARKER-cross-7f3a9"
    server = env.serve("n2p1")
    m1_before = env.mesh.metrics("node1")
    m2_before = env.mesh.metrics("node2")
    cap = env.cluster.capture("node1")
    results = env.connect("n1p1", env.addr("n2p1", server.port), marker)
    pcap = cap.stop()

    ok_results(env, results)
    assert marker.encode() in server.received(), "the destination app never got the marker"
    assert not pcap.contains(marker.encode()), "plaintext marker crossed the node-to-node link"
    pod_flows = [f for f in pcap.flows() if f[0].startswith("10.251.") and
                 f[1].startswith("10.251.")]
    assert (env.ip("n1p1"), env.ip("n2p1")) in {(f[0], f[1]) for f in pod_flows if f[3] == 15008}, \
        f"no n1p1 -> n2p1:15008 flow on the link: {pcap.flows()}"
    not_hbone = [f for f in pod_flows if 15008 not in (f[2], f[3])]
    assert not not_hbone, f"pod-to-pod flows not on port 15008: {not_hbone}"
    assert server.port not in pcap.ports(), "the app port appeared on the node-to-node link"
    assert tls_records_to(pcap.packets, 15008) >= 1, "no TLS record seen towards port 15008"

    # Telemetry: both sides count one mTLS connection n1p1 -> n2p1.
    labels = {"source_workload": "n1p1", "destination_workload": "n2p1",
              "connection_security_policy": "mutual_tls"}
    for node, before, reporter in (("node1", m1_before, "source"),
                                   ("node2", m2_before, "destination")):
        after = env.mesh.metrics(node)
        delta = (metric_value(after, OPENED, reporter=reporter, **labels)
                 - metric_value(before, OPENED, reporter=reporter, **labels))
        assert delta == 1, f"{node} {OPENED}{{reporter={reporter}}} grew by {delta}, not 1"
    m2 = env.mesh.metrics("node2")
    assert metric_value(m2, OPENED, reporter="destination", destination_workload="n2p1",
                        source_principal="spiffe://cluster.local/ns/default/sa/client") >= 1


# 2 -------------------------------------------------------------------------------------------
def test_mesh_same_node_goes_through_hbone(env: MeshEnv) -> None:
    marker = "MARKER-same-41c2e"
    server = env.serve("n1p2")
    before = env.mesh.metrics("node1")
    # Not on the node link: capture on the destination pod's own interface.
    cap = env.cluster.capture("n1p2", "eth0")
    results = env.connect("n1p1", env.addr("n1p2", server.port), marker)
    pcap = cap.stop()

    ok_results(env, results, "node1")
    assert marker.encode() in server.received()
    assert not pcap.contains(marker.encode()), "plaintext marker on the destination pod's eth0"
    flows = pcap.flows()
    assert any(f[0] == env.ip("n1p1") and f[1] == env.ip("n1p2") and f[3] == 15008
               for f in flows), f"no n1p1 -> n1p2:15008 flow: {flows}"
    assert all(15008 in (f[2], f[3]) for f in flows), f"non-HBONE flows on eth0: {flows}"
    assert tls_records_to(pcap.packets, 15008) >= 1

    after = env.mesh.metrics("node1")
    for reporter in ("source", "destination"):
        labels = {"reporter": reporter, "source_workload": "n1p1",
                  "destination_workload": "n1p2", "connection_security_policy": "mutual_tls"}
        delta = metric_value(after, OPENED, **labels) - metric_value(before, OPENED, **labels)
        assert delta == 1, f"node1 {OPENED}{labels} grew by {delta}, not 1"


# 3 -------------------------------------------------------------------------------------------
def test_mesh_service_vip_balances_over_both_nodes(env: MeshEnv) -> None:
    # Endpoints n1p2 (node1) and n2p2 (node2), target port 9080.  The client's agent picks
    # round-robin per endpoint set, so 200 connections split 100/100; we assert each endpoint
    # gets 50 % +- 15 points (70..130), which tolerates any fair choice (round-robin, random
    # with 200 draws is within this band with probability > 0.9999) but fails a sticky or
    # one-node-only choice.
    n = 200
    servers = {pod: env.serve(pod, WEB_TARGET_PORT, tag=f"ep-{pod}") for pod in ("n1p2", "n2p2")}
    before = env.mesh.metrics("node1")
    results = env.connect("n1p1", f"{WEB_VIP}:{WEB_PORT}", "vip", count=n)

    ok_results(env, results)
    spread = collections.Counter(r["tag"] for r in results)
    assert set(spread) == {"ep-n1p2", "ep-n2p2"}, f"endpoints reached: {dict(spread)}"
    for tag, got in spread.items():
        assert 70 <= got <= 130, f"{tag} got {got} of {n} connections: {dict(spread)}"
    seen = {str(r["seen_from"]).rpartition(":")[0] for r in results}
    assert seen == {env.ip("n1p1")}, f"endpoints saw sources {seen}"
    for server in servers.values():
        assert b"vip" in server.received()

    after = env.mesh.metrics("node1")
    labels = {"reporter": "source", "source_workload": "n1p1",
              "destination_service": "web.default.svc.cluster.local",
              "connection_security_policy": "mutual_tls"}
    delta = metric_value(after, OPENED, **labels) - metric_value(before, OPENED, **labels)
    assert delta == n, f"{OPENED}{labels} grew by {delta}, expected {n}"


# 4 -------------------------------------------------------------------------------------------
def test_mesh_passthrough_outside_the_mesh(env: MeshEnv) -> None:
    marker = "MARKER-pass-0b5d"
    tcp_pod = env.serve("n2p3")  # a workload with protocol TCP (not in the mesh)
    fabric_ip = env.cluster.plan.fabric_ip  # an IP no workload has
    outside = env.serve("fabric")
    before = env.mesh.metrics("node1")
    cap = env.cluster.capture("node1")
    to_pod = env.connect("n1p1", env.addr("n2p3", tcp_pod.port), marker)
    to_unknown = env.connect("n1p1", f"{fabric_ip}:{outside.port}", marker)
    pcap = cap.stop()

    ok_results(env, to_pod + to_unknown, "node1")
    assert marker.encode() in tcp_pod.received()
    assert marker.encode() in outside.received()
    assert to_pod[0]["seen_from"].startswith(env.ip("n1p1") + ":")
    assert to_unknown[0]["seen_from"].startswith(env.ip("n1p1") + ":")
    flows = pcap.flows()
    # Plain TCP straight to the app ports (the marker is visible: proof it was not tunnelled).
    assert any(f[1] == env.ip("n2p3") and f[3] == tcp_pod.port for f in flows), flows
    assert any(f[1] == fabric_ip and f[3] == outside.port for f in flows), flows
    assert 15008 not in pcap.ports(), f"passthrough went to 15008: {flows}"
    assert pcap.contains(marker.encode())

    after = env.mesh.metrics("node1")
    labels = {"reporter": "source", "source_workload": "n1p1", "destination_workload": "n2p3",
              "connection_security_policy": "unknown"}
    assert metric_value(after, OPENED, **labels) - metric_value(before, OPENED, **labels) == 1


# 5 -------------------------------------------------------------------------------------------
DENY_DEFAULT_TO_SHOP = {
    "name": "deny-default", "namespace": "shop", "scope": "Namespace", "action": "Deny",
    "rules": [[[{"namespaces": ["default"]}]]],
}
ALLOW_CLIENT_TO_SHOP = {
    "name": "allow-client", "namespace": "shop", "scope": "Namespace", "action": "Allow",
    "rules": [[[{"principals": ["spiffe://cluster.local/ns/default/sa/client"]}]]],
}


def test_mesh_authorization_deny_allow_and_live_edit(env: MeshEnv) -> None:
    agents = {n: env.mesh.agents[n].pid for n in env.node_names}
    denied_srv = env.serve("n2p1")
    env.apply_config(env.doc(policies=[DENY_DEFAULT_TO_SHOP]))
    before = env.mesh.metrics("node2")
    denied = env.connect("n1p1", env.addr("n2p1", denied_srv.port), "MARKER-denied")

    assert not denied[0]["ok"], f"a denied connection worked: {denied}"
    assert denied[0]["tag"] is None, f"the app answered a denied connection: {denied}"
    assert denied_srv.received() == b"", "bytes of a denied connection reached the app"
    after = env.mesh.metrics("node2")
    labels = {"reporter": "destination", "destination_workload": "n2p1", "response_flags": "DENY"}
    delta = metric_value(after, FAILED, **labels) - metric_value(before, FAILED, **labels)
    assert delta == 1, f"{FAILED}{labels} grew by {delta}, not 1\n{env.logs('node2')}"
    # The access log is written by a writer thread: the line follows the metric shortly.
    wait_until(lambda: "deny-default" in env.mesh.log("node2"), 5,
               "the deny is not logged with its policy")

    # Edit the policy in place: Allow for the client's principal.  Same agent processes.
    env.apply_config(env.doc(policies=[ALLOW_CLIENT_TO_SHOP]))
    allowed = env.connect("n1p1", env.addr("n2p1", denied_srv.port), "MARKER-allowed")
    ok_results(env, allowed)
    assert denied_srv.received() == b"MARKER-allowed"
    # The Allow policy admits only the client identity: default/web (n1p2) is denied.
    other = env.connect("n1p2", env.addr("n2p1", denied_srv.port), "MARKER-web")
    assert not other[0]["ok"], f"an identity the Allow policy does not name got in: {other}"
    assert denied_srv.received() == b"MARKER-allowed"
    assert {n: env.mesh.agents[n].pid for n in env.node_names} == agents, "agents restarted"


# 6 -------------------------------------------------------------------------------------------
def test_mesh_strict_refuses_plaintext_permissive_allows(env: MeshEnv) -> None:
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    # Default (no peerAuthentication) is PERMISSIVE: the non-mesh pod gets through.
    first = env.connect("n1p3", target, "PLAIN-default")
    ok_results(env, first)

    env.apply_config(env.doc(peer_authentication=[{"mode": "STRICT", "namespace": "shop"}]))
    before = env.mesh.metrics("node2")
    refused = env.connect("n1p3", target, "PLAIN-strict")
    assert not refused[0]["ok"], f"STRICT let plaintext in: {refused}"
    assert refused[0]["tag"] is None, f"the app answered under STRICT: {refused}"
    assert b"PLAIN-strict" not in server.received()
    after = env.mesh.metrics("node2")
    labels = {"reporter": "destination", "destination_workload": "n2p1", "response_flags": "DENY",
              "connection_security_policy": "unknown"}
    assert metric_value(after, FAILED, **labels) - metric_value(before, FAILED, **labels) == 1
    mtls = env.connect("n1p1", target, "MTLS-strict")  # mesh traffic still flows
    ok_results(env, mtls)

    env.apply_config(env.doc(peer_authentication=[{"mode": "PERMISSIVE", "namespace": "shop"}]))
    again = env.connect("n1p3", target, "PLAIN-permissive")
    ok_results(env, again)
    assert server.received() == b"PLAIN-default" + b"MTLS-strict" + b"PLAIN-permissive"


# 7 -------------------------------------------------------------------------------------------
def test_mesh_destination_sees_source_pod_ip(env: MeshEnv) -> None:
    cross = env.serve("n2p1")
    same = env.serve("n1p2")
    cases = [
        ("n1p1", env.addr("n2p1", cross.port), env.ip("n1p1")),   # HBONE cross-node
        ("n1p1", env.addr("n1p2", same.port), env.ip("n1p1")),    # HBONE same node
        ("n2p2", env.addr("n1p2", same.port), env.ip("n2p2")),    # HBONE the other way
        ("n1p3", env.addr("n2p1", cross.port), env.ip("n1p3")),   # plaintext (PERMISSIVE)
    ]
    for client, target, want in cases:
        [res] = env.connect(client, target, "who-am-i")
        ok_results(env, [res])
        got = str(res["seen_from"]).rpartition(":")[0]
        assert got == want, f"{client} -> {target}: app saw {got}, expected {want}"


# 8 -------------------------------------------------------------------------------------------
def _rules(env: MeshEnv, pod: str) -> dict[str, str]:
    path = env.cluster.pod(pod).netns_path
    shown = redirect_cli("show", "--netns", path)
    state = netns_state(path)
    state["nodeproxy redirect show"] = shown.stdout.strip()
    return state


def test_mesh_kill9_fails_closed_and_restart_adopts_rules(env: MeshEnv) -> None:
    marker = "MARKER-kill-5e11"
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    ok_results(env, env.connect("n1p1", target, "warm-up"))  # also leaves a pooled connection
    pods = ("n1p1", "n2p1")
    rules_before = {p: _rules(env, p) for p in pods}
    for p in pods:
        assert "nodeproxy" in rules_before[p]["nodeproxy redirect show"], rules_before[p]

    cap = env.cluster.capture("node1")
    # Destination agent gone: HBONE to n2p1:15008 is refused, plaintext to 15006 too.
    env.mesh.stop_agent("node2", signal.SIGKILL)
    via_mesh = env.connect("n1p1", target, marker, timeout=3)
    plain = env.connect("n1p3", target, "PLAIN-while-down", timeout=3)
    # Source agent gone too: the redirect to 15001 has no listener.
    env.mesh.stop_agent("node1", signal.SIGKILL)
    no_source = env.connect("n1p1", target, marker, timeout=3)
    pcap = cap.stop()

    for what, res in (("dest agent down", via_mesh), ("plaintext, dest agent down", plain),
                      ("source agent down", no_source)):
        assert not res[0]["ok"], f"{what}: traffic flowed: {res}"
        assert res[0]["tag"] is None, f"{what}: the app answered: {res}"
    assert not pcap.contains(marker.encode()), "marker leaked in plaintext while agents were down"
    assert any(f[1] == env.ip("n2p1") and f[3] == 15008 for f in pcap.flows()), \
        f"the capture saw no attempt towards n2p1:15008: {pcap.flows()}"
    assert server.received() == b"warm-up", "bytes reached the app while its agent was down"
    for p in pods:  # rules stay while the agent is down: fail closed
        assert _rules(env, p) == rules_before[p], state_diff(rules_before[p], _rules(env, p))

    for node in ("node1", "node2"):
        env.mesh.start_agent(node)
    env.mesh.wait_ready(30)
    ok_results(env, env.connect("n1p1", target, "after-restart"))
    assert server.received() == b"warm-up" + b"after-restart"
    for p in pods:
        after = _rules(env, p)
        assert after == rules_before[p], f"{p} rules changed by the restart:\n" \
                                         f"{state_diff(rules_before[p], after)}"
        verify = redirect_cli("verify", "--netns", env.cluster.pod(p).netns_path,
                              "--backend", env.backend)
        assert verify.returncode == 0, f"redirect verify in {p}: {verify.stdout}{verify.stderr}"


# 9b ------------------------------------------------------------------------------------------
def test_mesh_pod_holds_only_its_backends_capture(env: MeshEnv) -> None:
    """eBPF mode puts no iptables/nft rules in the pod netns; rule modes no BPF programs."""
    state = netns_state(env.cluster.pod("n1p1").netns_path)
    rules = "\n".join(state[k] for k in ("iptables-save", "iptables-legacy-save",
                                          "nft list ruleset")).lower()
    if env.backend == "ebpf":
        assert "nodeproxy" not in rules, rules
        assert "connect4" in state["bpf pins"], state
        assert "np_connect4" in state["cgroup programs"], state
        assert "np_ingress" in state["tc"], state
        # The agent is in no pod's cgroup, so connect4 never sees its sockets.
        for node, proc in env.mesh.agents.items():
            cgroup = Path(f"/proc/{proc.pid}/cgroup").read_text()
            assert "nodeproxy-lab" not in cgroup, f"agent of {node} is in {cgroup}"
    else:
        assert "nodeproxy" in rules, rules
        assert state["bpf pins"] == "", state
        assert "np_" not in state["cgroup programs"] + state["tc"], state


# 10 ------------------------------------------------------------------------------------------
def test_mesh_broken_config_keeps_last_good(env: MeshEnv) -> None:
    from meshlab import dump_config

    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    before = {n: env.mesh.metrics(n) for n in env.node_names}

    # Valid YAML, but an unknown key; the file also carries a deny-all policy that must NOT
    # take effect, since a bad file is rejected as a whole.
    doc = env.doc(policies=[{"name": "deny-all", "namespace": "shop", "scope": "Namespace",
                             "action": "Deny", "rules": [[]]}])
    text = dump_config(doc)
    bad_line = len(text.splitlines()) + 1
    env.apply_raw_config(text + "bogusTopLevelKey: 1\n")
    ok_results(env, env.connect("n1p1", target, "still-serving"))
    name = env.mesh.config_path.name
    for node in env.node_names:
        dump = env.mesh.config_dump(node)
        errors = dump.get("configErrors", [])
        assert any("bogusTopLevelKey" in e for e in errors), f"{node} configErrors: {errors}"
        assert len(dump.get("workloads", [])) == len(env.base_doc["workloads"]), \
            "the last good config is not the one in force"
        metrics = env.mesh.metrics(node)
        grew = (metric_value(metrics, "nodeproxy_config_reloads_total", result="error")
                - metric_value(before[node], "nodeproxy_config_reloads_total", result="error"))
        assert grew == 1, f"{node}: reload error counter grew by {grew}"
        _wait_for_log(env, node, rf"{re.escape(name)}:{bad_line}:\d+: .*bogusTopLevelKey")

    # Not even YAML.
    env.apply_raw_config("workloads:\n  - name: [unclosed\n")
    ok_results(env, env.connect("n1p1", target, "still-serving-2"))
    for node in env.node_names:
        errors = env.mesh.config_dump(node).get("configErrors", [])
        assert errors, f"{node}: no configErrors after invalid YAML"
        assert all(re.match(rf"\S*{re.escape(name)}:\d+", e) for e in errors), errors
        assert re.search(rf"{re.escape(name)}:\d+:\d+", env.mesh.log(node))

    # A good edit clears the error state.
    env.apply_config(env.base_doc)
    for node in env.node_names:
        assert "configErrors" not in env.mesh.config_dump(node)
    assert server.received() == b"still-serving" + b"still-serving-2"


def _wait_for_log(env: MeshEnv, node: str, pattern: str) -> None:
    """The agents' log is written by a writer thread: a line follows its event shortly."""
    wait_until(lambda: re.search(pattern, env.mesh.log(node)), 5,
               lambda: f"{node} log has no {pattern!r}\n{env.mesh.log_tail(node)}")
