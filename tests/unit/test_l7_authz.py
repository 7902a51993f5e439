"""L7 authorization: authorize_request at a waypoint, and HTTP fields at node agents.

Waypoint cases: (policies, request, service or not) -> decision.  The waypoint is
``bookinfo/waypoint``; the service ``bookinfo/reviews``.  Node-agent cases: authorize() on a
connection to ``reviews-v1``, where HTTP fields fail closed.
"""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel_cfg import (
    ConnectionInfo,
    RequestInfo,
    Snapshot,
    SpiffeId,
    authorize,
    authorize_request,
    load_config_text,
)
from ztunnel_cfg.authz import _conn, _rule_ok, rule_matches
from ztunnel_cfg.model import Match, PathPattern, StringMatch

BASE = textwrap.dedent("""\
    workloads:
    - {name: reviews-v1, namespace: bookinfo, serviceAccount: reviews, workloadIps: ["10.0.0.1"],
       node: n1, canonicalName: reviews,
       services: {bookinfo/reviews.bookinfo.svc.cluster.local: {9080: 9080}}}
    - {name: waypoint-0, namespace: bookinfo, serviceAccount: waypoint,
       workloadIps: ["10.0.0.9"], node: n1,
       services: {bookinfo/waypoint.bookinfo.svc.cluster.local: {15008: 15008}}}
    - {name: waypoint-0, namespace: other, serviceAccount: waypoint,
       workloadIps: ["10.0.1.9"], node: n1,
       services: {other/waypoint.other.svc.cluster.local: {15008: 15008}}}
    services:
    - {name: reviews, namespace: bookinfo, vips: ["/10.96.0.1"], ports: {9080: 9080}}
    - {name: ratings, namespace: bookinfo, vips: ["/10.96.0.2"], ports: {9080: 9080}}
    - {name: reviews, namespace: other, vips: ["/10.96.1.1"], ports: {9080: 9080}}
    - {name: waypoint, namespace: bookinfo, ports: {15008: 15008}}
    - {name: waypoint, namespace: other, ports: {15008: 15008}}
    waypoints:
    - {name: waypoint, namespace: bookinfo, service: bookinfo/waypoint.bookinfo.svc.cluster.local}
    - {name: waypoint, namespace: other, service: other/waypoint.other.svc.cluster.local}
    """)

PRODUCTPAGE = SpiffeId.of("bookinfo", "productpage")
LEGACY = SpiffeId.of("legacy", "app")


def pol(
    name: str,
    action: str,
    rules: str,
    targets: str = "[{kind: Service, name: reviews}]",
    ns: str = "bookinfo",
) -> str:
    target = f", targetRefs: {targets}" if targets else ", scope: Namespace"
    return f"- {{name: {name}, namespace: {ns}, action: {action}{target},\n   rules: {rules}}}\n"


def snapshot(policies: str) -> Snapshot:
    text = BASE + ("policies:\n" + policies if policies else "")
    return Snapshot.build(load_config_text(text, "l7authz.yaml"))


@dataclass(frozen=True)
class Case:
    id: str
    policies: str
    allowed: bool
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    method: str = "GET"
    path: str = "/reviews/1"
    host: str = "reviews.bookinfo.svc.cluster.local"
    headers: tuple[tuple[str, str], ...] = ()
    identity: SpiffeId | None = PRODUCTPAGE
    service: str | None = "bookinfo/reviews.bookinfo.svc.cluster.local"
    waypoint: str = "bookinfo/waypoint"


ALLOW_GET = pol("get", "Allow", "[[[{methods: [GET, HEAD]}]]]")
TEMPLATE = pol("one", "Allow", "[[[{paths: ['/reviews/{*}', '/reviews/{*}/ratings']}]]]")
REST = pol("rest", "Allow", "[[[{paths: ['/api/{**}']}]]]")

