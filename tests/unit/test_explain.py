"""ztunnel_cfg.explain: table-driven over one config that has every kind of path."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from ztunnel_cfg.authz import ConnectionInfo, authorize
from ztunnel_cfg.explain import (
    ExplainError,
    HttpQuery,
    Path,
    Verdict,
    explain,
    parse_target,
)
from ztunnel_cfg.loader import load_config_text
from ztunnel_cfg.model import Workload
from ztunnel_cfg.routing import route
from ztunnel_cfg.snapshot import Snapshot

CONFIG = textwrap.dedent(
    """
    workloads:
    - {uid: u-client, name: client, namespace: default, serviceAccount: client,
       workloadIps: ["10.0.1.1"], node: node1}
    - {uid: u-web1, name: web-1, namespace: default, serviceAccount: web,
       workloadIps: ["10.0.1.2"], node: node1, canonicalName: web,
       services: {default/web.default.svc.cluster.local: {80: 9080}}}
    - {uid: u-web2, name: web-2, namespace: default, serviceAccount: web,
       workloadIps: ["10.0.2.2"], node: node2, canonicalName: web,
       services: {default/web.default.svc.cluster.local: {80: 9080}}}
    - {uid: u-web3, name: web-3, namespace: default, serviceAccount: web,
       workloadIps: ["10.0.2.3"], node: node2, canonicalName: web, healthy: false,
       services: {default/web.default.svc.cluster.local: {80: 9080}}}
    - {uid: u-server, name: server, namespace: shop, serviceAccount: server,
       workloadIps: ["10.0.2.1"], node: node2}
    - {uid: u-vault, name: vault, namespace: secure, serviceAccount: vault,
       workloadIps: ["10.0.2.9"], node: node2}
    - {uid: u-legacy, name: legacy, namespace: legacy, serviceAccount: legacy,
       workloadIps: ["10.0.1.3"], node: node1, protocol: TCP}
    - {uid: u-dup1, name: twin, namespace: a, workloadIps: ["10.0.3.1"], node: node1}
    - {uid: u-dup2, name: twin, namespace: b, workloadIps: ["10.0.3.2"], node: node1}
    - {uid: u-db1, name: db-1, namespace: data, workloadIps: ["10.0.1.7"], node: node1,
       canonicalName: db, services: {data/db.data.svc.cluster.local: {5432: 5432}}}
    - {uid: u-db2, name: db-2, namespace: data, workloadIps: ["10.0.2.7"], node: node2,
       canonicalName: db, labels: {tier: gold},
       services: {data/db.data.svc.cluster.local: {5432: 5432}}}
    - {uid: u-wp, name: waypoint, namespace: shop, serviceAccount: waypoint,
       workloadIps: ["10.0.2.8"], node: node2,
       services: {shop/waypoint.shop.svc.cluster.local: {15008: 15008}}}
    - {uid: u-cart, name: cart, namespace: shop, serviceAccount: cart,
       workloadIps: ["10.0.2.4"], node: node2,
       services: {shop/cart.shop.svc.cluster.local: {80: 8080}}}
    - {uid: u-gone, name: gone, namespace: default, workloadIps: ["10.0.2.6"], node: node2,
       healthy: false, services: {default/gone.default.svc.cluster.local: {80: 80}}}
    services:
    - {name: web, namespace: default, hostname: web.default.svc.cluster.local,
       vips: ["/10.96.0.10"], ports: {80: 9080}}
    - {name: db, namespace: data, hostname: db.data.svc.cluster.local,
       vips: ["/10.96.0.11"], ports: {5432: 5432}}
    - {name: gone, namespace: default, hostname: gone.default.svc.cluster.local,
       vips: ["/10.96.0.12"], ports: {80: 80}}
    - {name: cart, namespace: shop, hostname: cart.shop.svc.cluster.local,
       vips: ["/10.96.0.20"], ports: {80: 8080},
       waypoint: {destination: shop/waypoint.shop.svc.cluster.local}}
    - {name: waypoint, namespace: shop, hostname: waypoint.shop.svc.cluster.local,
       vips: ["/10.96.0.30"], ports: {15008: 15008}}
    policies:
    - name: deny-default
      namespace: shop
      scope: Namespace
      action: Deny
      rules: [[[{serviceAccounts: [web]}]], [[{namespaces: [default]}]]]
    - name: deny-gold
      namespace: data
      scope: WorkloadSelector
      action: Deny
      selector: {tier: gold}
      rules: [[[{namespaces: [default]}]]]
    - name: allow-client
      namespace: secure
      scope: Namespace
      action: Allow
      rules: [[[{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]]]
    peerAuthentication:
    - {name: secure-strict, namespace: secure, mode: STRICT}
    """
)

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return Snapshot.build(load_config_text(CONFIG))


@dataclass(frozen=True)
class Case:
    source: str
    target: str
    verdict: Verdict
    paths: frozenset[Path]
    endpoints: frozenset[str]
    policy: str | None = None
    rule: int | None = None
    presented: str | None = CLIENT_ID
    expected: tuple[str, ...] = ()
    mtls: str = ""


CASES = {
    "vip balances over healthy endpoints only": Case(
        "client", "10.96.0.10:80", Verdict.ALLOWED, frozenset({Path.HBONE}),
        frozenset({"default/web-1", "default/web-2"}),
        expected=("spiffe://cluster.local/ns/default/sa/web",), mtls="PERMISSIVE",
    ),
    "deny policy, second rule": Case(
        "default/client", "10.0.2.1:8080", Verdict.DENIED, frozenset({Path.HBONE}),
        frozenset({"shop/server"}), policy="shop/deny-default", rule=1,
        expected=("spiffe://cluster.local/ns/shop/sa/server",), mtls="PERMISSIVE",
    ),
    "allow policy admits the client": Case(
        "10.0.1.1", "10.0.2.9:443", Verdict.ALLOWED, frozenset({Path.HBONE}),
        frozenset({"secure/vault"}), policy="secure/allow-client", rule=0,
        expected=("spiffe://cluster.local/ns/secure/sa/vault",), mtls="STRICT",
    ),
    "allow policy refuses another identity": Case(
        "web-1", "10.0.2.9:443", Verdict.DENIED, frozenset({Path.HBONE}),
        frozenset({"secure/vault"}), presented="spiffe://cluster.local/ns/default/sa/web",
        expected=("spiffe://cluster.local/ns/secure/sa/vault",), mtls="STRICT",
    ),
    "passthrough to a workload outside the mesh": Case(
        "client", "10.0.1.3:5432", Verdict.NOT_ENFORCED, frozenset({Path.PASSTHROUGH}),
        frozenset({"legacy/legacy"}),
    ),
    "passthrough to an unknown address": Case(
        "client", "192.0.2.1:443", Verdict.NOT_ENFORCED, frozenset({Path.PASSTHROUGH}),
        frozenset(),
    ),
    "one endpoint of the service denies": Case(
        "client", "10.96.0.11:5432", Verdict.MIXED, frozenset({Path.HBONE}),
        frozenset({"data/db-1", "data/db-2"}),
        expected=("spiffe://cluster.local/ns/data/sa/default",), mtls="PERMISSIVE",
    ),
    "service with only unhealthy endpoints": Case(
        "client", "10.96.0.12:80", Verdict.NO_ENDPOINTS, frozenset({Path.NO_ENDPOINTS}),
        frozenset(),
    ),
    "service behind a waypoint": Case(
        "client", "10.96.0.20:80", Verdict.NOT_ENFORCED, frozenset({Path.WAYPOINT}),
        frozenset({"shop/waypoint"}),
        expected=("spiffe://cluster.local/ns/shop/sa/waypoint",), mtls="PERMISSIVE",
    ),
    "plaintext source, permissive destination": Case(
        "legacy", "10.0.1.2:9080", Verdict.ALLOWED, frozenset({Path.PLAINTEXT}),
        frozenset({"default/web-1"}), presented=None, mtls="PERMISSIVE",
    ),
    "plaintext source, strict destination": Case(
        "legacy/legacy", "10.0.2.9:443", Verdict.DENIED, frozenset({Path.PLAINTEXT}),
        frozenset({"secure/vault"}), presented=None, mtls="STRICT",
    ),
    "plaintext source to a non-mesh address": Case(
        "192.0.2.7", "10.0.1.3:5432", Verdict.NOT_ENFORCED, frozenset({Path.DIRECT}),
        frozenset({"legacy/legacy"}), presented=None,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_explain_cases(snapshot: Snapshot, case: Case) -> None:
    e = explain(snapshot, case.source, case.target)
    assert e.verdict is case.verdict, e
    assert e.paths == case.paths
    assert e.endpoint_set == case.endpoints
    assert e.presented_identity == case.presented
    for hop in e.hops:
        assert hop.expected_identities == case.expected
        assert hop.mtls_mode == case.mtls
    if case.policy is not None:
        assert {(h.policy, h.rule) for h in e.hops} == {(case.policy, case.rule)}


def test_vip_outcomes_match_route_and_authorize(snapshot: Snapshot) -> None:
    """Each explained outcome is what route()+authorize() give for that endpoint choice."""
    client = snapshot.workload_by_uid("u-client")
    assert client is not None
    e = explain(snapshot, "client", "10.96.0.11:5432")
    assert e.selection.startswith("round-robin")
    by_endpoint = {h.endpoint: h for h in e.hops}
    for ep in snapshot.healthy_endpoints("data/db.data.svc.cluster.local"):
        def pick(_endpoints: Sequence[Workload], chosen: Workload = ep) -> Workload:
            return chosen

        r = route(snapshot, client, "10.96.0.11", 5432, pick)
        assert r.target_ip is not None
        d = authorize(snapshot, ep, ConnectionInfo(client.identity, "10.0.1.1", r.target_ip,
                                                   r.target_port))
        hop = by_endpoint[ep.key]
        assert (hop.allowed, hop.policy, hop.rule) == (d.allowed, d.policy, d.rule)
        assert hop.address == f"{r.target_ip}:{r.target_port}"
        assert hop.via == f"{r.target_ip}:15008"
    assert by_endpoint["data/db-2"].response_flags == "DENY"
    assert by_endpoint["data/db-1"].response_flags == "-"


def test_unhealthy_endpoint_is_listed_but_not_a_candidate(snapshot: Snapshot) -> None:
    e = explain(snapshot, "client", "10.96.0.10:80")
    states = {s.workload: (s.candidate, s.why_not) for s in e.endpoints}
    assert states == {"default/web-1": (True, ""), "default/web-2": (True, ""),
                      "default/web-3": (False, "unhealthy")}
    assert {h.address for h in e.hops} == {"10.0.1.2:9080", "10.0.2.2:9080"}


def test_strict_refusal_names_the_peer_authentication(snapshot: Snapshot) -> None:
    [hop] = explain(snapshot, "legacy", "10.0.2.9:443").hops
    assert "STRICT" in hop.reason
    assert "secure-strict" in hop.mtls_mode_source
    assert hop.response_flags == "DENY"


@pytest.mark.parametrize(("source", "target", "message"), [
    ("twin", "10.0.1.1:80", "2 workloads are named 'twin': a/twin, b/twin"),
    ("nobody", "10.0.1.1:80", "no workload 'nobody'"),
    ("client", "10.0.1.1", "bad target '10.0.1.1'"),
    ("client", "host:80", "bad target 'host:80'"),
    ("client", "10.0.1.1:70000", "bad target"),
])
def test_errors_say_what_to_fix(snapshot: Snapshot, source: str, target: str,
                                message: str) -> None:
    with pytest.raises(ExplainError) as info:
        explain(snapshot, source, target)
    assert message in str(info.value)
    assert info.value.hint


def test_parse_target_ipv6() -> None:
    ip, port = parse_target("[fd00::1]:443")
    assert (str(ip), port) == ("fd00::1", 443)


def test_document_shape(snapshot: Snapshot) -> None:
    doc = explain(snapshot, "client", "10.0.2.1:8080").to_document()
    assert doc["verdict"] == "denied"
    assert doc["source"] == {"workload": "default/client", "ip": "10.0.1.1", "node": "node1",
                             "inMesh": True, "presentedIdentity": CLIENT_ID}
    [out] = doc["outcomes"]
    assert (out["path"], out["policy"], out["rule"], out["responseFlags"]) == \
        ("HBONE", "shop/deny-default", 1, "DENY")


def test_waypoint_hop_without_http_defers_to_the_waypoint(snapshot: Snapshot) -> None:
    e = explain(snapshot, "client", "10.96.0.20:80")
    assert e.l7 is None
    text = " ".join([e.selection, *(h.reason for h in e.hops)])
    assert "pass --http METHOD PATH" in text
    # The waypoint serves the original destination: that is the hop's address.
    waypoint_hops = [h for h in e.hops if h.path is Path.WAYPOINT]
    assert waypoint_hops
    assert {h.address for h in waypoint_hops} == {"10.96.0.20:80"}


L7_CONFIG = textwrap.dedent("""
    workloads:
    - {name: client, namespace: default, serviceAccount: client, workloadIps: ["10.0.1.1"],
       node: n1}
    - {name: rev-1, namespace: default, serviceAccount: reviews, workloadIps: ["10.0.2.1"],
       node: n2, canonicalRevision: v1,
       services: {default/reviews.default.svc.cluster.local: {80: 9080}}}
    - {name: rev-2, namespace: default, serviceAccount: reviews, workloadIps: ["10.0.2.2"],
       node: n2, canonicalRevision: v2,
       services: {default/reviews.default.svc.cluster.local: {80: 9080}}}
    - {name: wp, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.2.9"],
       node: n2, services: {default/waypoint.default.svc.cluster.local: {15008: 15008}}}
    services:
    - {name: reviews, namespace: default, vips: ["/10.96.0.1"], ports: {80: 9080},
       waypoint: {destination: default/waypoint.default.svc.cluster.local}}
    - {name: waypoint, namespace: default, vips: ["/10.96.0.9"], ports: {15008: 15008}}
    waypoints:
    - {name: waypoint, namespace: default, service: default/waypoint.default.svc.cluster.local}
    routes:
    - name: reviews
      namespace: default
      parentRefs: [{service: default/reviews.default.svc.cluster.local}]
      rules:
      - matches: [{path: {type: Exact, value: /old}}]
        filters:
        - {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath,
           replaceFullPath: /new}, statusCode: 301}}
      - matches: [{headers: [{name: x-canary, value: "1"}]}]
        backendRefs: [{service: default/reviews.default.svc.cluster.local, port: 80,
                       subset: {version: v2}}]
        timeouts: {request: 2s}
        retry: {attempts: 3, retryOn: [5xx], perTryTimeout: 500ms}
      - matches: [{path: {type: PathPrefix, value: /api}}]
        backendRefs:
        - {service: default/reviews.default.svc.cluster.local, port: 80, weight: 3,
           subset: {version: v1}}
        - {service: default/reviews.default.svc.cluster.local, port: 80, weight: 1,
           subset: {version: v2}}
    policies:
    - name: no-delete
      namespace: default
      action: Deny
      targetRefs: [{kind: Gateway, name: waypoint}]
      rules: [[[{methods: [DELETE]}]]]
    - name: only-waypoint-to-v2
      namespace: default
      scope: WorkloadSelector
      selector: {version: v2}
      action: Allow
      rules: [[[{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]]]
""")
L7_SNAPSHOT = Snapshot.build(load_config_text(L7_CONFIG, "l7.yaml"))


@dataclass(frozen=True)
class L7Case:
    name: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    verdict: Verdict
    answer: int | None
    route: str
    shares: tuple[tuple[str, float], ...] = ()  # (subset, share)
    retry_has: str = ""
    timeout: str = ""


L7_CASES = [
    L7Case("L7 deny at the waypoint", "DELETE", "/api/1", (), Verdict.DENIED, 403, "-"),
    L7Case("redirect answered by the waypoint", "GET", "/old", (), Verdict.ANSWERED, 301,
           "default/reviews"),
    L7Case("no rule matches: 404", "GET", "/other", (), Verdict.ANSWERED, 404, "-"),
    L7Case("weighted canary split", "GET", "/api/x", (), Verdict.MIXED, None,
           "default/reviews", (("version=v1", 0.75), ("version=v2", 0.25)),
           "2 retries on cancelled,connect-failure,refused-stream,unavailable", "none"),
    L7Case("header match: v2 only, its retry and timeout", "GET", "/x",
           (("x-canary", "1"),), Verdict.DENIED, None, "default/reviews",
           (("version=v2", 1.0),), "3 retries on 5xx", "2s"),
]


@pytest.mark.parametrize("case", L7_CASES, ids=[c.name for c in L7_CASES])
def test_explain_http(case: L7Case) -> None:
    e = explain(L7_SNAPSHOT, "default/client", "10.96.0.1:80",
                HttpQuery(case.method, case.path, case.headers))
    assert e.l7 is not None
    assert e.verdict is case.verdict, e.l7
    assert e.l7.answer == case.answer
    assert e.l7.route == case.route
    assert tuple((b.subset, b.share) for b in e.l7.backends) == case.shares
    assert case.retry_has in e.l7.retry
    if case.timeout:
        assert e.l7.timeout == case.timeout
    assert "http" not in e.to_document()
    assert e.to_document()["waypoint"]["request"] == \
        f"{case.method} {case.path}"


def test_explain_http_endpoints_see_the_waypoint_identity() -> None:
    # v2 admits only the client's identity at L4, so traffic from the waypoint is denied.
    e = explain(L7_SNAPSHOT, "default/client", "10.96.0.1:80", HttpQuery("GET", "/api/x"))
    assert e.l7 is not None
    by_subset = {b.subset: b for b in e.l7.backends}
    (v1,) = by_subset["version=v1"].endpoints
    (v2,) = by_subset["version=v2"].endpoints
    assert v1.allowed
    assert not v2.allowed
    assert v2.address == "10.0.2.2:9080"
    assert "only-waypoint-to-v2" in v2.reason


def test_service_policies_hold_when_a_pod_ip_is_addressed() -> None:
    # A Service-targeted DENY applies to requests that address one of its pods directly: the
    # source agent sends them through the service's waypoint, which must not let them bypass.
    deny_admin = textwrap.dedent("""\
        policies:
        - name: no-admin
          namespace: default
          action: Deny
          targetRefs: [{kind: Service, name: reviews}]
          rules: [[[{paths: ["/admin*"]}]]]
    """)
    snap = Snapshot.build(load_config_text(L7_CONFIG.replace("policies:\n", deny_admin, 1),
                                           "l7.yaml"))
    for target in ("10.96.0.1:80", "10.0.2.1:9080"):
        e = explain(snap, "default/client", target, HttpQuery("GET", "/admin/x"))
        assert e.l7 is not None, target
        assert (e.verdict, e.l7.answer) == (Verdict.DENIED, 403), (target, e.l7)
        assert "default/no-admin" in e.l7.answer_reason + str(e.to_document()), target
        allowed = explain(snap, "default/client", target, HttpQuery("GET", "/api/x"))
        assert allowed.verdict is not Verdict.DENIED, target
