"""Which destination a CONNECT to the waypoint names, and whether this waypoint serves it.

Pure: the same function answers for the data path and for ``explain``.  A source agent sends
``:authority`` = the original destination (a service VIP:port, or a pod IP:port); the waypoint
serves it only when that service or workload names this waypoint (directly, or through one of
the workload's services), exactly the set the destination agents admit from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.model import Service, WaypointConfig, Workload
from ztunnel_cfg.routing import waypoints_of
from ztunnel_cfg.snapshot import Snapshot, to_ip


@dataclass(frozen=True, slots=True)
class Target:
    """A destination this waypoint serves: a service port, or one workload's port."""

    authority: str
    port: int
    service: Service | None
    workload: Workload | None  # set when a pod IP was addressed

    @property
    def description(self) -> str:
        if self.service is not None:
            return f"service {self.service.key} port {self.port}"
        assert self.workload is not None
        return f"workload {self.workload.key} port {self.port}"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # HBONE status: 400 (not ours / malformed)
    reason: str


def find_waypoint(snapshot: Snapshot, name: str) -> WaypointConfig | None:
    """The ``waypoints:`` entry called ``namespace/name``."""
    for wp in snapshot.config.waypoints:
        if f"{wp.namespace}/{wp.name}" == name:
            return wp
    return None


def resolve(snapshot: Snapshot, waypoint: WaypointConfig, authority: str) -> Target | Refusal:
    """What ``authority`` names, if this waypoint serves it."""
    try:
        host, port = parse_host_port(authority, ":authority")
    except HostPortError as exc:
        return Refusal(400, f"bad :authority {authority!r}: {exc.reason}")
    ip = to_ip(host)
    if ip is None:
        return Refusal(400, f":authority {authority!r} is not an IP:port")
    service = snapshot.service_by_vip(ip, port)
    if service is not None:
        if service.waypoint is None or service.waypoint.destination != waypoint.service:
            return Refusal(400, f"service {service.key} does not use waypoint "
                                f"{waypoint.namespace}/{waypoint.name}")
        return Target(authority, port, service, None)
    workload = snapshot.workload_by_ip(ip)
    if workload is None:
        return Refusal(400, f"{authority} is neither a service VIP nor a workload")
    if all(ref.destination != waypoint.service for ref in waypoints_of(snapshot, workload)):
        return Refusal(400, f"workload {workload.key} does not use waypoint "
                            f"{waypoint.namespace}/{waypoint.name}")
    return Target(authority, port, None, workload)
