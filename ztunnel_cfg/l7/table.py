"""Routes compiled once per snapshot: one candidate per (route, rule, match), in precedence order.

Gateway API precedence across every route attached to a service: an Exact path match first,
then the longest PathPrefix, then RegularExpression paths; then a match with a method; then
more header matches; then more query parameter matches; ties go to the route key order, then
rule order, then match order.  A match without a path is ``PathPrefix /`` and a rule without
matches matches every request (Gateway API's defaults), so both rank as the shortest prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ztunnel_cfg.model import (
    HttpHeaderMatch,
    HttpQueryParamMatch,
    HttpRoute,
    HttpRouteMatch,
    PathMatchType,
    RouteRule,
    ValueMatchType,
)

__all__ = ["RouteCandidate", "ValueMatcher", "build_route_table"]

_PATH_RANK = {
    PathMatchType.EXACT: 0,
    PathMatchType.PATH_PREFIX: 1,
    PathMatchType.REGULAR_EXPRESSION: 2,
}
_EVERY_REQUEST = HttpRouteMatch()


@dataclass(frozen=True, slots=True)
class ValueMatcher:
    """A header or query parameter condition, regex compiled."""

    name: str
    value: str
    regex: re.Pattern[str] | None

    def matches(self, found: str | None) -> bool:
        if found is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(found) is not None
        return found == self.value

    def __str__(self) -> str:
        op = "~" if self.regex is not None else "="
        return f"{self.name}{op}{self.value}"


def _matcher(m: HttpHeaderMatch | HttpQueryParamMatch) -> ValueMatcher:
    regex = re.compile(m.value) if m.type is ValueMatchType.REGULAR_EXPRESSION else None
    return ValueMatcher(m.name, m.value, regex)


@dataclass(frozen=True, slots=True)
class RouteCandidate:
    """One match of one rule, ready to test against requests to one service."""

    route: HttpRoute
    rule_index: int
    match_index: int | None  # None: the rule has no matches (every request)
    ports: frozenset[int] | None  # the service ports the route attaches to; None: all
    path_type: PathMatchType
    path_value: str  # as written (regex text, exact path, prefix)
    prefix: str  # PathPrefix without trailing '/' ("" for '/'); "" otherwise
    path_regex: re.Pattern[str] | None
    method: str | None
    headers: tuple[ValueMatcher, ...]
    query_params: tuple[ValueMatcher, ...]

    @property
    def rule(self) -> RouteRule:
        return self.route.rules[self.rule_index]

    def applies_to_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def path_matches(self, path: str) -> bool:
        if self.path_type is PathMatchType.PATH_PREFIX:
            # Whole segments: /abc matches /abc, /abc/ and /abc/def, not /abcd.
            p = self.prefix
            return not p or path == p or path.startswith(p + "/")
        if self.path_type is PathMatchType.EXACT:
            return path == self.path_value
        assert self.path_regex is not None  # set for every RegularExpression candidate
        return self.path_regex.fullmatch(path) is not None

    def describe(self) -> str:
        """The match in words: ``PathPrefix /api, method GET, header x-canary=1``."""
        parts = [f"{self.path_type.value} {self.path_value}"]
        if self.method is not None:
            parts.append(f"method {self.method}")
        parts.extend(f"header {h}" for h in self.headers)
        parts.extend(f"query {q}" for q in self.query_params)
        return ", ".join(parts)


def _candidate(
    route: HttpRoute,
    rule_index: int,
    match_index: int | None,
    match: HttpRouteMatch,
    ports: frozenset[int] | None,
) -> RouteCandidate:
    path = match.path
    regex = re.compile(path.value) if path.type is PathMatchType.REGULAR_EXPRESSION else None
    return RouteCandidate(
        route=route,
        rule_index=rule_index,
        match_index=match_index,
        ports=ports,
        path_type=path.type,
        path_value=path.value,
        prefix=path.prefix if path.type is PathMatchType.PATH_PREFIX else "",
        path_regex=regex,
        method=match.method,
        headers=tuple(_matcher(h) for h in match.headers),
        query_params=tuple(_matcher(q) for q in match.query_params),
    )


def _precedence(c: RouteCandidate) -> tuple[int, int, int, int, int, str, int, int]:
    return (
        _PATH_RANK[c.path_type],
        -len(c.prefix),
        0 if c.method is not None else 1,
        -len(c.headers),
        -len(c.query_params),
        c.route.key,
        c.rule_index,
        c.match_index or 0,
    )


def _ports_by_service(route: HttpRoute) -> dict[str, frozenset[int] | None]:
    ports: dict[str, frozenset[int] | None] = {}
    for ref in route.parent_refs:
        known = ports.get(ref.service, frozenset())
        # A parentRef without a port attaches to every port of the service.
        ports[ref.service] = None if ref.port is None or known is None else known | {ref.port}
    return ports


def build_route_table(routes: Iterable[HttpRoute]) -> dict[str, tuple[RouteCandidate, ...]]:
    """Service key -> its route candidates, highest precedence first."""
    table: dict[str, list[RouteCandidate]] = {}
    for route in routes:
        for service, ports in _ports_by_service(route).items():
            found = table.setdefault(service, [])
            for rule_index, rule in enumerate(route.rules):
                if not rule.matches:
                    found.append(_candidate(route, rule_index, None, _EVERY_REQUEST, ports))
                for match_index, match in enumerate(rule.matches):
                    found.append(_candidate(route, rule_index, match_index, match, ports))
    return {k: tuple(sorted(v, key=_precedence)) for k, v in table.items()}