WAYPOINT_CASES = [
    # --- applicability
    Case(
        "no policies",
        "",
        True,
        reason="allowed: no ALLOW policy applies to service "
        "bookinfo/reviews.bookinfo.svc.cluster.local at waypoint bookinfo/waypoint",
    ),
    Case(
        "a policy without targetRefs does not apply at the waypoint",
        pol("node", "Deny", "[[[{methods: [GET]}]]]", targets=""),
        True,
        reason="no ALLOW policy applies",
    ),
    Case(
        "kind Service applies to that service",
        pol("d", "Deny", "[[[{methods: [GET]}]]]"),
        False,
        "bookinfo/d",
        0,
        "denied by policy bookinfo/d rule 0: method 'GET' matches 'GET'",
    ),
    Case(
        "kind Service does not apply to another service",
        pol("d", "Deny", "[[[{methods: [GET]}]]]", "[{kind: Service, name: ratings}]"),
        True,
    ),
    Case(
        "kind Service does not apply to the same name in another namespace",
        pol("d", "Deny", "[[[{methods: [GET]}]]]", ns="other"),
        True,
    ),
    Case(
        "kind Service does not apply without a service",
        pol("d", "Deny", "[[[{methods: [GET]}]]]"),
        True,
        service=None,
        reason="no ALLOW policy applies to waypoint bookinfo/waypoint",
    ),
    Case(
        "kind Gateway applies to every request through the waypoint",
        pol("d", "Deny", "[[[{methods: [GET]}]]]", "[{kind: Gateway, name: waypoint}]"),
        False,
        "bookinfo/d",
        0,
        service=None,
    ),
    Case(
        "kind Gateway of another namespace's waypoint does not apply",
        pol("d", "Deny", "[[[{methods: [GET]}]]]", "[{kind: Gateway, name: waypoint}]", "other"),
        True,
    ),
    Case(
        "both kinds: config order decides which policy is reported",
        pol("w", "Allow", "[[]]", "[{kind: Gateway, name: waypoint}]") + pol("s", "Allow", "[[]]"),
        True,
        "bookinfo/w",
        0,
    ),
    Case(
        "both kinds, the other order",
        pol("s", "Allow", "[[]]") + pol("w", "Allow", "[[]]", "[{kind: Gateway, name: waypoint}]"),
        True,
        "bookinfo/s",
        0,
    ),
    # --- methods
    Case(
        "allowed method",
        ALLOW_GET,
        True,
        "bookinfo/get",
        0,
        "allowed by policy bookinfo/get rule 0: method 'GET' matches 'GET'",
    ),
    Case(
        "other method denied",
        ALLOW_GET,
        False,
        reason="denied: spiffe://cluster.local/ns/bookinfo/sa/productpage POST /reviews/1 "
        "matches no rule of the ALLOW policy applying to service "
        "bookinfo/reviews.bookinfo.svc.cluster.local at waypoint bookinfo/waypoint "
        "(bookinfo/get)",
        method="POST",
    ),
    Case(
        "notMethods",
        pol("d", "Deny", "[[[{notMethods: [GET, HEAD]}]]]"),
        False,
        "bookinfo/d",
        0,
        "method 'DELETE' is not one of 'GET', 'HEAD'",
        method="DELETE",
    ),
    # --- paths
    Case(
        "exact path",
        pol("a", "Allow", "[[[{paths: [/reviews/1]}]]]"),
        True,
        "bookinfo/a",
        0,
        "path '/reviews/1' matches '/reviews/1'",
    ),
    Case("exact path mismatch", pol("a", "Allow", "[[[{paths: [/reviews]}]]]"), False),
    Case(
        "prefix path",
        pol("a", "Allow", "[[[{paths: ['/reviews*']}]]]"),
        True,
        reason="matches '/reviews*'",
    ),
    Case(
        "suffix path",
        pol("a", "Allow", "[[[{paths: ['*.html']}]]]"),
        True,
        path="/index.html",
    ),
    Case("presence path", pol("a", "Allow", "[[[{paths: ['*']}]]]"), True, path="/"),
    Case(
        "template {*}: one segment",
        TEMPLATE,
        True,
        "bookinfo/one",
        0,
        "path '/reviews/1' matches '/reviews/{*}'",
    ),
    Case("template {*} between literals", TEMPLATE, True, path="/reviews/7/ratings"),
    Case("template {*} is not two segments", TEMPLATE, False, path="/reviews/1/2"),
    Case("template {*} is not an empty segment", TEMPLATE, False, path="/reviews/"),
    Case("template {*} is not the parent", TEMPLATE, False, path="/reviews"),
    Case("template {**}: the rest", REST, True, path="/api/a/b/c"),
    Case("template {**}: may be empty", REST, True, path="/api/"),
    Case("template {**}: needs its slash", REST, False, path="/api"),
    Case(
        "notPaths",
        pol("d", "Deny", "[[[{notPaths: ['/reviews/{*}']}]]]"),
        False,
        "bookinfo/d",
        0,
        "path '/admin' is not one of '/reviews/{*}'",
        path="/admin",
    ),
    Case(
        "deny a path prefix before an allow-all",
        pol("all", "Allow", "[[]]") + pol("admin", "Deny", "[[[{paths: ['/admin*']}]]]"),
        False,
        "bookinfo/admin",
        0,
        "path '/admin/users' matches '/admin*'",
        path="/admin/users",
    ),
    Case(
        "the same client's allowed path works",
        pol("all", "Allow", "[[]]") + pol("admin", "Deny", "[[[{paths: ['/admin*']}]]]"),
        True,
        "bookinfo/all",
        0,
        path="/reviews",
    ),
    # --- hosts
    Case(
        "hosts are case-insensitive",
        pol("a", "Allow", "[[[{hosts: ['Reviews.*']}]]]"),
        True,
        reason="host 'reviews.bookinfo.svc.cluster.local' matches 'reviews.*'",
        host="REVIEWS.bookinfo.svc.cluster.local",
    ),
    Case(
        "notHosts",
        pol("a", "Allow", "[[[{notHosts: ['*.example']}]]]"),
        False,
        host="evil.example",
    ),
    # --- request headers
    Case(
        "request header value",
        pol("a", "Allow", "[[[{requestHeaders: {X-User: [alice, bob]}}]]]"),
        True,
        "bookinfo/a",
        0,
        "header x-user 'bob' matches 'bob'",
        headers=(("x-user", "bob"),),
    ),
    Case(
        "request header other value",
        pol("a", "Allow", "[[[{requestHeaders: {x-user: [alice]}}]]]"),
        False,
        headers=(("x-user", "mallory"),),
    ),
    Case(
        "request header absent",
        pol("a", "Allow", "[[[{requestHeaders: {x-user: ['*']}}]]]"),
        False,
    ),
    Case(
        "request header presence",
        pol("a", "Allow", "[[[{requestHeaders: {x-user: ['*']}}]]]"),
        True,
        headers=(("x-user", ""),),
    ),
    Case(
        "request header prefix",
        pol("a", "Allow", "[[[{requestHeaders: {authorization: ['Bearer *']}}]]]"),
        True,
        headers=(("authorization", "Bearer abc"),),
    ),
    Case(
        "notRequestHeaders holds when the header is absent",
        pol("a", "Allow", "[[[{notRequestHeaders: {x-debug: ['1']}}]]]"),
        True,
        "bookinfo/a",
        0,
        "header x-debug (absent) is not one of '1'",
    ),
    Case(
        "notRequestHeaders fails on a listed value",
        pol("a", "Allow", "[[[{notRequestHeaders: {x-debug: ['1']}}]]]"),
        False,
        headers=(("x-debug", "1"),),
    ),
    # --- with L4 fields
    Case(
        "principal and method both hold",
        pol(
            "a",
            "Allow",
            "[[[{principals: ['spiffe://cluster.local/ns/bookinfo/sa/productpage'], "
            "methods: [GET]}]]]",
        ),
        True,
        reason="source principal 'spiffe://cluster.local/ns/bookinfo/sa/productpage' matches "
        "'spiffe://cluster.local/ns/bookinfo/sa/productpage' and method 'GET' matches 'GET'",
    ),
    Case(
        "principal holds, method does not",
        pol(
            "a",
            "Allow",
            "[[[{principals: ['spiffe://cluster.local/ns/bookinfo/sa/productpage'], "
            "methods: [GET]}]]]",
        ),
        False,
        method="PUT",
    ),
    Case(
        "plaintext request denied by an identity allow",
        pol("a", "Allow", "[[[{namespaces: [bookinfo]}]]]"),
        False,
        reason="denied: plaintext request from 10.0.5.5 GET /reviews/1 matches no rule",
        identity=None,
    ),
    Case(
        "rules of clauses: L4 clause and L7 clause ANDed",
        pol("a", "Allow", "[[[{namespaces: [legacy]}], [{paths: ['/reviews*']}]]]"),
        True,
        reason="source namespace 'legacy' matches 'legacy'; path '/reviews/1' matches",
        identity=LEGACY,
    ),
]


