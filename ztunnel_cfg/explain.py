"""``nodeproxy explain``: the decision path of a hypothetical connection.  Pure.

Given a snapshot, a source (pod name, ``ns/name``, uid or IP) and ``ip:port``, this replays
what the agents would decide, with the same functions the data path calls:

1. source resolved; a mesh (HBONE) source's connection is captured by its node's agent,
   anything else leaves in plaintext and meets the destination's inbound plaintext port;
2. :func:`ztunnel_cfg.routing.route` for every candidate endpoint (a service VIP is
   load-balanced round-robin per endpoint set by the source node's agent, so every healthy
   endpoint is a possible outcome and each is explained);
3. :func:`ztunnel_cfg.admission.admit_inbound` at the destination (the function its agent
   calls), with what that agent sees (the verified source identity for HBONE, none for
   plaintext): capture ports, waypoint bypass, STRICT mTLS, then authorization policies.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel_cfg.admission import Admission, admit_inbound, mtls_mode_source
from ztunnel_cfg.authz import ConnectionInfo
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, host_without_port, parse_host_port
from ztunnel_cfg.l7.plan import L7Reply, plan_request
from ztunnel_cfg.l7.policy import retry_policy, timeouts
from ztunnel_cfg.l7.request import Request
from ztunnel_cfg.l7.select import backend_endpoints
from ztunnel_cfg.model import IPAddress, MtlsMode, Protocol, Service, WaypointConfig, Workload
from ztunnel_cfg.routing import Chooser, Route, RouteKind, route
from ztunnel_cfg.snapshot import Snapshot, to_ip

__all__ = [
    "EndpointState",
    "ExplainError",
    "Explanation",
    "Hop",
    "HttpQuery",
    "L7Backend",
    "L7Explanation",
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
    WAYPOINT = "WAYPOINT"  # mTLS tunnel to the waypoint, which decides L7 and forwards
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
    ANSWERED = "answered by the waypoint"  # redirect, no route, no weighted backend


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
class HttpQuery:
    """The request ``explain --http`` asks about."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()  # names lower case
    host: str = ""  # default: the target address


@dataclass(frozen=True, slots=True)
class L7Endpoint:
    workload: str
    address: str
    allowed: bool  # by the destination agent's L4 policy, seeing the waypoint's identity
    reason: str


@dataclass(frozen=True, slots=True)
class L7Backend:
    service: str
    port: int
    weight: int
    share: float  # of requests matching the rule
    subset: str
    endpoints: tuple[L7Endpoint, ...]


@dataclass(frozen=True, slots=True)
class L7Explanation:
    """What the waypoint decides for one HTTP request (the data path's own decision)."""

    waypoint: str
    waypoint_identity: str
    request: str
    authz_allowed: bool
    authz_policy: str | None
    authz_reason: str
    route: str
    selection: str
    answer: int | None  # status the waypoint answers itself with, None: forwarded
    answer_flags: str
    answer_reason: str
    backends: tuple[L7Backend, ...]
    retry: str
    timeout: str

    def to_document(self) -> dict[str, Any]:
        return {
            "waypoint": self.waypoint, "waypointIdentity": self.waypoint_identity,
            "request": self.request,
            "authorization": {"allowed": self.authz_allowed, "policy": self.authz_policy,
                              "reason": self.authz_reason},
            "route": self.route, "selection": self.selection,
            "answer": None if self.answer is None else {
                "status": self.answer, "responseFlags": self.answer_flags,
                "reason": self.answer_reason},
            "backends": [{"service": b.service, "port": b.port, "weight": b.weight,
                          "share": b.share, "subset": b.subset,
                          "endpoints": [{"workload": e.workload, "address": e.address,
                                         "allowed": e.allowed, "reason": e.reason}
                                        for e in b.endpoints]} for b in self.backends],
            "retry": self.retry, "timeout": self.timeout,
        }


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
    l7: L7Explanation | None = None

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
            **({"waypoint": self.l7.to_document()} if self.l7 is not None else {}),
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
    mode, entry = snapshot.peer_authentication_for(workload)
    return mode, mtls_mode_source(entry)


def _decide(
    snapshot: Snapshot,
    dst: Workload,
    conn: ConnectionInfo,
) -> tuple[str, str, Admission]:
    """What the destination's agent decides: the very function its data path calls."""
    mode, mode_src = _mtls(snapshot, dst)
    return mode.value, mode_src, admit_inbound(snapshot, dst, conn)


def _hop_from_route(
    snapshot: Snapshot, source: Workload, src_ip: IPAddress, r: Route
) -> Hop:
    dst = r.destination
    # Through a waypoint the tunnel's :authority is the original destination (VIP or pod):
    # that is the address the waypoint serves, not the waypoint's IP with the service port.
    address = r.authority if r.kind is RouteKind.WAYPOINT and r.authority else (
        _hostport(r.target_ip, r.target_port))
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
        # The waypoint decides per request: see L7Explanation (explain --http).
        mode, mode_src = _mtls(snapshot, dst)
        return Hop(
            path=Path.WAYPOINT, via=via, mtls_mode=mode.value, mtls_mode_source=mode_src,
            allowed=None, policy=None, rule=None,
            reason=f"tunnelled to waypoint {dst.key}, which applies L7 policy and routes per "
            "request (pass --http METHOD PATH to see its decision); the destination agents "
            "then see the waypoint's identity",
            response_flags="-", **base,
        )
    conn = ConnectionInfo(source.identity, src_ip, r.target_ip, r.target_port)
    mode_value, mode_src, decision = _decide(snapshot, dst, conn)
    return Hop(
        path=Path.HBONE, via=via, mtls_mode=mode_value, mtls_mode_source=mode_src,
        allowed=decision.allowed, policy=decision.policy, rule=decision.rule,
        reason=decision.reason, response_flags=decision.response_flags, **base,
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
        reason=decision.reason, response_flags=decision.response_flags,
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


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g}s"


