"""What a waypoint does with one HTTP request, decided once for the data path and ``explain``.

Order (as Istio's waypoint): L7 authorization (policies targeting the waypoint or the
service), route selection (no match: 404), a RequestRedirect answers at once, then rewrites
and the weighted backend choice.  Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ztunnel_cfg.authz import Decision, RequestInfo, authorize_request
from ztunnel_cfg.l7.request import Request
from ztunnel_cfg.l7.rewrite import redirect_location, rewrite_request
from ztunnel_cfg.l7.select import choose_backend, select_route
from ztunnel_cfg.model import (
    BackendRef,
    IPAddress,
    RouteRule,
    Service,
    WaypointConfig,
    Workload,
)
from ztunnel_cfg.spiffe import SpiffeId

if TYPE_CHECKING:
    from ztunnel_cfg.snapshot import Snapshot

__all__ = ["L7Forward", "L7Reply", "plan_request"]


@dataclass(frozen=True, slots=True)
class L7Reply:
    """The waypoint answers itself."""

    status: int
    text: str
    flags: str
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    authz: Decision | None = None
    route: str = "-"


@dataclass(frozen=True, slots=True)
class L7Forward:
    """Forward ``request`` (rewritten) to a backend of ``rule``; ``backend`` is the weighted
    choice when a draw was given (None: to the addressed workload, or not drawn)."""

    request: Request
    rule: RouteRule | None
    route: str  # "ns/name", "default" (no route attached) or "-" (workload addressed)
    selection: str
    backend: BackendRef | None
    authz: Decision


def plan_request(
    snapshot: Snapshot,
    waypoint: WaypointConfig,
    service: Service | None,
    port: int,
    request: Request,
    *,
    source_identity: SpiffeId | None,
    source_ip: IPAddress | str,
    destination_ip: IPAddress | str,
    draw: float | None,
    workload: Workload | None = None,
) -> L7Reply | L7Forward:
    """``service`` when a service VIP was addressed, else ``workload`` (a pod IP)."""
    decision = _authorize(snapshot, waypoint, service, workload, RequestInfo(
        source_identity, source_ip, destination_ip, port, request.method, request.path_only,
        request.host, request.headers))
    if not decision.allowed:
        return L7Reply(403, "RBAC: access denied", "DENY", decision.reason, authz=decision)
    if service is None:
        return L7Forward(request, None, "-", "a workload was addressed: routes attach to "
                         "services, the request goes to that workload", None, decision)
    selection = select_route(snapshot, service, port, request)
    if selection.rule is None:
        return L7Reply(404, "no route matched", "NR", selection.reason, authz=decision)
    rule, prefix = selection.rule, selection.matched_prefix
    route = selection.route.key if selection.route is not None else "default"
    redirect = redirect_location(rule, request, prefix, port=port)
    if redirect is not None:
        return L7Reply(redirect.status_code, redirect.location, "-",
                       f"{selection.reason}; redirect to {redirect.location}",
                       (("location", redirect.location),), decision, route)
    rewritten = rewrite_request(rule, request, prefix)
    backend: BackendRef | None = None
    if draw is not None:
        index = choose_backend(rule, draw)
        if index is None:
            return L7Reply(500, "no backend has weight", "-",
                           f"every backend of route {route} has weight 0", authz=decision,
                           route=route)
        backend = rule.backend_refs[index]
    elif all(b.weight == 0 for b in rule.backend_refs):
        return L7Reply(500, "no backend has weight", "-",
                       f"every backend of route {route} has weight 0", authz=decision,
                       route=route)
    return L7Forward(rewritten, rule, route, selection.reason, backend, decision)


def _authorize(snapshot: Snapshot, waypoint: WaypointConfig, service: Service | None,
               workload: Workload | None, info: RequestInfo) -> Decision:
    if service is not None or workload is None:
        return authorize_request(snapshot, waypoint, service, info)
    # A pod IP was addressed: the request must pass the policies of every service of that
    # workload this waypoint guards, or addressing the pod would bypass them.
    decision = authorize_request(snapshot, waypoint, None, info)
    for key, _ports in workload.services:
        guarded = snapshot.service_by_key(key)
        if guarded is None or guarded.waypoint is None or \
                guarded.waypoint.destination != waypoint.service:
            continue
        decision = authorize_request(snapshot, waypoint, guarded, info)
        if not decision.allowed:
            return decision
    return decision