@pytest.mark.parametrize("case", WAYPOINT_CASES, ids=[c.id for c in WAYPOINT_CASES])
def test_authorize_request(case: Case) -> None:
    snap = snapshot(case.policies)
    waypoint = snap.waypoint(case.waypoint)
    assert waypoint is not None
    service = snap.service_by_key(case.service) if case.service else None
    request = RequestInfo(
        case.identity,
        "10.0.5.5",
        "10.96.0.1",
        9080,
        case.method,
        case.path,
        case.host,
        case.headers,
    )
    decision = authorize_request(snap, waypoint, service, request)
    assert decision.allowed is case.allowed, decision.reason
    if case.policy is not None:
        assert (decision.policy, decision.rule) == (case.policy, case.rule), decision.reason
    if not case.allowed and case.policy is None:
        assert (decision.policy, decision.rule) == (None, None), decision.reason
    assert case.reason in decision.reason
    assert decision.reason.startswith("allowed" if case.allowed else "denied")


def test_waypoint_case_count() -> None:
    assert len(WAYPOINT_CASES) >= 40


# --- node agents: HTTP fields fail closed -----------------------------------------------------


@dataclass(frozen=True)
class NodeCase:
    id: str
    policies: str
    identity: SpiffeId | None
    allowed: bool
    policy: str | None = None
    rule: int | None = None
    reasons: tuple[str, ...] = field(default=())