def _waypoint_of(snapshot: Snapshot, workload: Workload) -> WaypointConfig | None:
    keys = {key for key, _ports in workload.services}
    return next((wp for wp in snapshot.config.waypoints if wp.service in keys), None)


def explain_http(snapshot: Snapshot, source: Workload, src_ip: IPAddress, r: Route,
                 dst_ip: IPAddress, port: int, query: HttpQuery) -> L7Explanation | None:
    """The waypoint's decision for ``query`` (the same plan_request the waypoint runs)."""
    wp_workload = r.destination
    if wp_workload is None:
        return None
    waypoint = _waypoint_of(snapshot, wp_workload)
    if waypoint is None:
        return None
    service = snapshot.service_by_vip(dst_ip, port)
    addressed = None if service is not None else snapshot.workload_by_ip(dst_ip)
    host = query.host or _hostport(dst_ip, port)
    headers = query.headers
    if all(n != "host" for n, _ in headers):
        headers = (("host", host), *headers)
    request = Request(query.method, query.path, host_without_port(host), headers)
    plan = plan_request(snapshot, waypoint, service, port, request,
                        source_identity=source.identity, source_ip=src_ip,
                        destination_ip=dst_ip, draw=None, workload=addressed)
    wp_identity = wp_workload.identity
    wp_ip = wp_workload.workload_ips[0]
    authz = plan.authz
    common: dict[str, Any] = {
        "waypoint": f"{waypoint.namespace}/{waypoint.name}",
        "waypoint_identity": str(wp_identity),
        "request": f"{query.method} {query.path}",
        "authz_allowed": authz.allowed if authz is not None else True,
        "authz_policy": authz.policy if authz is not None else None,
        "authz_reason": authz.reason if authz is not None else "",
    }
    if isinstance(plan, L7Reply):
        return L7Explanation(route=plan.route, selection=plan.reason, answer=plan.status,
                             answer_flags=plan.flags, answer_reason=plan.reason, backends=(),
                             retry="-", timeout="-", **common)

    def endpoint_rows(workloads: Sequence[Workload], svc: Service | None,
                      svc_port: int) -> tuple[L7Endpoint, ...]:
        rows = []
        for w in workloads:
            target_port = (w.target_port(svc.key, svc_port) or svc.target_port(svc_port)
                           or svc_port) if svc is not None else svc_port
            ip = w.workload_ips[0]
            decision = admit_inbound(snapshot, w, ConnectionInfo(wp_identity, wp_ip, ip,
                                                                 target_port))
            rows.append(L7Endpoint(w.key, _hostport(ip, target_port), decision.allowed,
                                   decision.reason))
        return tuple(rows)

    backends: list[L7Backend] = []
    if plan.rule is None:
        assert addressed is not None
        backends.append(L7Backend(addressed.key, port, 1, 1.0, "",
                                  endpoint_rows([addressed], None, port)))
    else:
        total = sum(b.weight for b in plan.rule.backend_refs) or 1
        for b in plan.rule.backend_refs:
            svc = snapshot.service_by_key(b.service)
            backends.append(L7Backend(
                b.service, b.port, b.weight, b.weight / total,
                ",".join(f"{k}={v}" for k, v in b.subset),
                endpoint_rows(backend_endpoints(snapshot, b), svc, b.port)))
    retry = retry_policy(plan.rule)
    request_timeout, per_try = timeouts(plan.rule)
    on = ",".join(sorted(retry.retry_on)) or "nothing"
    codes = f" (codes {','.join(str(c) for c in sorted(retry.codes))})" if retry.codes else ""
    return L7Explanation(
        route=plan.route, selection=plan.selection, answer=None, answer_flags="-",
        answer_reason="", backends=tuple(backends),
        retry=f"{retry.attempts} retries on {on}{codes}, back-off base "
              f"{retry.backoff_base:g}s, per-try timeout {_seconds(per_try)}",
        timeout=_seconds(request_timeout), **common)


def _l7_verdict(l7: L7Explanation) -> Verdict:
    if l7.answer is not None:
        return Verdict.DENIED if l7.answer == 403 else Verdict.ANSWERED
    decided = [e.allowed for b in l7.backends if b.weight for e in b.endpoints]
    if not decided:
        return Verdict.NO_ENDPOINTS
    if all(decided):
        return Verdict.ALLOWED
    return Verdict.DENIED if not any(decided) else Verdict.MIXED


def explain(snapshot: Snapshot, source_spec: str, target: str,
            http: HttpQuery | None = None) -> Explanation:
    """Explain a connection from ``source_spec`` to ``target`` (``IP:PORT``); with ``http``,
    also what the waypoint (if one is on the path) decides for that request."""
    source, src_ip = resolve_source(snapshot, source_spec)
    dst_ip, port = parse_target(target)
    in_mesh = source is not None and source.protocol is Protocol.HBONE
    service = snapshot.service_by_vip(dst_ip, port)
    endpoints: tuple[EndpointState, ...] = ()
    selection = "direct address: no load balancing"
    hops: list[Hop] = []
    l7: L7Explanation | None = None
    if source is not None and in_mesh:
        first_route = route(snapshot, source, dst_ip, port)
        if first_route.kind is RouteKind.WAYPOINT and http is not None:
            l7 = explain_http(snapshot, source, src_ip, first_route, dst_ip, port, http)
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
        verdict=_l7_verdict(l7) if l7 is not None else _verdict(hops),
        l7=l7,
    )
