"""The demo's L7 act (pure): a waypoint joins the running mesh in front of four services, the
frontend sends HTTP through it, and the report says what was observed.

- :func:`build_l7_scenario`: the pods the act adds, its services, route, traffic policy, L7
  policy, the HTTP apps to start and the requests to make;
- :class:`L7Observations`: what curl, the apps' own records and the waypoint's ``/metrics``
  and ``/config_dump`` said;
- :func:`check_l7`: every way that differs from the config; :func:`render_l7`: the report.

The act runs after the L4 act, on the same cluster (:mod:`meshlab.demo.l7_run`); its pods
leave again at its end, so the L4 cluster is what ``--keep`` keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshlab.config import PodRole, ServiceDef, WaypointDef
from meshlab.demo.report import Style

L7_NAMESPACE = "shop"
SIGMAS = 4.5  # canary tolerance: a correct 90/10 split misses it about once in 150,000 runs
DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class AppDef:
    """One HTTP app (``meshlab.apps http``) the act starts: in the pod of ``workload``, on
    ``service``'s target port."""

    workload: str
    service: str
    fail_percent: int = 0
    delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class L7Scenario:
    client: str  # workload name of the pod that sends the requests (curl runs in it)
    pods: tuple[tuple[str, PodRole], ...]  # (node, role) of the pods the act adds
    waypoint: WaypointDef
    services: tuple[ServiceDef, ...]
    routes: tuple[Mapping[str, Any], ...]
    traffic_policies: tuple[Mapping[str, Any], ...]
    policies: tuple[Mapping[str, Any], ...]
    apps: tuple[AppDef, ...]
    canary_requests: int
    canary_weights: Mapping[str, int]  # workload -> weight, from the route
    retry_requests: int
    retry_attempts: int
    route_timeout: float  # seconds
    breaker_concurrency: int
    allowed_path: str
    denied_path: str

    def service(self, name: str) -> ServiceDef:
        return next(s for s in self.services if s.name == name)

    def without_policy(self, name: str) -> L7Scenario:
        """The same intent with one policy missing from the config (a sabotaged waypoint,
        to prove that the act judges by what it observes)."""
        return replace(self, policies=tuple(p for p in self.policies if p.get("name") != name))

    def app(self, service: str) -> AppDef:
        return next(a for a in self.apps if a.service == service)

    def extra_config(self) -> dict[str, Any]:
        return {"routes": [dict(r) for r in self.routes],
                "trafficPolicies": [dict(t) for t in self.traffic_policies]}

    @property
    def request_count(self) -> int:
        return (self.canary_requests + self.retry_requests + 1 + self.breaker_concurrency + 2)