NODE = "has HTTP fields that a node agent cannot check"
NODE_CASES = [
    NodeCase(
        "ALLOW whose only match has HTTP fields never matches",
        pol("get", "Allow", "[[[{methods: [GET]}]]]", targets=""),
        PRODUCTPAGE,
        False,
        reasons=(
            "denied: spiffe://cluster.local/ns/bookinfo/sa/productpage matches no rule of the "
            "ALLOW policy applying to workload bookinfo/reviews-v1 (bookinfo/get)",
            f"bookinfo/get {NODE}: methods (a match with them never matches at a node agent, "
            "fail closed: give the policy targetRefs to enforce them at a waypoint)",
        ),
    ),
    NodeCase(
        "ALLOW with L4 and HTTP fields in one match never matches",
        pol("a", "Allow", "[[[{namespaces: [bookinfo], paths: ['/x']}]]]", targets=""),
        PRODUCTPAGE,
        False,
        reasons=(f"bookinfo/a {NODE}: paths",),
    ),
    NodeCase(
        "ALLOW: another match of the clause without HTTP fields still matches",
        pol("a", "Allow", "[[[{paths: ['/x']}, {namespaces: [bookinfo]}]]]", targets=""),
        PRODUCTPAGE,
        True,
        "bookinfo/a",
        0,
        ("allowed by policy bookinfo/a rule 0: source namespace 'bookinfo' matches 'bookinfo'",),
    ),
    NodeCase(
        "ALLOW: another rule without HTTP fields still matches",
        pol("a", "Allow", "[[[{hosts: [h]}]], [[{namespaces: [bookinfo]}]]]", targets=""),
        PRODUCTPAGE,
        True,
        "bookinfo/a",
        1,
    ),
    NodeCase(
        "ALLOW failing for L4 reasons names every policy with HTTP fields",
        pol("a", "Allow", "[[[{requestHeaders: {x: ['1']}}]]]", targets="")
        + pol("b", "Allow", "[[[{namespaces: [nope]}]]]", targets="")
        + pol("c", "Allow", "[[[{notHosts: [h], notPaths: ['/x']}]]]", targets=""),
        PRODUCTPAGE,
        False,
        reasons=(
            "(bookinfo/a, bookinfo/b, bookinfo/c)",
            f"bookinfo/a {NODE}: requestHeaders; bookinfo/c {NODE}: notPaths, notHosts",
        ),
    ),
    NodeCase(
        "DENY ignores HTTP fields: the whole connection is denied",
        pol("d", "Deny", "[[[{namespaces: [legacy], paths: ['/admin*']}]]]", targets=""),
        LEGACY,
        False,
        "bookinfo/d",
        0,
        (
            "denied by policy bookinfo/d rule 0: source namespace 'legacy' matches 'legacy'; "
            f"policy bookinfo/d {NODE}: paths (ignored, so the DENY applies to the whole "
            "connection: fail closed)",
        ),
    ),
    NodeCase(
        "DENY still needs its L4 fields to hold",
        pol("d", "Deny", "[[[{namespaces: [legacy], paths: ['/admin*']}]]]", targets=""),
        PRODUCTPAGE,
        True,
        reasons=("allowed: no ALLOW policy applies to workload bookinfo/reviews-v1",),
    ),
    NodeCase(
        "DENY with only HTTP fields denies every connection",
        pol("d", "Deny", "[[[{methods: [DELETE]}]]]", targets=""),
        None,
        False,
        "bookinfo/d",
        0,
        (f"rule 0: matches any connection; policy bookinfo/d {NODE}: methods",),
    ),
    NodeCase(
        "DENY: the note names the deciding rule's HTTP fields only",
        pol("d", "Deny", "[[[{hosts: [h]}]], [[{namespaces: [legacy]}]]]", targets=""),
        LEGACY,
        False,
        "bookinfo/d",
        0,
        (f"policy bookinfo/d {NODE}: hosts",),
    ),
    NodeCase(
        "policies with targetRefs never apply at node agents",
        pol("a", "Allow", "[[[{namespaces: [nope]}]]]")
        + pol("d", "Deny", "[[]]", "[{kind: Gateway, name: waypoint}]"),
        LEGACY,
        True,
        reasons=("allowed: no ALLOW policy applies",),
    ),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.id for c in NODE_CASES])
