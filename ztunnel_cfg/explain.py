"""``nodeproxy explain``: the decision path of a hypothetical connection.  Pure.

Given a snapshot, a source (pod name, ``ns/name``, uid or IP) and ``ip:port``, this replays
what the agents would decide, with the same functions the data path calls:

1. source resolved; a mesh (HBONE) source's connection is captured by its node's agent,
   anything else leaves in plaintext and meets the destination's inbound plaintext port;
2. :func:`ztunnel_cfg.routing.route` for every candidate endpoint (a service VIP is
   load-balanced round-robin per endpoint set by the source node's agent, so every healthy
   endpoint is a possible outcome and each is explained);
3. :func:`ztunnel_cfg.authz.authorize` at the destination, with what the destination's agent
   sees (the verified source identity for HBONE, none for plaintext), after the destination's
   mTLS mode (STRICT refuses plaintext before any policy is read).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel_cfg.authz import ConnectionInfo, Decision, authorize
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.model import IPAddress, MtlsMode, Protocol, Workload
from ztunnel_cfg.routing import Chooser, Route, RouteKind, route
from ztunnel_cfg.snapshot import Snapshot, to_ip

__all__ = [
    "EndpointState",
    "ExplainError",
    "Explanation",
    "Hop",
    "Path",
    "Verdict",
    "explain",
    "parse_target",
    "resolve_source",
]

SELECTION_RULE = (
    "round-robin per endpoint set, kept by the source node's agent: successive connections "
    "cycle through the healthy endpoints in config order"
)


class ExplainError(NodeproxyError):
    """The source or target of an ``explain`` query cannot be resolved."""


class Path(enum.Enum):
    HBONE = "HBONE"  # mTLS tunnel to the destination's 15008
    WAYPOINT = "WAYPOINT"  # mTLS tunnel to the waypoint's pods (no waypoint proxy exists yet)
    PASSTHROUGH = "PASSTHROUGH"  # captured, forwarded in plain TCP (destination not meshed)
    PLAINTEXT = "PLAINTEXT"  # not captured at the source: plaintext to the destination's 15006
    DIRECT = "DIRECT"  # neither side is handled by an agent
    NO_ENDPOINTS = "NO_ENDPOINTS"


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    MIXED = "allowed for some endpoints, denied for others"
    NOT_ENFORCED = "not enforced"  # no agent authorizes it (destination outside the mesh)
    NO_ENDPOINTS = "no endpoints"


@dataclass(frozen=True, slots=True)
class EndpointState:
    """A workload listed for the service, and whether it is a load-balancing candidate."""

    workload: str  # ns/name
    address: str
    node: str
    candidate: bool
    why_not: str = ""


@dataclass(frozen=True, slots=True)
class Hop:
    """One possible outcome: where the connection goes and what the destination decides."""

    path: Path
    endpoint: str  # ns/name, or "" for an address that is no workload
    node: str
    address: str  # ip:port the application's bytes reach
    via: str  # what is dialed: "ip:15008" for tunnels, else == address
    route_reason: str
    expected_identities: tuple[str, ...]
    mtls_mode: str  # of the enforcing workload; "" when nobody enforces
    mtls_mode_source: str
    allowed: bool | None  # None: not enforced by any agent
    policy: str | None
    rule: int | None
    reason: str
    response_flags: str  # what the counters would say on failure ("-" when allowed)


@dataclass(frozen=True, slots=True)
class Explanation:
    source: str
    source_ip: str
    source_node: str
    source_in_mesh: bool
    presented_identity: str | None
    target: str
    service: str | None
    selection: str
    endpoints: tuple[EndpointState, ...]
    hops: tuple[Hop, ...]
    verdict: Verdict

    @property
    def paths(self) -> frozenset[Path]:
        return frozenset(h.path for h in self.hops)

    @property
    def endpoint_set(self) -> frozenset[str]:
        return frozenset(h.endpoint for h in self.hops if h.endpoint)

    def to_document(self) -> dict[str, Any]:
        return {
            "source": {
                "workload": self.source,
                "ip": self.source_ip,
                "node": self.source_node,
                "inMesh": self.source_in_mesh,
                "presentedIdentity": self.presented_identity,
            },
            "target": self.target,
            "service": self.service,
            "selection": self.selection,
            "endpoints": [
                {
                    "workload": e.workload,
                    "address": e.address,
                    "node": e.node,
                    "candidate": e.candidate,
                    **({"whyNot": e.why_not} if e.why_not else {}),
                }
                for e in self.endpoints
            ],
            "outcomes": [
                {
                    "path": h.path.value,
                    "endpoint": h.endpoint,
                    "node": h.node,
                    "address": h.address,
                    "via": h.via,
                    "route": h.route_reason,
                    "expectedIdentities": list(h.expected_identities),
                    "mtlsMode": h.mtls_mode,
                    "mtlsModeSource": h.mtls_mode_source,
                    "allowed": h.allowed,
                    "policy": h.policy,
                    "rule": h.rule,
                    "reason": h.reason,
                    "responseFlags": h.response_flags,
                }
                for h in self.hops
            ],
            "verdict": self.verdict.value,
        }


# -- resolution ------------------------------------------------------------------------------


def parse_target(text: str) -> tuple[IPAddress, int]:
    """``IP:PORT`` (IPv6 as ``[addr]:port``)."""
    try:
        host, port = parse_host_port(text, "target", ip_only=True)
    except HostPortError as exc:
        raise ExplainError(f"bad target {text!r}: {exc.reason}",
                           hint="use IP:PORT, e.g. 10.96.0.10:80 or [fd00::1]:80") from None
    ip = to_ip(host)
    assert ip is not None  # ip_only guarantees an address
    return ip, port


def resolve_source(snapshot: Snapshot, spec: str) -> tuple[Workload | None, IPAddress]:
    """A workload by IP, uid, ``ns/name`` or unique name; an unknown IP gives (None, ip)."""
    ip = to_ip(spec)
    if ip is not None:
        return snapshot.workload_by_ip(ip), ip
    by_uid = snapshot.workload_by_uid(spec)
    if by_uid is not None:
        found: list[Workload] = [by_uid]
    elif "/" in spec:
        ns, _, name = spec.partition("/")
        found = [w for w in snapshot.config.workloads if w.namespace == ns and w.name == name]
    else:
        found = [w for w in snapshot.config.workloads if w.name == spec]
    if not found:
        raise ExplainError(
            f"no workload {spec!r} in the config",
            hint="give a pod name, namespace/name, uid or IP; `nodeproxy workloads` lists them",
        )
    if len(found) > 1:
        raise ExplainError(
            f"{len(found)} workloads are named {spec!r}: "
            + ", ".join(w.key for w in found),
            hint="qualify it as namespace/name",
        )
    workload = found[0]
    if not workload.workload_ips:
        raise ExplainError(f"workload {workload.key} has no address", hint="check workloadIps")
    return workload, workload.workload_ips[0]


# -- decisions -------------------------------------------------------------------------------


def _hostport(ip: IPAddress | None, port: int) -> str:
    if ip is None:
        return f"?:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _mtls(snapshot: Snapshot, workload: Workload) -> tuple[MtlsMode, str]:
    mode, pa = snapshot.peer_authentication_for(workload)
    if pa is None:
        return mode, "default (no peerAuthentication applies)"
    if pa.is_workload_specific:
        where = f"peerAuthentication {pa.name or '(unnamed)'} selecting the workload"
    elif pa.namespace is not None:
        where = f"peerAuthentication {pa.name or '(unnamed)'} of namespace {pa.namespace}"
    else:
        where = f"mesh-wide peerAuthentication {pa.name or '(unnamed)'}"
    return mode, where


def _decide(
    snapshot: Snapshot,
    dst: Workload,
    conn: ConnectionInfo,
) -> tuple[str, str, Decision]:
    mode, mode_src = _mtls(snapshot, dst)
    if conn.source_identity is None and mode is MtlsMode.STRICT:
        refused = Decision(
            False,
            None,
            None,
            f"refused before policy: {dst.key} requires mTLS (STRICT, {mode_src}) and the "
            "connection arrives in plaintext",
        )
        return mode.value, mode_src, refused
    return mode.value, mode_src, authorize(snapshot, dst, conn)


def _hop_from_route(
    snapshot: Snapshot, source: Workload, src_ip: IPAddress, r: Route
) -> Hop:
    dst = r.destination
    address = _hostport(r.target_ip, r.target_port)
    idents = tuple(str(i) for i in r.expected_identities)
    base: dict[str, Any] = {
        "endpoint": dst.key if dst else "",
        "node": dst.node if dst else "",
        "address": address,
        "route_reason": r.reason,
        "expected_identities": idents,
    }
    if r.kind is RouteKind.NO_ENDPOINTS:
        return Hop(
            path=Path.NO_ENDPOINTS, via="", mtls_mode="", mtls_mode_source="", allowed=False,
            policy=None, rule=None, reason=r.reason, response_flags="UH", **base,
        )
    if r.kind is RouteKind.PASSTHROUGH:
        return Hop(
            path=Path.PASSTHROUGH, via=address, mtls_mode="", mtls_mode_source="",
            allowed=None, policy=None, rule=None,
            reason="no agent authorizes it: the destination is outside the mesh",
            response_flags="-", **base,
        )
    assert dst is not None
    assert r.target_ip is not None
    via = _hostport(r.target_ip, r.tunnel_port or 0)
    if r.kind is RouteKind.WAYPOINT:
        # Only the tunnel to the waypoint's pods exists: no waypoint proxy is implemented yet
        # (issue 11 item 4), so no decision is attributed to it.
        mode, mode_src = _mtls(snapshot, dst)
        return Hop(
            path=Path.WAYPOINT, via=via, mtls_mode=mode.value, mtls_mode_source=mode_src,
            allowed=None, policy=None, rule=None,
            reason=f"tunnelled to waypoint {dst.key}: no waypoint proxy is implemented yet, so "
            "nothing there applies L7 policy or routes; the destination's L4 policies would see "
            "the waypoint's identity",
            response_flags="-", **base,
        )
    conn = ConnectionInfo(source.identity, src_ip, r.target_ip, r.target_port)
    mode_value, mode_src, decision = _decide(snapshot, dst, conn)
    return Hop(
        path=Path.HBONE, via=via, mtls_mode=mode_value, mtls_mode_source=mode_src,
        allowed=decision.allowed, policy=decision.policy, rule=decision.rule,
        reason=decision.reason, response_flags="-" if decision.allowed else "DENY", **base,
    )


def _plaintext_hop(
    snapshot: Snapshot, src_ip: IPAddress, dst_ip: IPAddress, port: int
) -> Hop:
    dst = snapshot.workload_by_ip(dst_ip)
    address = _hostport(dst_ip, port)
    if dst is None or dst.protocol is not Protocol.HBONE:
        what = f"{dst.key} is not in the mesh" if dst else "no workload has this address"
        return Hop(
            path=Path.DIRECT, endpoint=dst.key if dst else "", node=dst.node if dst else "",
            address=address, via=address,
            route_reason=f"the source is not captured and {what}: plain TCP, no agent involved",
            expected_identities=(), mtls_mode="", mtls_mode_source="", allowed=None,
            policy=None, rule=None, reason="no agent authorizes it", response_flags="-",
        )
    conn = ConnectionInfo(None, src_ip, dst_ip, port)
    mode_value, mode_src, decision = _decide(snapshot, dst, conn)
    return Hop(
        path=Path.PLAINTEXT, endpoint=dst.key, node=dst.node, address=address, via=address,
        route_reason=f"the source is not in the mesh: plaintext, captured by {dst.key}'s "
        "inbound plaintext port 15006",
        expected_identities=(), mtls_mode=mode_value, mtls_mode_source=mode_src,
        allowed=decision.allowed, policy=decision.policy, rule=decision.rule,
        reason=decision.reason, response_flags="-" if decision.allowed else "DENY",
    )


def _endpoint_states(snapshot: Snapshot, service_key: str) -> tuple[EndpointState, ...]:
    out = []
    for w in snapshot.endpoints(service_key):
        why = "" if w.healthy else "unhealthy"
        if not w.workload_ips:
            why = "no address"
        out.append(
            EndpointState(
                workload=w.key,
                address=",".join(str(ip) for ip in w.workload_ips),
                node=w.node,
                candidate=not why,
                why_not=why,
            )
        )
    return tuple(out)


def _fixed(workload: Workload) -> Chooser:
    """A chooser that always picks ``workload`` (to replay each possible LB outcome)."""

    def choose(_endpoints: Sequence[Workload]) -> Workload:
        return workload

    return choose


def _verdict(hops: Sequence[Hop]) -> Verdict:
    if all(h.path is Path.NO_ENDPOINTS for h in hops):
        return Verdict.NO_ENDPOINTS
    decided = [h.allowed for h in hops if h.allowed is not None]
    if not decided:
        return Verdict.NOT_ENFORCED
    if all(decided):
        return Verdict.ALLOWED
    return Verdict.DENIED if not any(decided) else Verdict.MIXED


def explain(snapshot: Snapshot, source_spec: str, target: str) -> Explanation:
    """Explain a connection from ``source_spec`` to ``target`` (``IP:PORT``)."""
    source, src_ip = resolve_source(snapshot, source_spec)
    dst_ip, port = parse_target(target)
    in_mesh = source is not None and source.protocol is Protocol.HBONE
    service = snapshot.service_by_vip(dst_ip, port)
    endpoints: tuple[EndpointState, ...] = ()
    selection = "direct address: no load balancing"
    hops: list[Hop] = []
    if source is not None and in_mesh:
        first_route = route(snapshot, source, dst_ip, port)
        if service is not None and first_route.kind in (RouteKind.HBONE, RouteKind.PASSTHROUGH):
            endpoints = _endpoint_states(snapshot, service.key)
            selection = SELECTION_RULE
            for candidate in snapshot.healthy_endpoints(service):
                r = route(snapshot, source, dst_ip, port, _fixed(candidate))
                hops.append(_hop_from_route(snapshot, source, src_ip, r))
        else:
            if service is not None:
                endpoints = _endpoint_states(snapshot, service.key)
                if first_route.kind is RouteKind.WAYPOINT:
                    selection = (
                        "the waypoint's pods receive the connection; no endpoint is chosen here"
                    )
                else:
                    selection = "no healthy endpoint to choose from"
            hops.append(_hop_from_route(snapshot, source, src_ip, first_route))
    else:
        if service is not None:
            selection = (
                "none: the source is not captured, so the service VIP is not load-balanced "
                "by any agent"
            )
        hops.append(_plaintext_hop(snapshot, src_ip, dst_ip, port))
    return Explanation(
        source=source.key if source else str(src_ip),
        source_ip=str(src_ip),
        source_node=source.node if source else "",
        source_in_mesh=in_mesh,
        presented_identity=str(source.identity) if source is not None and in_mesh else None,
        target=_hostport(dst_ip, port),
        service=service.key if service else None,
        selection=selection,
        endpoints=endpoints,
        hops=tuple(hops),
        verdict=_verdict(hops),
    )
