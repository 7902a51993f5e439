"""Inbound admission: may a connection that reached a pod's agent enter the pod?

One pure decision over a snapshot, called by the data path (HBONE CONNECT on 15008 and
plaintext captured on 15006) and by ``explain``, so that the two cannot disagree. In order:

1. the agent's own capture ports are never a destination (a connection to one would make the
   agent dial its own listener, without end);
2. a destination behind a waypoint admits only the waypoint's identity;
3. a STRICT destination refuses plaintext before any policy is read;
4. authorization policies (``authorize``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ztunnel_cfg.authz import ConnectionInfo, authorize
from ztunnel_cfg.model import MtlsMode, PeerAuthentication, Workload
from ztunnel_cfg.routing import inbound_waypoint_refusal
from ztunnel_cfg.snapshot import Snapshot

#: The agent's capture ports (outbound, inbound plaintext, inbound HBONE) by default.
DEFAULT_CAPTURE_PORTS = (15001, 15006, 15008)


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    reason: str
    response_flags: str  # "-" admitted, "DENY" refused by policy or mode, "NR" no route
    status: int  # 200, or the HTTP status a refused CONNECT is answered with
    #: nodeproxy_connections_rejected_total reason for refusals by a safety rule ("own_port",
    #: "waypoint_bypass"); "" for admissions and policy denials.
    rejection: str = ""
    policy: str | None = None  # "ns/name" of the deciding policy
    rule: int | None = None  # index of the deciding rule in it


def admit_inbound(snapshot: Snapshot, destination: Workload, conn: ConnectionInfo,
                  capture_ports: Collection[int] = DEFAULT_CAPTURE_PORTS) -> Admission:
    """The decision for ``conn`` (``source_identity`` None: plaintext) into ``destination``."""
    port = conn.destination_port
    if port in capture_ports:
        return Admission(False, f"destination port {port} is one of the agent's own capture "
                                f"ports {tuple(capture_ports)}; refusing to proxy to itself",
                         "NR", 400, "own_port")
    bypass = inbound_waypoint_refusal(snapshot, destination, conn.source_identity)
    if bypass is not None:
        return Admission(False, bypass, "DENY", 401, "waypoint_bypass")
    if conn.source_identity is None:
        mode, entry = snapshot.peer_authentication_for(destination)
        if mode is MtlsMode.STRICT:
            return Admission(False, f"refused before policy: plaintext connection from "
                                    f"{conn.source_ip}, and {destination.key} requires mTLS "
                                    f"(STRICT, {mtls_mode_source(entry)})", "DENY", 401)
    decision = authorize(snapshot, destination, conn)
    if decision.allowed:
        return Admission(True, decision.reason, "-", 200, "", decision.policy, decision.rule)
    return Admission(False, decision.reason, "DENY", 401, "", decision.policy, decision.rule)


def mtls_mode_source(entry: PeerAuthentication | None) -> str:
    """Which peerAuthentication set a workload's mTLS mode, in words."""
    if entry is None:
        return "default (no peerAuthentication applies)"
    name = entry.name or "(unnamed)"
    if entry.is_workload_specific:
        return f"peerAuthentication {name} selecting the workload"
    if entry.namespace is not None:
        return f"peerAuthentication {name} of namespace {entry.namespace}"
    return f"mesh-wide peerAuthentication {name}"
