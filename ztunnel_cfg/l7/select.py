"""Which rule of which route handles a request, and which backend and endpoints it goes to."""

from __future__ import annotations

import functools
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ztunnel_cfg.l7.request import Request, header_value
from ztunnel_cfg.l7.table import RouteCandidate
from ztunnel_cfg.model import (
    BackendRef,
    HttpRoute,
    PathMatchType,
    RouteRule,
    Service,
    Workload,
)

if TYPE_CHECKING:  # the snapshot imports this package (its route table)
    from ztunnel_cfg.snapshot import Snapshot

__all__ = ["RouteSelection", "backend_endpoints", "choose_backend", "select_route"]


@dataclass(frozen=True, slots=True)
class RouteSelection:
    """The outcome of :func:`select_route`.

    ``rule`` None: routes are attached but none matches (the waypoint answers 404), or the
    request was not for a service.  ``route`` None with a rule: no route is attached, and
    ``rule`` is the synthetic default (the service itself on the request's port).
    ``matched_prefix`` is the PathPrefix that matched (no trailing '/'; "" for '/'), which
    ReplacePrefixMatch replaces; None for Exact and RegularExpression matches.
    """

    route: HttpRoute | None
    rule_index: int | None
    rule: RouteRule | None
    match_index: int | None
    matched_prefix: str | None
    reason: str

    @property
    def found(self) -> bool:
        return self.rule is not None


@functools.lru_cache(maxsize=4096)
def _default_rule(service_key: str, port: int) -> RouteRule:
    # Immutable and validated once per (service, port), not per request.
    return RouteRule(backend_refs=(BackendRef(service=service_key, port=port),))


def _request_text(request: Request) -> str:
    return f"{request.method} {request.path}"


def _query_values(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, value)  # the first value counts (as Envoy)
    return values


def _matches(
    c: RouteCandidate,
    request: Request,
    path: str,
    query: dict[str, str] | None,
) -> tuple[bool, dict[str, str] | None]:
    """Whether ``c`` matches; the parsed query is passed back so it is parsed at most once."""
    if c.method is not None and c.method != request.method:
        return False, query
    if not c.path_matches(path):
        return False, query
    for h in c.headers:
        if not h.matches(header_value(request.headers, h.name)):
            return False, query
    if c.query_params:
        if query is None:
            query = _query_values(request.query)
        for q in c.query_params:
            if not q.matches(query.get(q.name)):
                return False, query
    return True, query


def select_route(
    snapshot: Snapshot, service: Service | None, port: int, request: Request
) -> RouteSelection:
    """The rule that handles ``request`` to ``service:port``, by Gateway API precedence."""
    if service is None:
        return RouteSelection(
            None,
            None,
            None,
            None,
            None,
            f"{_request_text(request)} is not addressed to a service: routes attach to "
            "services, so none applies (forward to the addressed workload)",
        )
    candidates = [c for c in snapshot.route_candidates(service.key) if c.applies_to_port(port)]
    if not candidates:
        return RouteSelection(
            None,
            None,
            _default_rule(service.key, port),
            None,
            "",
            f"no route attached to service {service.key} port {port}: default rule, to the "
            f"service itself on port {port}",
        )
    path = request.path_only
    query: dict[str, str] | None = None
    for c in candidates:
        hit, query = _matches(c, request, path, query)
        if hit:
            which = "every request" if c.match_index is None else f"match {c.match_index}"
            return RouteSelection(
                c.route,
                c.rule_index,
                c.rule,
                c.match_index,
                c.prefix if c.path_type is PathMatchType.PATH_PREFIX else None,
                f"route {c.route.key} rule {c.rule_index} ({which}: {c.describe()}) matches "
                f"{_request_text(request)}",
            )
    names = ", ".join(dict.fromkeys(c.route.key for c in candidates))
    return RouteSelection(
        None,
        None,
        None,
        None,
        None,
        f"no rule of the routes attached to service {service.key} port {port} ({names}) "
        f"matches {_request_text(request)}",
    )


def choose_backend(rule: RouteRule, draw: float) -> int | None:
    """Index of the backendRef that ``draw`` (uniform in [0, 1)) picks by weight.

    None when every weight is 0 (the waypoint answers 500).
    """
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw {draw!r} is not in [0, 1)")
    weights = [b.weight for b in rule.backend_refs]
    total = sum(weights)
    if total == 0:
        return None
    point = draw * total
    running = 0
    last = None
    for index, weight in enumerate(weights):
        if weight == 0:
            continue
        running += weight
        last = index
        if point < running:
            return index
    return last  # only reachable through float rounding at the very top


def backend_endpoints(snapshot: Snapshot, backend: BackendRef) -> tuple[Workload, ...]:
    """Healthy endpoints of the backend's service that carry every ``subset`` label."""
    return snapshot.subset_endpoints(backend.service, backend.subset)