def test_http_fields_at_a_node_agent_fail_closed(case: NodeCase) -> None:
    snap = snapshot(case.policies)
    destination = snap.workload_by_ip("10.0.0.1")
    assert destination is not None
    decision = authorize(
        snap, destination, ConnectionInfo(case.identity, "10.0.5.5", "10.0.0.1", 9080)
    )
    assert decision.allowed is case.allowed, decision.reason
    assert (decision.policy, decision.rule) == (case.policy, case.rule), decision.reason
    for reason in case.reasons:
        assert reason in decision.reason
    if not any(NODE in r for r in case.reasons):  # the note only where it explains
        assert NODE not in decision.reason


# --- the snapshot's precomputed policy lists -----------------------------------------------------

TARGETED = (
    pol("s1", "Allow", "[[]]")
    + pol("w1", "Deny", "[]", "[{kind: Gateway, name: waypoint}]")
    + pol(
        "both", "Allow", "[[]]", "[{kind: Gateway, name: waypoint}, {kind: Service, name: reviews}]"
    )
    + pol("r1", "Allow", "[[]]", "[{kind: Service, name: ratings}]")
)


def test_waypoint_policies_are_precomputed_in_config_order() -> None:
    snap = snapshot(TARGETED)
    waypoint = snap.waypoint("bookinfo/waypoint")
    reviews = snap.service_by_key("bookinfo/reviews.bookinfo.svc.cluster.local")
    other_reviews = snap.service_by_key("other/reviews.other.svc.cluster.local")
    assert waypoint is not None
    assert reviews is not None
    found = snap.waypoint_policies(waypoint, reviews)
    assert [p.name for p in found] == ["s1", "w1", "both"]
    assert snap.waypoint_policies(waypoint, reviews) is found  # not rebuilt per request
    assert [p.name for p in snap.waypoint_policies(waypoint, None)] == ["w1", "both"]
    assert [p.name for p in snap.waypoint_policies(waypoint, other_reviews)] == ["w1", "both"]
    assert snap.policies_for(snap.config.workloads[0]) == ()