def build_l7_scenario() -> L7Scenario:
    """reviews (v1 on node2, v2 on node1) with a 90/10 canary and an L7 DENY on /admin*;
    ratings failing every other request behind a retry; details slower than its route
    timeout; checkout behind a circuit breaker of one connection and one pending request.
    The waypoint runs in its own pod on node2."""
    ns = L7_NAMESPACE
    waypoint = WaypointDef("waypoint", "10.96.0.40", "waypoint", namespace=ns)

    def svc(name: str, index: int, endpoints: list[str]) -> ServiceDef:
        return ServiceDef(name, f"10.96.0.{30 + index}", {80: 9080 + index}, endpoints,
                          namespace=ns, waypoint=waypoint)

    services = (svc("reviews", 0, ["reviews-v1", "reviews-v2"]), svc("ratings", 1, ["reviews-v1"]),
                svc("details", 2, ["reviews-v2"]), svc("checkout", 3, ["reviews-v1"]))
    key = {s.name: s.key for s in services}
    timeout = 0.25
    attempts = 3
    routes = (
        {"name": "reviews-canary", "namespace": ns, "parentRefs": [{"service": key["reviews"]}],
         "rules": [{"backendRefs": [
             {"service": key["reviews"], "port": 80, "weight": 90, "subset": {"version": "v1"}},
             {"service": key["reviews"], "port": 80, "weight": 10, "subset": {"version": "v2"}},
         ]}]},
        {"name": "ratings-retry", "namespace": ns, "parentRefs": [{"service": key["ratings"]}],
         "rules": [{"backendRefs": [{"service": key["ratings"], "port": 80}],
                    "retry": {"attempts": attempts, "retryOn": ["5xx"], "backoff": "5ms"}}]},
        {"name": "details-timeout", "namespace": ns, "parentRefs": [{"service": key["details"]}],
         "rules": [{"backendRefs": [{"service": key["details"], "port": 80}],
                    "timeouts": {"request": f"{int(timeout * 1000)}ms"}}]},
    )
    traffic = ({"name": "checkout-breaker", "namespace": ns, "service": key["checkout"],
                "connectionPool": {"tcp": {"maxConnections": 1},
                                   "http": {"http1MaxPendingRequests": 1}}},)
    policies = ({"name": "reviews-no-admin", "namespace": ns, "action": "Deny",
                 "targetRefs": [{"kind": "Service", "name": "reviews"}],
                 "rules": [[[{"paths": ["/admin*"]}]]]},)
    pods = (
        ("node2", PodRole(ns, "reviews", name="reviews-v1", labels={"version": "v1"})),
        ("node1", PodRole(ns, "reviews", name="reviews-v2", labels={"version": "v2"})),
        ("node2", PodRole(ns, "waypoint", name="waypoint")),
    )
    apps = (AppDef("reviews-v1", "reviews"), AppDef("reviews-v2", "reviews"),
            AppDef("reviews-v1", "ratings", fail_percent=50),
            AppDef("reviews-v2", "details", delay_ms=1500),
            AppDef("reviews-v1", "checkout", delay_ms=600))
    return L7Scenario(
        client="frontend", pods=pods, waypoint=waypoint, services=services, routes=routes,
        traffic_policies=traffic, policies=policies, apps=apps, canary_requests=200,
        canary_weights={"reviews-v1": 90, "reviews-v2": 10}, retry_requests=10,
        retry_attempts=attempts, route_timeout=timeout, breaker_concurrency=6,
        allowed_path="/reviews/1", denied_path="/admin/stats")


# -- observations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One request as the client (curl) saw it."""

    status: int  # 0: no HTTP answer
    served_by: str
    seconds: float
    body: str = ""


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One istio_requests_total series of the waypoint (reporter="waypoint")."""

    service: str  # destination_service_name
    code: str
    flags: str
    count: int


@dataclass(frozen=True, slots=True)
class L7Observations:
    waypoint: str  # ns/name
    waypoint_pod: str  # short name
    waypoint_node: str
    waypoint_identity: str  # from its /config_dump
    canary: tuple[Reply, ...]
    canary_recorded: Mapping[str, int]  # workload -> requests in its app's record
    retries: tuple[Reply, ...]
    retry_backend_statuses: tuple[int, ...]  # the flaky app's record, in order
    retry_counter: float  # nodeproxy_waypoint_retries_total of ratings
    timeout: Reply
    timeout_backend_saw: int
    breaker: tuple[Reply, ...]
    breaker_backend_saw: int
    allowed: Reply
    denied: Reply
    deny_backend_paths: tuple[str, ...]
    requests: tuple[RequestRow, ...]
    seconds: float = 0.0

    def count(self, service: str, code: str | int, flags: str | None = None) -> int:
        return sum(r.count for r in self.requests if r.service == service
                   and r.code == str(code) and (flags is None or r.flags == flags))


def summarize_requests(text: str) -> tuple[RequestRow, ...]:
    """The waypoint's istio_requests_total by (service, code, flags), from ``/metrics``."""
    sums: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "istio_requests_total" or \
                    sample.labels.get("reporter") != "waypoint":
                continue
            key = (sample.labels.get("destination_service_name", "?"),
                   sample.labels.get("response_code", "?"),
                   sample.labels.get("response_flags", "?"))
            sums[key] = sums.get(key, 0.0) + sample.value
    return tuple(RequestRow(s, c, f, int(v)) for (s, c, f), v in sorted(sums.items()))


