"""L4 authorization: a pure decision over a snapshot, with Istio/ztunnel semantics.

1. Every DENY policy applying to the destination is checked first; any matching rule denies.
2. If at least one ALLOW policy applies, one of their rules must match, else the connection
   is denied.  With no ALLOW policy applying, the connection is allowed.

A policy matches when any of its rules matches; a rule when all its clauses match; a clause
when any of its matches matches; a match when every field it sets holds.  A positive field
holds when one of its values matches; a ``not`` field holds when none of its values matches.
Identity fields (namespaces, serviceAccounts, principals) never match a connection without
a verified identity, so their ``not`` forms always hold for such connections (as in Istio).

HTTP fields (methods, paths, hosts, requestHeaders and their ``not`` forms) are checked by
:func:`authorize_request` at a waypoint, for the policies whose targetRefs name it or the
service.  A node agent (:func:`authorize`) sees only connections, so it enforces them fail
closed, as Istio's ztunnel does: in an ALLOW policy a match with HTTP fields never matches;
in a DENY policy they are ignored, so it denies the whole connection.  Policies with
targetRefs never apply at node agents.  Missing headers never match a positive condition and
always satisfy a ``not`` one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ztunnel_cfg.l7.request import HeaderList, header_value
from ztunnel_cfg.model import (
    Action,
    IPAddress,
    IPNetwork,
    Match,
    Policy,
    Rule,
    Service,
    StringMatch,
    WaypointConfig,
    Workload,
)
from ztunnel_cfg.snapshot import Snapshot, to_ip
from ztunnel_cfg.spiffe import SpiffeId

__all__ = [
    "ConnectionInfo",
    "Decision",
    "RequestInfo",
    "authorize",
    "authorize_request",
    "authorize_tcp_at_waypoint",
    "rule_matches",
]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What authorization sees of a connection.  ``source_identity`` None: plaintext."""

    source_identity: SpiffeId | None
    source_ip: IPAddress | str
    destination_ip: IPAddress | str
    destination_port: int


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a waypoint's authorization sees of an HTTP request.

    ``path`` excludes the query; ``host`` is the authority without its port; header names
    are lower case (a name may repeat: its values are joined with ',').
    """

    source_identity: SpiffeId | None
    source_ip: IPAddress | str
    destination_ip: IPAddress | str
    destination_port: int
    method: str
    path: str
    host: str
    headers: HeaderList = ()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy
    rule: int | None  # index of the deciding rule in that policy
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class _Http:
    method: str
    path: str
    host: str  # lower case: hosts compare case-insensitively
    headers: HeaderList


@dataclass(frozen=True, slots=True)
class _Conn:
    identity: SpiffeId | None
    src: IPAddress | None
    dst: IPAddress | None
    port: int
    http: _Http | None = None  # None: a node agent, which sees no HTTP


class _Only(Enum):
    """Witness of a field pair that holds and has no positive values (only ``not`` ones)."""

    NEGATIVE = 0


_ONLY_NOT = _Only.NEGATIVE

# -- the field checks: each exists once.  A check returns None when its pair fails, else the
# witness (which positive value matched) that the explanation needs, so phrases are only
# formatted, never re-decided.


def _string_hit(
    value: str | None, positive: tuple[StringMatch, ...], negative: tuple[StringMatch, ...]
) -> StringMatch | _Only | None:
    # Also for paths: PathPattern is a StringMatch whose matches() knows templates.
    hit: StringMatch | _Only = _ONLY_NOT
    if positive:
        if value is None:
            return None
        for m in positive:
            if m.matches(value):
                hit = m
                break
        else:
            return None
    if negative and value is not None:
        for m in negative:
            if m.matches(value):
                return None
    return hit


def _net_hit(
    value: IPAddress | None, positive: tuple[IPNetwork, ...], negative: tuple[IPNetwork, ...]
) -> IPNetwork | _Only | None:
    hit: IPNetwork | _Only = _ONLY_NOT
    if positive:
        if value is None:
            return None
        for n in positive:
            if value in n:
                hit = n
                break
        else:
            return None
    if negative and value is not None:
        for n in negative:
            if value in n:
                return None
    return hit


def _port_ok(value: int, positive: tuple[int, ...], negative: tuple[int, ...]) -> bool:
    return (not positive or value in positive) and value not in negative


# -- phrases, from a check's witness --------------------------------------------------------


def _fmt(values: tuple[object, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _string_phrase(
    what: str,
    value: str | None,
    hit: StringMatch | _Only,
    negative: tuple[StringMatch, ...],
    absent: str = "(none: no verified identity)",
) -> str:
    phrases = []
    if hit is not _ONLY_NOT:
        phrases.append(f"{what} '{value}' matches '{hit}'")
    if negative:
        shown = f"'{value}'" if value is not None else absent
        phrases.append(f"{what} {shown} is not one of {_fmt(negative)}")
    return " and ".join(phrases)


def _net_phrase(
    what: str, value: IPAddress | None, hit: IPNetwork | _Only, negative: tuple[IPNetwork, ...]
) -> str:
    phrases = []
    if hit is not _ONLY_NOT:
        phrases.append(f"{what} {value} is in {hit}")
    if negative:
        phrases.append(f"{what} {value} is not in {_fmt(negative)}")
    return " and ".join(phrases)


def _port_phrase(value: int, positive: tuple[int, ...], negative: tuple[int, ...]) -> str:
    phrases = []
    if positive:
        phrases.append(f"destination port {value} is listed")
    if negative:
        phrases.append(f"destination port {value} is not one of {', '.join(map(str, negative))}")
    return " and ".join(phrases)


# -- the evaluator ---------------------------------------------------------------------------


def _http_match(m: Match, h: _Http, why: list[str] | None) -> bool:
    """Whether the HTTP fields of ``m`` hold for ``h`` (phrases appended to ``why``)."""
    for what, value, positive, negative in (
        ("method", h.method, m.methods, m.not_methods),
        ("path", h.path, m.paths, m.not_paths),
        ("host", h.host, m.hosts, m.not_hosts),
    ):
        if positive or negative:
            hit = _string_hit(value, positive, negative)
            if hit is None:
                return False
            if why is not None:
                why.append(_string_phrase(what, value, hit, negative))
    for name, values in m.request_headers:
        found = header_value(h.headers, name)
        hit = _string_hit(found, values, ())
        if hit is None:
            return False
        if why is not None:
            why.append(_string_phrase(f"header {name}", found, hit, ()))
    for name, values in m.not_request_headers:
        found = header_value(h.headers, name)
        if _string_hit(found, (), values) is None:
            return False
        if why is not None:
            why.append(_string_phrase(f"header {name}", found, _ONLY_NOT, values, "(absent)"))
    return True


def _match(m: Match, c: _Conn, explain: bool, deny: bool = False) -> str | None:
    """None when ``m`` does not match ``c``; else why ("" unless ``explain``).

    Unset field pairs are skipped without a call; phrases are built only when explaining
    (building them for every attempted match made authorize() ~3x slower).  ``deny``: the
    policy is a DENY (HTTP fields a node agent cannot check are then ignored, not failed)."""
    ident = c.identity
    why: list[str] | None = [] if explain else None
    if m.namespaces or m.not_namespaces:
        value = ident.namespace if ident else None
        hit = _string_hit(value, m.namespaces, m.not_namespaces)
        if hit is None:
            return None
        if why is not None:
            why.append(_string_phrase("source namespace", value, hit, m.not_namespaces))
    if m.service_accounts or m.not_service_accounts:
        value = ident.service_account if ident else None
        hit = _string_hit(value, m.service_accounts, m.not_service_accounts)
        if hit is None:
            return None
        if why is not None:
            why.append(_string_phrase("source service account", value, hit, m.not_service_accounts))
    if m.principals or m.not_principals:
        value = ident.uri if ident else None
        hit = _string_hit(value, m.principals, m.not_principals)
        if hit is None:
            return None
        if why is not None:
            why.append(_string_phrase("source principal", value, hit, m.not_principals))
    if m.source_ips or m.not_source_ips:
        net = _net_hit(c.src, m.source_ips, m.not_source_ips)
        if net is None:
            return None
        if why is not None:
            why.append(_net_phrase("source IP", c.src, net, m.not_source_ips))
    if m.destination_ips or m.not_destination_ips:
        net = _net_hit(c.dst, m.destination_ips, m.not_destination_ips)
        if net is None:
            return None
        if why is not None:
            why.append(_net_phrase("destination IP", c.dst, net, m.not_destination_ips))
    if m.destination_ports or m.not_destination_ports:
        if not _port_ok(c.port, m.destination_ports, m.not_destination_ports):
            return None
        if why is not None:
            why.append(_port_phrase(c.port, m.destination_ports, m.not_destination_ports))
    # Checked last, and one test for all eight: most matches have no HTTP field.
    if (
        m.methods
        or m.not_methods
        or m.paths
        or m.not_paths
        or m.hosts
        or m.not_hosts
        or m.request_headers
        or m.not_request_headers
    ):
        if c.http is not None:
            if not _http_match(m, c.http, why):
                return None
        elif not deny:
            return None  # a node agent cannot check them: an ALLOW match fails closed
        # else: a DENY at a node agent ignores them, so it applies (fail closed)
    if why is None:
        return ""
    return " and ".join(why) if why else "matches any connection"


def _rule(rule: Rule, c: _Conn, explain: bool = True, deny: bool = False) -> str | None:
    """None when ``rule`` does not match ``c``; else why ("" unless ``explain``)."""
    why: list[str] = []
    for clause in rule:
        for m in clause:
            hit = _match(m, c, explain, deny)
            if hit is not None:
                break
        else:
            return None
        if explain:
            why.append(hit)
    if not explain:
        return ""
    # A rule with no clauses matches everything (ztunnel: all() of nothing).
    return "; ".join(why) if why else "the rule has no conditions"


def _rule_ok(rule: Rule, c: _Conn, deny: bool = False) -> bool:
    return _rule(rule, c, False, deny) is not None


def _conn(conn: ConnectionInfo | RequestInfo) -> _Conn:
    http = None
    if isinstance(conn, RequestInfo):
        http = _Http(conn.method, conn.path, conn.host.lower(), conn.headers)
    return _Conn(
        conn.source_identity,
        to_ip(conn.source_ip),
        to_ip(conn.destination_ip),
        conn.destination_port,
        http,
    )


def rule_matches(
    rule: Rule, conn: ConnectionInfo | RequestInfo, *, deny: bool = False
) -> str | None:
    """Why ``rule`` matches (a phrase), or None.  Exposed for debugging tools.

    A :class:`ConnectionInfo` is judged as a node agent does (HTTP fields fail closed, by
    ``deny``: the rule's policy is a DENY); a :class:`RequestInfo` as a waypoint does."""
    return _rule(rule, _conn(conn), deny=deny)


def _first_match(policy: Policy, c: _Conn) -> tuple[int, str] | None:
    deny = policy.action is Action.DENY
    for index, rule in enumerate(policy.rules):
        if _rule_ok(rule, c, deny):
            # The same evaluation again, now with phrases: only the deciding rule pays.
            why = _rule(rule, c, True, deny)
            if why is not None:  # always: it is the same evaluator
                return index, why
    return None


def _rule_http_fields(rule: Rule) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for clause in rule:
        for m in clause:
            found.update(dict.fromkeys(m.http_fields()))
    return tuple(found)


_NODE_AGENT = "a node agent cannot check"


def _who(c: _Conn) -> str:
    kind = "connection" if c.http is None else "request"
    source = str(c.identity) if c.identity else f"plaintext {kind} from {c.src}"
    return source if c.http is None else f"{source} {c.http.method} {c.http.path}"


def _decide(
    snapshot: Snapshot, policies: tuple[Policy, ...], c: _Conn, target: Callable[[], str]
) -> Decision:
    """DENY policies first (any match denies), then: no ALLOW policy -> allowed, else one of
    their rules must match.  Texts are built only for the outcome (``target`` is lazy)."""
    for policy in policies:
        if policy.action is Action.DENY:
            hit = _first_match(policy, c)
            if hit is not None:
                index, why = hit
                reason = f"denied by policy {policy.key} rule {index}: {why}"
                ignored: tuple[str, ...] = ()
                if c.http is None and snapshot.has_http_fields(policy):
                    ignored = _rule_http_fields(policy.rules[index])
                if ignored:
                    reason += (
                        f"; policy {policy.key} has HTTP fields that {_NODE_AGENT}: "
                        f"{', '.join(ignored)} (ignored, so the DENY applies to the whole "
                        "connection: fail closed)"
                    )
                return Decision(False, policy.key, index, reason)
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return Decision(True, None, None, f"allowed: no ALLOW policy applies to {target()}")
    for policy in allows:
        hit = _first_match(policy, c)
        if hit is not None:
            index, why = hit
            return Decision(
                True, policy.key, index, f"allowed by policy {policy.key} rule {index}: {why}"
            )
    names = ", ".join(p.key for p in allows)
    reason = (
        f"denied: {_who(c)} matches no rule of the ALLOW "
        f"polic{'ies' if len(allows) > 1 else 'y'} applying to {target()} ({names})"
    )
    if c.http is None:
        unchecked = [(p.key, p.http_fields()) for p in allows]
        notes = [
            f"{key} has HTTP fields that {_NODE_AGENT}: {', '.join(f)}" for key, f in unchecked if f
        ]
        if notes:
            reason += (
                f"; {'; '.join(notes)} (a match with them never matches at a node agent, fail "
                "closed: give the policy targetRefs to enforce them at a waypoint)"
            )
    return Decision(False, None, None, reason)


def authorize(snapshot: Snapshot, destination: Workload, conn: ConnectionInfo) -> Decision:
    """May ``conn`` reach ``destination``?  Pure; see the module docstring for semantics."""
    policies = snapshot.policies_for(destination)
    return _decide(snapshot, policies, _conn(conn), lambda: f"workload {destination.key}")


def _at(waypoint: WaypointConfig, service: Service | None, note: str) -> str:
    target = f"waypoint {waypoint.key}{note}"
    return target if service is None else f"service {service.key} at {target}"


def authorize_request(
    snapshot: Snapshot,
    waypoint: WaypointConfig,
    service: Service | None,
    request: RequestInfo,
) -> Decision:
    """May ``request`` (to ``service``, through ``waypoint``) proceed?  Pure.

    The policies are those whose targetRefs name the waypoint (kind Gateway) or the service
    (kind Service); semantics as :func:`authorize`, with the HTTP fields checked.
    """
    policies = snapshot.waypoint_policies(waypoint, service)
    return _decide(snapshot, policies, _conn(request), lambda: _at(waypoint, service, ""))


def authorize_tcp_at_waypoint(
    snapshot: Snapshot,
    waypoint: WaypointConfig,
    service: Service | None,
    conn: ConnectionInfo,
) -> Decision:
    """A tunnel the waypoint proxies as TCP (no HTTP seen): the waypoint's policies with
    their HTTP fields unchecked, fail closed exactly as at a node agent (an ALLOW match with
    HTTP fields never matches; a DENY match's HTTP fields are ignored)."""
    policies = snapshot.waypoint_policies(waypoint, service)
    return _decide(
        snapshot, policies, _conn(conn), lambda: _at(waypoint, service, " (TCP: no HTTP to check)")
    )
