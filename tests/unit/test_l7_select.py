"""select_route (Gateway API precedence), choose_backend (weights), backend_endpoints (subsets)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pytest

from ztunnel_cfg import Snapshot, load_config_text
from ztunnel_cfg.l7 import Request, backend_endpoints, choose_backend, select_route
from ztunnel_cfg.model import BackendRef, RouteRule, Service

REVIEWS = "bookinfo/reviews.bookinfo.svc.cluster.local"
RATINGS = "bookinfo/ratings.bookinfo.svc.cluster.local"

BASE = textwrap.dedent(f"""\
    workloads:
    - {{name: reviews-v1, namespace: bookinfo, workloadIps: ["10.0.0.1"], node: n1,
       canonicalName: reviews, canonicalRevision: v1, services: {{{REVIEWS}: {{9080: 9080}}}}}}
    - {{name: reviews-v2, namespace: bookinfo, workloadIps: ["10.0.0.2"], node: n1,
       canonicalName: reviews, canonicalRevision: v2, labels: {{tier: canary}},
       services: {{{REVIEWS}: {{9080: 9080}}}}}}
    - {{name: reviews-v2b, namespace: bookinfo, workloadIps: ["10.0.0.4"], node: n2,
       canonicalName: reviews, canonicalRevision: v2, services: {{{REVIEWS}: {{9080: 9080}}}}}}
    - {{name: reviews-v3, namespace: bookinfo, workloadIps: ["10.0.0.3"], node: n2,
       canonicalName: reviews, canonicalRevision: v3, healthy: false,
       services: {{{REVIEWS}: {{9080: 9080}}}}}}
    - {{name: ratings-0, namespace: bookinfo, workloadIps: ["10.0.1.1"], node: n1,
       services: {{{RATINGS}: {{9080: 9080}}}}}}
    services:
    - {{name: reviews, namespace: bookinfo, vips: ["/10.96.0.1"],
       ports: {{9080: 9080, 9081: 9081}}}}
    - {{name: ratings, namespace: bookinfo, vips: ["/10.96.0.2"], ports: {{9080: 9080}}}}
    """)


def r(name: str, *rules: str, port: int | None = None, service: str = REVIEWS) -> str:
    """A route ``bookinfo/<name>`` with one rule per ``rules`` item (its matches, flow YAML)."""
    parent = f"{{service: {service}}}" if port is None else f"{{service: {service}, port: {port}}}"
    body = "".join(
        f"  - matches: {m}\n    backendRefs: [{{service: {REVIEWS}, port: 9080}}]\n" for m in rules
    )
    return f"- name: {name}\n  namespace: bookinfo\n  parentRefs: [{parent}]\n  rules:\n{body}"


def snapshot(routes: str = "") -> Snapshot:
    text = BASE + (f"routes:\n{routes}" if routes else "")
    return Snapshot.build(load_config_text(text, "select.yaml"))


EVERY = "[]"  # a rule without matches: every request
EXACT_API = "[{path: {type: Exact, value: /api}}]"
PREFIX_API = "[{path: {value: /api}}]"


@dataclass(frozen=True)
class Case:
    id: str
    routes: str
    path: str
    chosen: tuple[str, int, int | None] | None  # (route key, rule, match); None: no match
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    port: int = 9080
    reason: str = ""
    prefix: str | None = None  # expected matched_prefix, when checked


CASES = [
    # --- path kinds
    Case("exact path", r("a", EXACT_API), "/api", ("bookinfo/a", 0, 0), prefix=None),
    Case("exact path is not a prefix", r("a", EXACT_API), "/api/x", None),
    Case("exact path ignores the query", r("a", EXACT_API), "/api?x=1", ("bookinfo/a", 0, 0)),
    Case(
        "prefix matches itself",
        r("a", PREFIX_API),
        "/api",
        ("bookinfo/a", 0, 0),
        prefix="/api",
    ),
    Case("prefix matches below it", r("a", PREFIX_API), "/api/v1/x", ("bookinfo/a", 0, 0)),
    Case("prefix matches its trailing slash", r("a", PREFIX_API), "/api/", ("bookinfo/a", 0, 0)),
    Case("prefix is by whole segments", r("a", PREFIX_API), "/apix", None),
    Case(
        "prefix written with a trailing slash",
        r("a", "[{path: {value: /api/}}]"),
        "/api",
        ("bookinfo/a", 0, 0),
        prefix="/api",
    ),
    Case("no path is prefix /", r("a", "[{method: GET}]"), "/x", ("bookinfo/a", 0, 0), prefix=""),
    Case(
        "regex matches the whole path",
        r("a", "[{path: {type: RegularExpression, value: '/users/[0-9]+'}}]"),
        "/users/42",
        ("bookinfo/a", 0, 0),
        prefix=None,
    ),
    Case(
        "regex does not match a longer path",
        r("a", "[{path: {type: RegularExpression, value: '/users/[0-9]+'}}]"),
        "/users/42/x",
        None,
    ),
    Case(
        "regex does not match other text",
        r("a", "[{path: {type: RegularExpression, value: '/users/[0-9]+'}}]"),
        "/users/abc",
        None,
    ),
    # --- precedence
    Case(
        "exact beats a prefix listed first",
        r("a", PREFIX_API, EXACT_API),
        "/api",
        ("bookinfo/a", 1, 0),
    ),
    Case(
        "longest prefix wins",
        r("a", PREFIX_API, "[{path: {value: /api/v2}}]"),
        "/api/v2/x",
        ("bookinfo/a", 1, 0),
        prefix="/api/v2",
    ),
    Case(
        "longest prefix wins across routes",
        r("a", PREFIX_API) + r("b", "[{path: {value: /api/v2}}]"),
        "/api/v2",
        ("bookinfo/b", 0, 0),
    ),
    Case(
        "prefix beats a regex",
        r("a", "[{path: {type: RegularExpression, value: '/api/.*'}}]", PREFIX_API),
        "/api/x",
        ("bookinfo/a", 1, 0),
    ),
    Case(
        "a rule without matches (PathPrefix /) outranks a regex (Gateway API defaults)",
        r("a", "[{path: {type: RegularExpression, value: '/api/.*'}}]", EVERY),
        "/api/x",
        ("bookinfo/a", 1, None),
        reason="rule 1 (every request: PathPrefix /)",
    ),
    Case(
        "method beats no method",
        r("a", PREFIX_API, "[{path: {value: /api}, method: GET}]"),
        "/api",
        ("bookinfo/a", 1, 0),
    ),
    Case(
        "method mismatch falls back",
        r("a", PREFIX_API, "[{path: {value: /api}, method: GET}]"),
        "/api",
        ("bookinfo/a", 0, 0),
        method="POST",
    ),
    Case(
        "more headers beat fewer",
        r(
            "a",
            "[{headers: [{name: a, value: '1'}]}]",
            "[{headers: [{name: a, value: '1'}, {name: b, value: '2'}]}]",
        ),
        "/",
        ("bookinfo/a", 1, 0),
        headers=(("a", "1"), ("b", "2")),
    ),
    Case(
        "fewer headers when the others do not match",
        r(
            "a",
            "[{headers: [{name: a, value: '1'}]}]",
            "[{headers: [{name: a, value: '1'}, {name: b, value: '2'}]}]",
        ),
        "/",
        ("bookinfo/a", 0, 0),
        headers=(("a", "1"),),
    ),
    Case(
        "more query params beat fewer",
        r(
            "a",
            "[{queryParams: [{name: x, value: '1'}]}]",
            "[{queryParams: [{name: x, value: '1'}, {name: y, value: '2'}]}]",
        ),
        "/?x=1&y=2",
        ("bookinfo/a", 1, 0),
    ),
    Case(
        "path precedence before method",
        r("a", "[{method: GET}]", "[{path: {value: /api}}]"),
        "/api",
        ("bookinfo/a", 1, 0),
    ),
    Case(
        "ties go to the route key order",
        r("b", PREFIX_API) + r("a", PREFIX_API),
        "/api",
        ("bookinfo/a", 0, 0),
    ),
    Case(
        "ties within a route go to rule order",
        r("a", PREFIX_API, PREFIX_API),
        "/api",
        ("bookinfo/a", 0, 0),
    ),
    Case(
        "matches of a rule are ORed",
        r("a", "[{path: {type: Exact, value: /x}}, {path: {type: Exact, value: /y}}]"),
        "/y",
        ("bookinfo/a", 0, 1),
        reason="route bookinfo/a rule 0 (match 1: Exact /y) matches GET /y",
    ),
    # --- headers and query parameters
    Case(
        "header names are case-insensitive",
        r("a", "[{headers: [{name: X-Canary, value: 'true'}]}]"),
        "/",
        ("bookinfo/a", 0, 0),
        headers=(("x-canary", "true"),),
    ),
    Case(
        "header values are case-sensitive",
        r("a", "[{headers: [{name: x-canary, value: 'true'}]}]"),
        "/",
        None,
        headers=(("x-canary", "TRUE"),),
    ),
    Case(
        "a missing header does not match",
        r("a", "[{headers: [{name: x-canary, value: 'true'}]}]"),
        "/",
        None,
    ),
    Case(
        "header regex",
        r("a", "[{headers: [{type: RegularExpression, name: x-v, value: 'v[0-9]+'}]}]"),
        "/",
        ("bookinfo/a", 0, 0),
        headers=(("x-v", "v12"),),
    ),
    Case(
        "header regex matches the whole value",
        r("a", "[{headers: [{type: RegularExpression, name: x-v, value: 'v[0-9]+'}]}]"),
        "/",
        None,
        headers=(("x-v", "v12x"),),
    ),
    Case(
        "a repeated header is matched joined with ','",
        r("a", "[{headers: [{name: x-a, value: '1,2'}]}]"),
        "/",
        ("bookinfo/a", 0, 0),
        headers=(("x-a", "1"), ("x-a", "2")),
    ),
    Case(
        "query param exact",
        r("a", "[{queryParams: [{name: debug, value: '1'}]}]"),
        "/p?x=2&debug=1",
        ("bookinfo/a", 0, 0),
    ),
    Case(
        "query param other value",
        r("a", "[{queryParams: [{name: debug, value: '1'}]}]"),
        "/p?debug=2",
        None,
    ),
    Case(
        "query param absent",
        r("a", "[{queryParams: [{name: debug, value: '1'}]}]"),
        "/p",
        None,
    ),
    Case(
        "query param names are case-sensitive",
        r("a", "[{queryParams: [{name: debug, value: '1'}]}]"),
        "/p?Debug=1",
        None,
    ),
    Case(
        "the first value of a repeated query param counts",
        r("a", "[{queryParams: [{name: debug, value: '1'}]}]"),
        "/p?debug=2&debug=1",
        None,
    ),
    Case(
        "query param values are percent-decoded",
        r("a", "[{queryParams: [{name: q, value: 'a b'}]}]"),
        "/p?q=a%20b",
        ("bookinfo/a", 0, 0),
    ),
    Case(
        "query param regex",
        r("a", "[{queryParams: [{type: RegularExpression, name: id, value: '[0-9]+'}]}]"),
        "/p?id=123",
        ("bookinfo/a", 0, 0),
    ),
    # --- attachment
    Case(
        "a route for another port does not apply: default rule",
        r("a", PREFIX_API, port=9081),
        "/api",
        None,
        reason="no route attached to service bookinfo/reviews.bookinfo.svc.cluster.local port "
        "9080: default rule",
    ),
    Case(
        "a route for that port applies",
        r("a", PREFIX_API, port=9081),
        "/api",
        ("bookinfo/a", 0, 0),
        port=9081,
    ),
    Case(
        "a parentRef without a port applies to every port",
        r("a", PREFIX_API),
        "/api",
        ("bookinfo/a", 0, 0),
        port=9081,
    ),
    Case(
        "a route for another service does not apply",
        r("a", EVERY, service=RATINGS),
        "/x",
        None,
        reason="no route attached",
    ),
    Case(
        "routes attached but none matches: 404",
        r("a", EXACT_API) + r("b", "[{path: {value: /v2}}]"),
        "/other",
        None,
        reason="no rule of the routes attached to service "
        "bookinfo/reviews.bookinfo.svc.cluster.local port 9080 (bookinfo/a, bookinfo/b) "
        "matches GET /other",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_select_route(case: Case) -> None:
    snap = snapshot(case.routes)
    service = snap.service_by_key(REVIEWS)
    request = Request(case.method, case.path, "reviews", case.headers)
    selection = select_route(snap, service, case.port, request)
    assert case.reason in selection.reason
    if case.chosen is None:
        assert selection.route is None
        if "no route attached" in case.reason:
            # Default rule: the service itself, on the request's port.
            assert selection.rule is not None
            assert [(b.service, b.port) for b in selection.rule.backend_refs] == [
                (REVIEWS, case.port)
            ]
            assert selection.rule.retry is None
            assert selection.rule.timeouts is None
        else:
            assert not selection.found, selection.reason
            assert selection.rule is None
        return
    assert selection.route is not None, selection.reason
    assert selection.rule is not None
    key, rule, match = case.chosen
    assert (selection.route.key, selection.rule_index, selection.match_index) == (key, rule, match)
    assert selection.rule is selection.route.rules[rule]
    if case.prefix is not None or case.id.startswith(("exact", "regex")):
        assert selection.matched_prefix == case.prefix


def test_case_count() -> None:
    assert len(CASES) >= 40


def test_not_addressed_to_a_service() -> None:
    selection = select_route(snapshot(r("a", EVERY)), None, 9080, Request("GET", "/", "10.0.0.1"))
    assert not selection.found
    assert "not addressed to a service" in selection.reason


def test_default_rule_is_built_once_per_service_port() -> None:
    snap = snapshot()
    service = snap.service_by_key(REVIEWS)
    first = select_route(snap, service, 9080, Request("GET", "/", "reviews"))
    again = select_route(snap, service, 9080, Request("POST", "/x", "reviews"))
    assert first.rule is again.rule


def test_route_candidates_are_precomputed_in_precedence_order() -> None:
    snap = snapshot(r("a", EVERY, PREFIX_API, EXACT_API))
    kinds = [(c.path_type.value, c.prefix) for c in snap.route_candidates(REVIEWS)]
    assert kinds == [("Exact", ""), ("PathPrefix", "/api"), ("PathPrefix", "")]
    assert snap.route_candidates(REVIEWS) is snap.route_candidates(REVIEWS)


# --- choose_backend ---------------------------------------------------------------------------


def rule_with_weights(*weights: int) -> RouteRule:
    return RouteRule(
        backend_refs=tuple(BackendRef(service=REVIEWS, port=9080, weight=w) for w in weights)
    )


@pytest.mark.parametrize(
    ("weights", "draw", "index"),
    [
        pytest.param((1,), 0.0, 0, id="single-backend-low"),
        pytest.param((1,), 0.999999, 0, id="single-backend-high"),
        pytest.param((90, 10), 0.0, 0, id="canary-first-bucket-start"),
        pytest.param((90, 10), 0.8999, 0, id="canary-first-bucket-end"),
        pytest.param((90, 10), 0.9, 1, id="canary-second-bucket-start"),
        pytest.param((90, 10), 0.9999, 1, id="canary-second-bucket-end"),
        pytest.param((0, 5), 0.0, 1, id="zero-weight-first-never-chosen"),
        pytest.param((1, 0, 1), 0.4999, 0, id="zero-weight-middle-low"),
        pytest.param((1, 0, 1), 0.5, 2, id="zero-weight-middle-skipped"),
        pytest.param((5, 0), 0.9999, 0, id="zero-weight-last-never-chosen"),
        pytest.param((0, 0), 0.5, None, id="all-zero"),
        pytest.param((0,), 0.0, None, id="single-zero"),
        pytest.param((1_000_000, 1), 0.999999999, 1, id="huge-weights"),
    ],
)
def test_choose_backend(weights: tuple[int, ...], draw: float, index: int | None) -> None:
    assert choose_backend(rule_with_weights(*weights), draw) == index


def test_choose_backend_splits_evenly_spaced_draws_by_weight() -> None:
    rule = rule_with_weights(90, 10)
    counts = [0, 0]
    for i in range(1000):
        chosen = choose_backend(rule, i / 1000)
        assert chosen is not None
        counts[chosen] += 1
    assert counts == [900, 100]


@pytest.mark.parametrize("draw", [-0.1, 1.0, 1.5])
def test_choose_backend_refuses_a_draw_outside_unit_interval(draw: float) -> None:
    with pytest.raises(ValueError, match="not in"):
        choose_backend(rule_with_weights(1), draw)


# --- backend_endpoints ------------------------------------------------------------------------

SUBSETS = r("a", EVERY).replace(
    f"backendRefs: [{{service: {REVIEWS}, port: 9080}}]",
    f"backendRefs: [{{service: {REVIEWS}, port: 9080, subset: {{version: v2}}}},"
    f" {{service: {REVIEWS}, port: 9080, subset: {{version: v3}}}},"
    f" {{service: {REVIEWS}, port: 9080, subset: {{tier: canary, version: v2}}}},"
    f" {{service: {REVIEWS}, port: 9080}}]",
)


@pytest.mark.parametrize(
    ("index", "names"),
    [
        pytest.param(0, ["reviews-v2", "reviews-v2b"], id="version-subset"),
        pytest.param(1, [], id="subset-of-only-unhealthy-endpoints"),
        pytest.param(2, ["reviews-v2"], id="explicit-label-and-version"),
        pytest.param(3, ["reviews-v1", "reviews-v2", "reviews-v2b"], id="no-subset-healthy-only"),
    ],
)
def test_backend_endpoints(index: int, names: list[str]) -> None:
    snap = snapshot(SUBSETS)
    (route,) = snap.config.routes
    backend = route.rules[0].backend_refs[index]
    assert [w.name for w in backend_endpoints(snap, backend)] == names


def test_backend_endpoints_for_a_backend_not_in_the_config() -> None:
    snap = snapshot()
    backend = BackendRef(service=REVIEWS, port=9080, subset=(("app", "reviews"),))
    assert [w.name for w in backend_endpoints(snap, backend)] == [
        "reviews-v1",
        "reviews-v2",
        "reviews-v2b",
    ]


def test_service_without_workloads_has_no_endpoints() -> None:
    snap = snapshot()
    other = BackendRef(service="bookinfo/none.bookinfo.svc.cluster.local", port=1)
    assert backend_endpoints(snap, other) == ()
    assert isinstance(snap.service_by_key(REVIEWS), Service)