def counter_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of counter ``name`` (``_total`` included) matching ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def tally(values: Sequence[Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def canary_tolerance(scenario: L7Scenario, workload: str) -> tuple[float, float]:
    """(expected count, allowed deviation) of ``workload`` in the canary."""
    n = scenario.canary_requests
    share = scenario.canary_weights[workload] / sum(scenario.canary_weights.values())
    return n * share, SIGMAS * math.sqrt(n * share * (1 - share))


# -- verdict (pure) ------------------------------------------------------------------------------


def check_l7(scenario: L7Scenario, obs: L7Observations) -> list[str]:
    """Every way the observed L7 act differs from what its config says must happen."""
    problems: list[str] = []
    n = scenario.canary_requests
    statuses = tally([r.status for r in obs.canary])
    served = tally([r.served_by for r in obs.canary])
    if statuses != {200: n}:
        problems.append(f"canary: want {n} x 200, got {statuses}")
    for workload in scenario.canary_weights:
        mean, dev = canary_tolerance(scenario, workload)
        got = served.get(workload, 0)
        if abs(got - mean) > dev:
            problems.append(f"canary: {workload} served {got} of {n}, want {mean:.0f} ± "
                            f"{dev:.0f}")
    if dict(obs.canary_recorded) != {w: served.get(w, 0) for w in obs.canary_recorded}:
        problems.append(f"canary: the apps recorded {dict(obs.canary_recorded)}, the client "
                        f"saw {served}")
    failures = obs.retry_backend_statuses.count(503)
    if tally([r.status for r in obs.retries]) != {200: scenario.retry_requests}:
        problems.append(f"retries: the client saw {tally([r.status for r in obs.retries])}, "
                        f"want only 200s")
    if failures == 0:
        problems.append("retries: the flaky app never failed, so nothing was masked")
    if obs.retry_counter != failures:
        problems.append(f"retries: the waypoint retried {obs.retry_counter:g} times for "
                        f"{failures} failures")
    if obs.timeout.status != 504:
        problems.append(f"timeout: want 504, got {obs.timeout.status}")
    if obs.timeout.seconds >= scenario.app("details").delay_ms / 1000:
        problems.append(f"timeout: the answer took {obs.timeout.seconds:.2f} s, as long as "
                        "the slow app itself")
    if obs.count("details", 504, "UT") != 1:
        problems.append(f"timeout: the waypoint counted {obs.count('details', 504, 'UT')} "
                        "x 504 UT, want 1")
    if obs.timeout_backend_saw != 1:
        problems.append("timeout: the slow app did not get the request")
    codes = tally([r.status for r in obs.breaker])
    overflowed = [r for r in obs.breaker if r.status == 503]
    if set(codes) != {200, 503}:
        problems.append(f"circuit breaker: want 200s and 503s, got {codes}")
    if obs.count("checkout", 503, "UO") != len(overflowed):
        problems.append(f"circuit breaker: the waypoint counted "
                        f"{obs.count('checkout', 503, 'UO')} x 503 UO, the client saw "
                        f"{len(overflowed)}")
    if obs.breaker_backend_saw != codes.get(200, 0):
        problems.append(f"circuit breaker: the app saw {obs.breaker_backend_saw} requests, "
                        f"{codes.get(200, 0)} were answered")
    if any(r.seconds >= scenario.app("checkout").delay_ms / 1000 for r in overflowed):
        problems.append("circuit breaker: an overflowed request waited instead of failing fast")
    if obs.allowed.status != 200:
        problems.append(f"L7 deny: the allowed path got {obs.allowed.status}")
    if obs.denied.status != 403 or DENIED_BODY not in obs.denied.body:
        problems.append(f"L7 deny: the denied path got {obs.denied.status} "
                        f"{obs.denied.body.strip()[:60]!r}")
    if scenario.denied_path in obs.deny_backend_paths:
        problems.append("L7 deny: the denied request reached the app")
    if obs.count("reviews", 403, "DENY") != 1:
        problems.append(f"L7 deny: the waypoint counted {obs.count('reviews', 403, 'DENY')} "
                        "x 403 DENY, want 1")
    return problems


# -- report (pure) -------------------------------------------------------------------------------


def _counts(counts: Mapping[Any, int]) -> str:
    return " · ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


def render_l7(scenario: L7Scenario, obs: L7Observations, problems: Sequence[str], *,
              color: bool = False) -> str:
    """The L7 act's report; every fact in it comes from ``obs`` (the intent it is compared
    with comes from ``scenario``, i.e. the config)."""
    st = Style(color)
    names = ", ".join(s.name for s in scenario.services)
    lines = ["", st.bold(f"L7 act: waypoint {obs.waypoint} in pod {obs.waypoint_pod} on "
                         f"{obs.waypoint_node}, in front of {names}"),
             "  " + st.dim(f"its identity {obs.waypoint_identity}; requests from "
                           f"{scenario.client} by curl, through the agents, over HBONE")]

    def verdict(topic: str, text: str) -> None:
        bad = [p for p in problems if p.startswith(topic)]
        lines.append(f"{st.ok(not bad)} {st.bold(topic)}: {text}")
        lines.extend(f"    {st.red('problem')}: {p}" for p in bad)

    served = tally([r.served_by for r in obs.canary])
    weights = "/".join(str(w) for w in scenario.canary_weights.values())
    expect = ", ".join(f"{w} {m:.0f} ± {d:.0f}" for w in scenario.canary_weights
                       for m, d in [canary_tolerance(scenario, w)])
    verdict("canary", f"{weights} split of {len(obs.canary)} requests to reviews → "
                      f"{_counts(served)} (expected {expect}); answers "
                      f"{_counts(tally([r.status for r in obs.canary]))}")
    backend = tally(obs.retry_backend_statuses)
    verdict("retries", f"{len(obs.retries)} requests to ratings, whose app answered "
                       f"{_counts(backend)}: the client saw "
                       f"{_counts(tally([r.status for r in obs.retries]))}, the waypoint "
                       f"retried {obs.retry_counter:g} times")
    details = scenario.app("details")
    verdict("timeout", f"details answers after {details.delay_ms} ms; its route's "
                       f"{scenario.route_timeout * 1000:.0f} ms timeout answered "
                       f"{obs.timeout.status} after {obs.timeout.seconds:.2f} s "
                       f"(waypoint: 504 UT x{obs.count('details', 504, 'UT')})")
    codes = tally([r.status for r in obs.breaker])
    fastest = max((r.seconds for r in obs.breaker if r.status == 503), default=0.0)
    verdict("circuit breaker", f"{len(obs.breaker)} concurrent requests to checkout "
                               f"(maxConnections 1, 1 pending): {_counts(codes)}; the 503s "
                               f"(UO x{obs.count('checkout', 503, 'UO')}) came within "
                               f"{fastest:.2f} s, the app saw {obs.breaker_backend_saw}")
    def answer(reply: Reply) -> str:
        # The waypoint's own answers have no x-served-by: show what they said instead.
        if reply.served_by:
            return f"{reply.status} from {reply.served_by}"
        return f"{reply.status} {reply.body.strip()[:40]!r}"

    verdict("L7 deny", f"GET {scenario.allowed_path} → {answer(obs.allowed)}; GET "
                       f"{scenario.denied_path} → {answer(obs.denied)}; the app saw "
                       f"{', '.join(obs.deny_backend_paths) or 'nothing'}")
    lines.append(st.bold("  the waypoint's istio_requests_total") + st.dim("  (:15020/metrics "
                                                                         "in its pod)"))
    for service in dict.fromkeys(r.service for r in obs.requests):
        rows = [r for r in obs.requests if r.service == service]
        lines.append(f"    {service:<10} " + " · ".join(
            f"{r.code}{'' if r.flags == '-' else ' ' + r.flags} x{r.count}" for r in rows))
    if problems:
        lines.append(st.red(f"✘ the waypoint did not behave as configured ({len(problems)} "
                            f"problem{'s' if len(problems) != 1 else ''})"))
    else:
        lines.append(st.green(f"✔ all 5 L7 behaviours observed as configured "
                              f"({sum(r.count for r in obs.requests)} requests through the "
                              "waypoint)"))
    if obs.seconds:
        lines.append(st.dim(f"  L7 act: setup and requests took {obs.seconds:.1f} s"))
    return "\n".join(lines) + "\n"
