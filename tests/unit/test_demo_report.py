"""The demo's scenario, verdict and report, from recorded observations (no root needed).

The observations below are shaped after a real run (2 nodes, iptables); sabotaged copies
check that the verdict comes from what was observed, not from what the demo intended.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from meshlab import ClusterSpec, dump_config, plan_cluster, render_config
from meshlab.demo.observe import (
    AccessEntry,
    CertRow,
    Connection,
    MetricRow,
    Observations,
    WireCapture,
    certificates_from_dump,
    check,
    describe_pods,
    parse_access_log,
    summarize_metrics,
)
from meshlab.demo.report import Style, policy_summary, render_next_steps, render_report
from meshlab.demo.run import Progress
from meshlab.demo.scenario import DemoError, Intent, build_scenario, marker_for
from ztunnel_cfg import ConnectionInfo, Snapshot, SpiffeId, authorize, load_config_text
from ztunnel_cfg.routing import RouteKind, route

PREFIX = "npd3fa9-"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ID = "spiffe://cluster.local/ns/{}/sa/{}"
FRONTEND, CATALOG = ID.format("default", "frontend"), ID.format("shop", "catalog")
OLD, LEDGER = ID.format("legacy", "old-client"), ID.format("payments", "ledger")
DB = ID.format("data", "inventory-db")


def _out(dst: str, dst_id: str, *, src: str = "frontend", src_id: str = FRONTEND,
         path: str = "hbone", flags: str = "-", service: str = "", sent: int = 19,
         received: int = 46) -> AccessEntry:
    return AccessEntry("node1", "outbound", src, src_id, dst, dst_id, service, "x:1", path,
                       sent, received, flags)


def _in(node: str, dst: str, dst_id: str, *, src: str = "frontend", src_id: str = FRONTEND,
        path: str = "hbone", flags: str = "-", policy: str = "", reason: str = "",
        sent: int = 46, received: int = 19) -> AccessEntry:
    return AccessEntry(node, "inbound", src, src_id, dst, dst_id, "", "x:1", path, sent,
                       received, flags, policy, reason)


def _conn(step: int, seq: int, target: str, records: tuple[AccessEntry, ...], *,
          ok: bool = True, got: bool = True, error: str | None = None) -> Connection:
    step_obj = build_scenario(2).steps[step]
    return Connection(step, seq, marker_for(PREFIX, seq, step_obj), target, ok, error,
                      ok, "10.251.1.2:40000" if ok else None, 19, 46 if ok else 0, got, records)


def recorded() -> Observations:
    scenario = build_scenario(2)
    plan = plan_cluster(ClusterSpec(PREFIX, 2, scenario.pods_per_node))
    conns = [
        _conn(0, 1, "10.251.2.2:8080", (_out("catalog", CATALOG),
                                        _in("node2", "catalog", CATALOG))),
        _conn(1, 2, "10.251.2.4:9090", (_out("ledger", LEDGER),
                                        _in("node2", "ledger", LEDGER,
                                            policy="payments/allow-frontend"))),
    ]
    svc = "catalog.shop.svc.cluster.local"
    for i in range(6):
        dst, node = ("catalog-2", "node1") if i % 2 == 0 else ("catalog", "node2")
        conns.append(_conn(2, 3 + i, "10.96.0.20:80", (
            _out(dst, CATALOG, service=svc, sent=22, received=49),
            _in(node, dst, CATALOG, sent=49, received=22))))
    conns.append(_conn(3, 9, "10.251.2.2:8080", (
        _out("catalog", CATALOG, src="old-client", src_id=OLD, flags="DENY", sent=0,
             received=0),
        _in("node2", "catalog", CATALOG, src="old-client", src_id=OLD, path="denied",
            flags="DENY", policy="shop/deny-legacy", sent=0, received=0,
            reason="denied by policy shop/deny-legacy rule 0: source namespace 'legacy' "
                   "matches 'legacy'"),
    ), ok=False, got=False, error="ConnectionResetError: Connection reset by peer"))
    conns.append(_conn(4, 10, "10.251.2.3:5432", (
        _out("inventory-db", DB, path="passthrough", sent=26, received=53),)))
    passthrough = conns[-1].marker
    caps = tuple(WireCapture(n, "eth0", 105, {5432: 1, 15008: 3}, frozenset({passthrough}))
                 for n in ("node1", "node2"))
    return Observations(
        prefix=PREFIX, backend="iptables", nodes=(("node1", "10.250.0.11"),
                                                  ("node2", "10.250.0.12")),
        pods=describe_pods(plan, scenario.roles), services=scenario.services,
        policies=scenario.policies, steps=scenario.steps, connections=tuple(conns),
        captures=caps,
        metrics=(MetricRow("node1", "destination", 3, 3, 0, 147, 66),
                 MetricRow("node1", "source", 10, 9, 1, 196, 439),
                 MetricRow("node2", "destination", 5, 5, 1, 239, 104)),
        certificates=(CertRow("node1", FRONTEND, "available", "55137474326f8f8b1c",
                              "2026-11-25 17:57:12+00:00"),
                      CertRow("node2", CATALOG, "available", "2aed6d2d",
                              "2026-11-25 17:57:12+00:00")),
        timings=(("namespaces", 0.04), ("mesh", 5.7), ("traffic", 1.2)),
    )


# -- scenario ---------------------------------------------------------------------------------

def test_scenario_has_the_promised_cast() -> None:
    scenario = build_scenario(2)
    assert len(scenario.roles) >= 4
    assert [p for p, r in scenario.roles.items() if not r.mesh] == ["n2p2"]
    assert len({r.namespace for r in scenario.roles.values()}) >= 3
    [svc] = scenario.services
    nodes = {scenario.roles[p].name: p[:2] for p in scenario.roles}
    assert {nodes[e] for e in svc.endpoints} == {"n1", "n2"}, "endpoints on both nodes"
    assert {p["action"] for p in scenario.policies} == {"Deny", "Allow"}
    assert {s.intent for s in scenario.steps} == set(Intent)
    assert sum(s.count for s in scenario.steps if s.intent is Intent.SERVICE) >= 6


def test_scenario_needs_two_nodes_and_grows_the_service() -> None:
    with pytest.raises(DemoError, match="at least 2 nodes"):
        build_scenario(1)
    [svc] = build_scenario(3).services
    assert list(svc.endpoints) == ["catalog", "catalog-2", "catalog-3"]
    assert build_scenario(3).steps[2].count == 9


@pytest.mark.parametrize("nodes", [2, 4])
def test_scenario_intents_agree_with_the_policy_engine(nodes: int) -> None:
    """The pure decisions over the config the demo writes give what each step claims."""
    scenario = build_scenario(nodes)
    plan = plan_cluster(ClusterSpec(PREFIX, nodes, scenario.pods_per_node))
    doc = render_config(plan, scenario.roles, scenario.services, scenario.policies)
    snap = Snapshot.build(load_config_text(dump_config(doc)))
    pods = {p.pod: p for p in describe_pods(plan, scenario.roles)}
    for step in scenario.steps:
        src = snap.workload_by_ip(pods[step.src].ip)
        assert src is not None
        if step.intent is Intent.SERVICE:
            decision = route(snap, src, "10.96.0.20", step.port, lambda eps: eps[0])
            assert decision.kind is RouteKind.HBONE
            assert decision.service is not None
            continue
        dst_ip = pods[step.dst].ip
        decision = route(snap, src, dst_ip, step.port, lambda eps: eps[0])
        if step.intent is Intent.PASSTHROUGH:
            assert decision.kind is RouteKind.PASSTHROUGH
            continue
        assert decision.kind is RouteKind.HBONE
        dst = snap.workload_by_ip(dst_ip)
        assert dst is not None
        verdict = authorize(snap, dst, ConnectionInfo(
            SpiffeId.parse(pods[step.src].identity), pods[step.src].ip, dst_ip, step.port))
        assert verdict.allowed is (step.intent is Intent.MESH), (step, verdict)


def test_markers_are_unique_per_connection_and_run() -> None:
    steps = build_scenario(2).steps
    markers = {marker_for(p, seq, steps[seq % len(steps)])
               for p in ("npd0001-", "npd0002-") for seq in range(1, 11)}
    assert len(markers) == 20


def test_without_policy_removes_only_that_policy() -> None:
    sabotaged = build_scenario(2).without_policy("deny-legacy")
    assert [p["name"] for p in sabotaged.policies] == ["allow-frontend"]
    assert sabotaged.steps == build_scenario(2).steps


# -- parsing what the agents said ---------------------------------------------------------------

def test_parse_access_log_keeps_only_access_records() -> None:
    text = "\n".join([
        '{"component": "agent", "msg": "ready"}',
        "2026-11-24T17:53:43Z info component=access text line",
        '{"component": "access", "direction": "inbound", "src_workload": "old-client", '
        '"path": "denied", "bytes_sent": 0, "bytes_received": 0, "response_flags": "DENY", '
        '"policy": "shop/deny-legacy", "dst_workload": "catalog"}',
        '{"component": "access", "broken',
    ])
    [entry] = parse_access_log("node2", text)
    assert (entry.node, entry.direction, entry.path, entry.policy) == (
        "node2", "inbound", "denied", "shop/deny-legacy")
    assert entry.dst_service == ""
    assert entry.reason == ""


def test_summarize_metrics_sums_by_reporter() -> None:
    text = "\n".join([
        "# HELP istio_tcp_connections_opened_total x",
        'istio_tcp_connections_opened_total{reporter="source",source_workload="a"} 2.0',
        'istio_tcp_connections_opened_total{reporter="source",source_workload="b"} 3.0',
        'istio_tcp_connections_opened_total{reporter="destination",x="a,b=\\"c\\""} 4.0',
        'istio_tcp_connections_opened_created{reporter="source"} 1.7e+09',
        'istio_tcp_sent_bytes_total{reporter="source"} 196.0',
        'nodeproxy_enrolled_pods 3.0',
    ])
    rows = {r.reporter: r for r in summarize_metrics("node1", text)}
    assert rows["source"] == MetricRow("node1", "source", opened=5, sent=196)
    assert rows["destination"].opened == 4


def test_certificates_from_dump() -> None:
    dump = {"certificates": [{"identity": FRONTEND, "state": "available", "serial": "ab",
                              "not_before": "x", "not_after": "2026-11-25"},
                             {"identity": OLD, "state": "initializing", "serial": None}]}
    rows = certificates_from_dump("node1", dump)
    assert rows == [CertRow("node1", FRONTEND, "available", "ab", "2026-11-25"),
                    CertRow("node1", OLD, "initializing", "-", "-")]
    assert certificates_from_dump("node1", {}) == []


# -- verdict and report -------------------------------------------------------------------------

def test_recorded_run_passes_and_reads_well() -> None:
    obs = recorded()
    assert check(obs) == []
    text = render_report(obs, [], color=False)
    assert not ANSI.search(text)
    for line in [
        f"nodeproxy demo: 2 nodes, 6 pods (1 outside the mesh), redirect=iptables, prefix {PREFIX}",
        "policy  shop/deny-legacy: DENY when namespaces=legacy",
        "✔ #1 cross-node call: frontend → catalog (10.251.2.2:8080)",
        f"from  default/frontend on node1    {FRONTEND}",
        f"to    shop/catalog on node2        {CATALOG}",
        "path  HBONE mTLS (node1 → node2, port 15008)",
        "HBONE mTLS (node1 → node2, port 15008, allowed by payments/allow-frontend)",
        "bytes 19 B sent, 46 B received",
        "wire  marker never seen in 210 captured packets",
        "the app received the marker, saw the client as 10.251.1.2 (the source pod's own IP)",
        "✔ #3-8 service VIP, load-balanced: frontend → service catalog (10.96.0.20:80)",
        "HBONE mTLS (stayed on node1, port 15008)",
        "never left node1",
        "spread  catalog x3 · catalog-2 x3",
        "path  DENIED by policy shop/deny-legacy rule 0: source namespace 'legacy' matches",
        "0 bytes reached the app (client: ConnectionResetError: Connection reset by peer)",
        "path  passthrough (plain TCP: the destination is not in the mesh)",
        "marker SEEN in plaintext on the link of node1, node2 (expected: outside the mesh)",
        "node1 eth0: 105 packets; new TCP connections to port 5432 x1, 15008/HBONE x3",
        "✔ none of the 9 mesh markers was seen in 210 captured packets",
        "✔ the passthrough marker was seen in plaintext",
        f"node1  {FRONTEND:<50} available serial 55137474326f8f8b… until 2026-11-25",
        "✔ all 10 connections behaved as the config says",
        "ran in 6.9 s (namespaces 0.0 s · mesh 5.7 s · traffic 1.2 s)",
    ]:
        assert line in text, f"missing {line!r} in:\n{text}"
    metrics = next(ln for ln in text.splitlines() if "istio_tcp_connections_opened_total" in ln)
    assert metrics.split()[1:] == ["10", "3", "5"], "source column first, then destination"
    assert "✘" not in text
    assert "problem" not in text


def test_color_only_when_asked() -> None:
    text = render_report(recorded(), [], color=True)
    assert "\x1b[32m✔\x1b[0m" in text
    assert ANSI.sub("", text) == render_report(recorded(), [], color=False)


def _with_conn(obs: Observations, seq: int, **changes: object) -> Observations:
    conns = tuple(dataclasses.replace(c, **changes) if c.seq == seq else c  # type: ignore[arg-type]
                  for c in obs.connections)
    return dataclasses.replace(obs, connections=conns)


def _leak(seq: int) -> Callable[[Observations], Observations]:
    def go(obs: Observations) -> Observations:
        marker = obs.connections[seq - 1].marker
        caps = tuple(dataclasses.replace(c, markers_seen=c.markers_seen | {marker})
                     if c.node == "node2" else c for c in obs.captures)
        return dataclasses.replace(obs, captures=caps)
    return go


def _denied_got_through(obs: Observations) -> Observations:
    conn = obs.connections[8]
    records = (_out("catalog", CATALOG, src="old-client", src_id=OLD),
               _in("node2", "catalog", CATALOG, src="old-client", src_id=OLD))
    return _with_conn(obs, 9, client_ok=True, answered=True, app_got_marker=True,
                      client_error=None, records=records, seen_from=conn.seen_from)


def _no_plaintext_seen(obs: Observations) -> Observations:
    caps = tuple(dataclasses.replace(c, markers_seen=frozenset()) for c in obs.captures)
    return dataclasses.replace(obs, captures=caps)


def _always_catalog(obs: Observations) -> Observations:
    svc = "catalog.shop.svc.cluster.local"
    for seq in range(3, 9):
        obs = _with_conn(obs, seq, records=(_out("catalog", CATALOG, service=svc),
                                            _in("node2", "catalog", CATALOG)))
    return obs


SABOTAGE: list[tuple[str, Callable[[Observations], Observations], str]] = [
    ("denied connection got through", _denied_got_through,
     "#9 denied by a DENY policy: a connection the policy denies got through to the app"),
    ("denied without a policy record", lambda o: _with_conn(o, 9, records=()),
     "no agent recorded a denial by an authorization policy"),
    ("mesh marker on the wire", _leak(1),
     "#1 cross-node call: the marker was seen in plaintext on the wire (node2)"),
    ("denied marker on the wire", _leak(9), "#9 denied by a DENY policy: the marker was seen"),
    ("capture blind to plaintext", _no_plaintext_seen, "'marker never seen' would prove nothing"),
    ("passthrough instead of HBONE",
     lambda o: _with_conn(o, 1, records=(_out("catalog", CATALOG, path="passthrough"),)),
     "#1 cross-node call: the source agent did not tunnel it over HBONE (path=passthrough"),
    ("no inbound record", lambda o: _with_conn(o, 2, records=(_out("ledger", LEDGER),)),
     "#2 allowed by an ALLOW policy: no inbound HBONE record at the destination agent"),
    ("app never got the marker", lambda o: _with_conn(o, 4, app_got_marker=False),
     "#4 service VIP, load-balanced: the destination app never received the marker"),
    ("client failed", lambda o: _with_conn(o, 1, client_ok=False, client_error="timeout"),
     "#1 cross-node call: the client failed: timeout"),
    ("VIP not resolved as a service",
     lambda o: _with_conn(o, 3, records=(_out("catalog-2", CATALOG),
                                         _in("node1", "catalog-2", CATALOG))),
     "#3 service VIP, load-balanced: the source agent did not resolve the service VIP"),
    ("one endpoint never chosen", _always_catalog,
     "service VIP, load-balanced: endpoint(s) catalog-2 never chosen in 6 connections"),
    ("passthrough failed", lambda o: _with_conn(o, 10, client_ok=False, app_got_marker=False,
                                                client_error="ConnectionRefusedError"),
     "#10 to a pod outside the mesh: passthrough to a pod outside the mesh failed"),
    ("nothing captured", lambda o: dataclasses.replace(o, captures=()),
     "the captures on the node links saw no packets at all"),
]


@pytest.mark.parametrize(("case", "sabotage", "expected"), SABOTAGE,
                         ids=[c[0] for c in SABOTAGE])
def test_misbehaviour_is_reported(case: str, sabotage: Callable[[Observations], Observations],
                                  expected: str) -> None:
    obs = sabotage(recorded())
    problems = check(obs)
    assert any(expected in p for p in problems), f"{case}: {problems}"
    text = render_report(obs, problems)
    assert "✘ the mesh did not behave as configured" in text
    assert "✔ all" not in text
    assert expected in text


def test_a_leak_is_called_out_in_the_wire_summary() -> None:
    text = render_report(_leak(1)(recorded()), [])
    assert "✘ 1 of 9 mesh markers were seen in plaintext: NPDEMO-3fa9-01-mesh" in text
    assert "marker SEEN in plaintext on the link of node2" in text


def test_policy_summary() -> None:
    assert policy_summary({"action": "Deny", "rules": [[[{"namespaces": ["a", "b"]}]],
                                                       [[{"principals": ["p"]}],
                                                        [{"destinationPorts": [80]}]]]}) == (
        "DENY when namespaces=a,b or principals=p and destinationPorts=80")
    assert policy_summary({"action": "Allow", "rules": [[]]}) == "ALLOW when always"
    assert policy_summary({"action": "Allow"}) == "ALLOW (no rules)"


def test_next_steps_name_real_commands() -> None:
    pods = recorded().pods
    text = render_next_steps(PREFIX, Path("/tmp/wd"), ["node1", "node2"], pods,
                             python="/venv/bin/python")
    for line in [
        f"ip netns exec {PREFIX}n1 curl -s localhost:15020/metrics",
        f"ip netns exec {PREFIX}n1 curl -s localhost:15000/config_dump",
        "nodeproxy config show /tmp/wd/cluster.yaml",
        f"nodeproxy redirect show --netns /var/run/netns/{PREFIX}n1p1",
        "tail -f /tmp/wd/agent-node1.log",
        f"ip netns exec {PREFIX}n1p1 /venv/bin/python -m meshlab.apps client "
        "--connect 10.251.2.2:8080",
        "nodeproxy demo --down",
        f"python -m meshlab down {PREFIX}",
    ]:
        assert line in text, f"missing {line!r} in:\n{text}"


def test_progress_lines() -> None:
    out = io.StringIO()
    ticks = iter([0.0, 0.04, 1.0, 6.7, 10.0, 10.5])
    progress = Progress(out, 6, Style(False), clock=lambda: next(ticks))
    with progress.step("building namespaces", "namespaces"):
        pass
    with progress.step("starting agents", "mesh"):
        pass
    with pytest.raises(RuntimeError), progress.step("sending traffic", "traffic"):
        raise RuntimeError("boom")
    assert out.getvalue().splitlines() == [
        "[1/6] building namespaces ... ok (0.04 s)",
        "[2/6] starting agents ... ok (5.7 s)",
        "[3/6] sending traffic ... failed (0.5 s)",
    ]
    assert progress.timings == [("namespaces", 0.04), ("mesh", pytest.approx(5.7))]
