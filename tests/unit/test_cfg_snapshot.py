"""Snapshot lookups, mTLS mode resolution, node-restricted issuance and reload state."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from pathlib import Path

import pytest

from ztunnel_cfg import (
    ConfigError,
    ConfigIssue,
    MtlsMode,
    ReloadState,
    Snapshot,
    SpiffeId,
    load_config_text,
    load_snapshot,
    may_issue,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return load_snapshot(EXAMPLE)


def test_workload_by_ip_accepts_str_and_ip(snap: Snapshot) -> None:
    by_str = snap.workload_by_ip("10.10.1.3")
    assert by_str is not None
    assert by_str.name == "echo-0"
    assert snap.workload_by_ip(ipaddress.ip_address("10.10.1.3")) is by_str
    assert snap.workload_by_ip("10.10.9.9") is None
    assert snap.workload_by_ip("garbage") is None


def test_workload_by_uid(snap: Snapshot) -> None:
    found = snap.workload_by_uid("cluster1//v1/Pod/shop/cart-0")
    assert found is not None
    assert found.name == "cart-0"
    assert snap.workload_by_uid("nope") is None


def test_service_lookups(snap: Snapshot) -> None:
    echo = snap.service_by_vip("10.96.0.10", 80)
    assert echo is not None
    assert echo.key == "default/echo.default.svc.cluster.local"
    assert snap.service_by_vip("10.96.0.10", 81) is None
    assert snap.service_by_vip("bad", 80) is None
    assert snap.service_by_key(echo.key) is echo
    assert [e.name for e in snap.endpoints(echo)] == ["echo-0", "echo-1"]
    assert snap.endpoints(echo.key) == snap.endpoints(echo)
    assert snap.endpoints("default/none") == ()


def test_node_indexes(snap: Snapshot) -> None:
    assert [w.name for w in snap.workloads_on_node("node1")] == [
        "client-0",
        "echo-0",
        "frontend-0",
        "legacy-db-0",
    ]
    assert snap.identities_on_node("node2") == frozenset(
        SpiffeId.of(ns, sa)
        for ns, sa in [
            ("default", "echo"),
            ("shop", "cart"),
            ("shop", "waypoint"),
            ("legacy", "legacy-app"),
        ]
    )
    assert snap.identities_on_node("node9") == frozenset()
    assert snap.workloads_on_node("node9") == ()
    assert snap.trust_domain == "cluster.local"


def test_policies_for(snap: Snapshot) -> None:
    def names(ip: str) -> list[str]:
        workload = snap.workload_by_ip(ip)
        assert workload is not None
        return [p.key for p in snap.policies_for(workload)]

    assert names("10.10.1.3") == [
        "default/deny-legacy",
        "default/allow-echo",
        "istio-system/deny-quarantine",
    ]
    assert names("10.10.1.2") == ["default/deny-legacy", "istio-system/deny-quarantine"]
    assert names("10.10.2.3") == ["shop/allow-cart-from-waypoint", "istio-system/deny-quarantine"]
    assert names("10.10.1.5") == ["istio-system/deny-quarantine"]


def test_snapshot_is_immutable(snap: Snapshot) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.trust_domain = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap._by_ip[ipaddress.ip_address("1.1.1.1")] = snap.config.workloads[0]  # type: ignore[index]


MTLS = """\
workloads:
- {name: a, namespace: default, workloadIps: ["10.0.0.1"], node: n1, canonicalName: a}
- {name: b, namespace: default, workloadIps: ["10.0.0.2"], node: n1, canonicalName: b}
- {name: c, namespace: legacy, workloadIps: ["10.0.0.3"], node: n1}
- {name: d, namespace: other, workloadIps: ["10.0.0.4"], node: n1}
peerAuthentication:
"""


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ("", {"a": "PERMISSIVE", "c": "PERMISSIVE"}),
        ("- {mode: STRICT}\n", {"a": "STRICT", "c": "STRICT", "d": "STRICT"}),
        (
            "- {mode: STRICT}\n- {namespace: legacy, mode: PERMISSIVE}\n",
            {"a": "STRICT", "c": "PERMISSIVE", "d": "STRICT"},
        ),
        (
            "- {namespace: default, mode: STRICT}\n"
            "- {namespace: default, selector: {app: b}, mode: PERMISSIVE}\n",
            {"a": "STRICT", "b": "PERMISSIVE", "d": "PERMISSIVE"},
        ),
        (
            "- {namespace: default, workloadUids: ['Kubernetes//v1/Pod/default/a'],\n"
            "   mode: STRICT}\n",
            {"a": "STRICT", "b": "PERMISSIVE"},
        ),
        # Two workload-specific entries select b: STRICT wins (fail closed).
        (
            "- {namespace: default, selector: {app: b}, mode: PERMISSIVE}\n"
            "- {namespace: default, workloadUids: ['Kubernetes//v1/Pod/default/b'],\n"
            "   mode: STRICT}\n",
            {"b": "STRICT", "a": "PERMISSIVE"},
        ),
        # A selector in another namespace never applies.
        ("- {namespace: legacy, selector: {app: a}, mode: STRICT}\n", {"a": "PERMISSIVE"}),
    ],
)
def test_mtls_mode(entries: str, expected: dict[str, str]) -> None:
    text = MTLS + entries if entries else MTLS.replace("peerAuthentication:\n", "")
    snap = Snapshot.build(load_config_text(text))
    for name, mode in expected.items():
        workload = next(w for w in snap.config.workloads if w.name == name)
        assert snap.mtls_mode(workload) is MtlsMode(mode), name


def test_mtls_mode_for_workload_not_from_snapshot() -> None:
    snap = Snapshot.build(
        load_config_text(MTLS + "- {namespace: default, selector: {app: z}, mode: STRICT}\n")
    )
    outsider = dataclasses.replace(snap.config.workloads[0], uid="x", canonical_name="z")
    assert snap.mtls_mode(outsider) is MtlsMode.STRICT


# --- issuance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "identity", "allowed", "reason"),
    [
        ("node1", "spiffe://cluster.local/ns/default/sa/client", True, "default/client-0"),
        ("node1", "spiffe://cluster.local/ns/default/sa/echo", True, "default/echo-0"),
        ("node2", "spiffe://cluster.local/ns/default/sa/echo", True, "default/echo-1"),
        ("node2", "spiffe://cluster.local/ns/default/sa/client", False, "it runs on node1"),
        ("node1", "spiffe://cluster.local/ns/shop/sa/cart", False, "it runs on node2"),
        (
            "node1",
            "spiffe://cluster.local/ns/default/sa/nobody",
            False,
            "no workload in the config has identity",
        ),
        (
            "node3",
            "spiffe://cluster.local/ns/default/sa/client",
            False,
            "node 'node3' has no workloads",
        ),
        ("node1", "spiffe://evil.example/ns/default/sa/client", False, "trust domain"),
    ],
)
def test_may_issue(node: str, identity: str, allowed: bool, reason: str) -> None:
    snap = load_snapshot(EXAMPLE)
    decision = may_issue(snap, node, SpiffeId.parse(identity))
    assert decision.allowed is allowed
    assert bool(decision) is allowed
    assert reason in decision.reason


def test_may_issue_respects_custom_trust_domain() -> None:
    snap = Snapshot.build(
        load_config_text(
            textwrap.dedent("""\
        trustDomain: prod.example
        workloads: [{name: a, namespace: ns, workloadIps: ["10.0.0.1"], node: n1}]
    """)
        )
    )
    assert may_issue(snap, "n1", SpiffeId.of("ns", "default", "prod.example")).allowed
    assert not may_issue(snap, "n1", SpiffeId.of("ns", "default")).allowed


# --- reload state -----------------------------------------------------------------------------


def test_reload_state_keeps_last_good_snapshot() -> None:
    good = load_snapshot(EXAMPLE)
    err = ConfigError([ConfigIssue("f.yaml", 3, 1, "workloads", "bad")])
    s0 = ReloadState()
    assert s0.current is None
    assert not s0.healthy
    s1 = s0.apply_success(good, 10.0)
    s2 = s1.apply_failure(err, 20.0)
    assert s2.current is good
    assert s2.last_error is err
    assert not s2.healthy
    assert (s2.ok_count, s2.fail_count, s2.last_attempt, s2.last_success) == (1, 1, 20.0, 10.0)
    s3 = s2.apply_success(good, 30.0)
    assert s3.last_error is None
    assert s3.healthy
    assert s3.ok_count == 2
    # Pure: earlier states are untouched.
    assert s1.fail_count == 0
    assert s0.ok_count == 0
    assert s2.summary()["lastError"] == ["f.yaml:3:1: workloads: bad"]


def test_first_failure_leaves_no_snapshot() -> None:
    state = ReloadState().apply_failure(ConfigError([]), 1.0)
    assert state.current is None
    assert state.fail_count == 1
    assert state.summary()["loaded"] is False