# --- the fast and explaining evaluations agree, HTTP fields included ---------------------------

_paths = st.sampled_from(["/a", "/a*", "*.html", "*", "/a/{*}", "/a/{**}", "/a/{*}/b"]).map(
    PathPattern
)
_methods = st.sampled_from(["GET", "POST"]).map(StringMatch)
_hosts = st.sampled_from(["a.example", "*.example", "a.*", "*"]).map(StringMatch)
_header_values = st.lists(
    st.sampled_from(["1", "2*", "*"]).map(StringMatch), min_size=1, max_size=2
).map(tuple)
_headers = st.lists(st.tuples(st.sampled_from(["x-a", "x-b"]), _header_values), max_size=2).map(
    tuple
)


def _tuple(s: st.SearchStrategy[StringMatch]) -> st.SearchStrategy[tuple[StringMatch, ...]]:
    return st.lists(s, max_size=2).map(tuple)


_matches = st.builds(
    Match,
    namespaces=_tuple(st.sampled_from(["bookinfo", "legacy"]).map(StringMatch)),
    destination_ports=st.lists(st.sampled_from([80, 9080]), max_size=1).map(tuple),
    methods=_tuple(_methods),
    not_methods=_tuple(_methods),
    paths=st.lists(_paths, max_size=2).map(tuple),
    not_paths=st.lists(_paths, max_size=2).map(tuple),
    hosts=_tuple(_hosts),
    not_hosts=_tuple(_hosts),
    request_headers=_headers,
    not_request_headers=_headers,
)
_rules = st.lists(st.lists(_matches, max_size=3).map(tuple), max_size=3).map(tuple)
_requests = st.builds(
    RequestInfo,
    source_identity=st.sampled_from([PRODUCTPAGE, LEGACY, None]),
    source_ip=st.just("10.0.5.5"),
    destination_ip=st.just(ipaddress.ip_address("10.0.0.1")),
    destination_port=st.sampled_from([80, 9080]),
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(["/a", "/a/", "/a/x", "/a/x/b", "/i.html", "/"]),
    host=st.sampled_from(["a.example", "A.Example", "b.test"]),
    headers=st.lists(
        st.tuples(st.sampled_from(["x-a", "x-b"]), st.sampled_from(["1", "2x", ""])), max_size=3
    ).map(tuple),
)


@settings(max_examples=400, deadline=None)
@given(_rules, _requests, st.booleans())
def test_fast_and_explained_evaluation_agree_with_http_fields(
    rule: tuple[tuple[Match, ...], ...], request: RequestInfo, deny: bool
) -> None:
    conn = ConnectionInfo(
        request.source_identity,
        request.source_ip,
        request.destination_ip,
        request.destination_port,
    )
    for seen in (request, conn):  # as a waypoint, and as a node agent
        assert _rule_ok(rule, _conn(seen), deny) is (
            rule_matches(rule, seen, deny=deny) is not None
        )
