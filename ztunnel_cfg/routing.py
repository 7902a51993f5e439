"""Outbound routing: where a captured connection goes.  Pure; modelled on ztunnel's build_request.

Order of decisions for ``dst_ip:dst_port``:

1. A service VIP:port.  If the service has a waypoint and the source is not one of that
   waypoint's workloads -> WAYPOINT.  Otherwise pick a healthy endpoint with ``choose``
   (none -> NO_ENDPOINTS); the endpoint port is the workload's own mapping for the service
   port, else the service's target port.  HBONE endpoint -> HBONE, TCP endpoint ->
   PASSTHROUGH to the endpoint (still load-balanced).
2. A workload IP.  If the workload has a waypoint and the source is not that waypoint ->
   WAYPOINT.  HBONE workload -> HBONE; TCP workload -> PASSTHROUGH.  (Health is not checked
   for direct pod addressing.)
3. Anything else -> PASSTHROUGH to the original destination.

How to use a Route: dial ``target_ip:tunnel_port`` when ``tunnel_port`` is set and send
``CONNECT authority``; otherwise dial ``target_ip:target_port`` in plain TCP.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztunnel_cfg.model import HBONE_PORT, IPAddress, Protocol, Service, WaypointRef, Workload
from ztunnel_cfg.snapshot import Snapshot, to_ip
from ztunnel_cfg.spiffe import SpiffeId

__all__ = [
    "Chooser",
    "Route",
    "RouteKind",
    "first",
    "inbound_waypoint_refusal",
    "is_waypoint",
    "route",
    "waypoints_of",
]

Chooser = Callable[[Sequence[Workload]], Workload]


class RouteKind(enum.Enum):
    HBONE = "HBONE"
    WAYPOINT = "WAYPOINT"
    PASSTHROUGH = "PASSTHROUGH"
    NO_ENDPOINTS = "NO_ENDPOINTS"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    target_ip: IPAddress | None  # None only when dst_ip is not an IP at all
    target_port: int
    tunnel_port: int | None  # 15008 (or the waypoint's hboneMtlsPort) for HBONE/WAYPOINT
    destination: Workload | None
    service: Service | None
    expected_identities: tuple[SpiffeId, ...]
    reason: str
    # The HBONE CONNECT ":authority" ("ip:port", IPv6 bracketed); None for plain TCP.
    authority: str | None = None


def first(endpoints: Sequence[Workload]) -> Workload:
    return endpoints[0]


def _hostport(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _address_for(workload: Workload, like: IPAddress | None) -> IPAddress:
    """The workload IP of the same family as the original destination (first IP otherwise)."""
    for ip in workload.workload_ips:
        if like is None or ip.version == like.version:
            return ip
    return workload.workload_ips[0]


def _identities(workload: Workload, service: Service | None) -> tuple[SpiffeId, ...]:
    out = [workload.identity]
    if service is not None:
        for san in service.subject_alt_names:
            ident = SpiffeId.parse(san)  # validated by the loader
            if ident not in out:
                out.append(ident)
    return tuple(out)


def _via_waypoint(
    snapshot: Snapshot,
    source: Workload | None,
    ref: WaypointRef,
    dst: IPAddress,
    dst_port: int,
    destination_desc: str,
    service: Service | None,
    destination: Workload | None,
    choose: Chooser,
) -> Route | None:
    """A WAYPOINT route, a NO_ENDPOINTS route, or None when the source is the waypoint itself."""
    wp_service = snapshot.service_by_key(ref.destination)
    members = snapshot.endpoints(ref.destination)
    if source is not None and any(m.uid == source.uid for m in members):
        return None  # traffic leaving the waypoint goes to the real destination
    healthy = snapshot.healthy_endpoints(ref.destination)
    if wp_service is None or not healthy:
        return Route(
            RouteKind.NO_ENDPOINTS,
            dst,
            dst_port,
            None,
            destination,
            service,
            (),
            f"{destination_desc} uses waypoint {ref.destination}, which has no healthy "
            f"workloads: check that the waypoint is running and lists the service "
            f"{ref.destination} under 'services'",
        )
    waypoint = choose(healthy)
    wp_ip = _address_for(waypoint, dst)
    return Route(
        RouteKind.WAYPOINT,
        wp_ip,
        dst_port,
        ref.hbone_mtls_port,
        waypoint,
        service,
        _identities(waypoint, wp_service),
        f"{destination_desc} has waypoint {ref.destination}: tunnel to {waypoint.key} "
        f"at {_hostport(wp_ip, ref.hbone_mtls_port)}",
        authority=_hostport(dst, dst_port),
    )


def _to_workload(
    workload: Workload, dst: IPAddress, port: int, service: Service | None, why: str
) -> Route:
    if workload.protocol is Protocol.HBONE:
        return Route(
            RouteKind.HBONE,
            dst,
            port,
            HBONE_PORT,
            workload,
            service,
            _identities(workload, service),
            f"{why}: {workload.key} speaks HBONE, tunnel to {_hostport(dst, HBONE_PORT)}",
            authority=_hostport(dst, port),
        )
    return Route(
        RouteKind.PASSTHROUGH,
        dst,
        port,
        None,
        workload,
        service,
        (),
        f"{why}: {workload.key} is not in the mesh (protocol TCP), plain TCP to "
        f"{_hostport(dst, port)}",
    )


def route(
    snapshot: Snapshot,
    source: Workload | None,
    dst_ip: str | IPAddress,
    dst_port: int,
    choose: Chooser | None = None,
) -> Route:
    """Decide how to forward a connection from ``source`` to ``dst_ip:dst_port``."""
    pick = choose or first
    dst = to_ip(dst_ip)
    if dst is None:
        return Route(
            RouteKind.PASSTHROUGH,
            None,
            dst_port,
            None,
            None,
            None,
            (),
            f"{dst_ip!r} is not an IP address: passthrough",
        )

    service = snapshot.service_by_vip(dst, dst_port)
    if service is not None:
        desc = f"service {service.key}"
        if service.waypoint is not None:
            via = _via_waypoint(
                snapshot, source, service.waypoint, dst, dst_port, desc, service, None, pick
            )
            if via is not None:
                return via
        members = snapshot.endpoints(service)
        healthy = snapshot.healthy_endpoints(service)
        if not healthy:
            return Route(
                RouteKind.NO_ENDPOINTS,
                dst,
                dst_port,
                None,
                None,
                service,
                (),
                f"{desc} ({_hostport(dst, dst_port)}) has no healthy endpoints "
                f"({len(members)} listed, {len(members) - len(healthy)} unhealthy)",
            )
        chosen = pick(healthy)
        target_port = (
            chosen.target_port(service.key, dst_port) or service.target_port(dst_port) or dst_port
        )
        ip = _address_for(chosen, dst)
        return _to_workload(
            chosen,
            ip,
            target_port,
            service,
            f"{desc} ({_hostport(dst, dst_port)}) -> endpoint {chosen.key}",
        )

    workload = snapshot.workload_by_ip(dst)
    if workload is None:
        return Route(
            RouteKind.PASSTHROUGH,
            dst,
            dst_port,
            None,
            None,
            None,
            (),
            f"{_hostport(dst, dst_port)} is not a known workload or service: passthrough",
        )
    desc = f"workload {workload.key}"
    # The workload's own waypoint, else its services' (the destination agent admits nothing
    # else, so addressing the pod directly must not bypass the service's L7 policy).
    refs = waypoints_of(snapshot, workload)
    if refs:
        via = _via_waypoint(snapshot, source, refs[0], dst, dst_port, desc, None, workload, pick)
        if via is not None:
            return via
    return _to_workload(workload, dst, dst_port, None, f"{_hostport(dst, dst_port)} is {desc}")


def waypoints_of(snapshot: Snapshot, workload: Workload) -> tuple[WaypointRef, ...]:
    """The waypoints traffic to ``workload`` must pass: its own, then its services' (in the
    order the workload lists its services).  Empty: no waypoint applies."""
    refs: list[WaypointRef] = []
    if workload.waypoint is not None:
        refs.append(workload.waypoint)
    for key, _ports in workload.services:
        service = snapshot.service_by_key(key)
        ref = service.waypoint if service is not None else None
        if ref is not None and all(r.destination != ref.destination for r in refs):
            refs.append(ref)
    return tuple(refs)


def _waypoint_identities(snapshot: Snapshot, ref: WaypointRef) -> frozenset[SpiffeId]:
    service = snapshot.service_by_key(ref.destination)
    out = {w.identity for w in snapshot.endpoints(ref.destination)}
    if service is not None:
        out.update(SpiffeId.parse(san) for san in service.subject_alt_names)
    return frozenset(out)


def is_waypoint(snapshot: Snapshot, workload: Workload) -> bool:
    """Is ``workload`` a waypoint proxy (an endpoint of a service named in ``waypoints:``)?

    Node agents do not capture waypoints: a waypoint speaks HBONE itself (Istio labels its
    pods out of ambient capture the same way)."""
    keys = {wp.service for wp in snapshot.config.waypoints}
    return any(key in keys for key, _ports in workload.services)


def inbound_waypoint_refusal(
    snapshot: Snapshot, destination: Workload, peer: SpiffeId | None
) -> str | None:
    """Why the destination agent must refuse an HBONE stream from ``peer`` to
    ``destination``, or None.  A destination behind a waypoint admits only that waypoint's
    identity (ztunnel's inbound check): anything else bypassed the waypoint's L7 policy."""
    refs = waypoints_of(snapshot, destination)
    if not refs:
        return None
    allowed: set[SpiffeId] = set()
    for ref in refs:
        allowed |= _waypoint_identities(snapshot, ref)
    if peer in allowed:
        return None
    names = ", ".join(r.destination for r in refs)
    who = str(peer) if peer is not None else "a plaintext client"
    return (
        f"{destination.key} is behind waypoint {names}: only "
        f"{', '.join(sorted(str(i) for i in allowed)) or 'its (missing) workloads'} may "
        f"connect, not {who} (traffic that bypasses the waypoint is refused)"
    )
