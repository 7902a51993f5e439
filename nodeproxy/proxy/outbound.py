"""Outbound (15001): a pod's captured connection, routed and carried to its destination.

HBONE to a mesh destination (or to its waypoint) over the pod's pooled connections, plain TCP
to anything outside the mesh, refused when the route says so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nodeproxy.errors import ProxyError, RejectedError
from nodeproxy.proxy import guard, tunnel
from nodeproxy.proxy.tracker import peer_text
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.routing import Route, RouteKind, route

if TYPE_CHECKING:
    from nodeproxy.proxy.pod import PodProxy
    from nodeproxy.relay import TcpStream

log = logging.getLogger("nodeproxy.proxy")

_PATHS = {RouteKind.WAYPOINT: "waypoint", RouteKind.HBONE: "hbone",
          RouteKind.PASSTHROUGH: "passthrough"}


async def serve_outbound(pod: PodProxy, down: TcpStream) -> None:
    env, tracker = pod.env, pod.tracker
    sock = down.socket
    src_addr = peer_text(sock)
    conn = tracker.begin("outbound", "out", src_addr, "failed")
    conn.src = pod.workload
    try:
        dst_ip, dst_port = env.original_dst(sock)
        decision = route(env.snapshot(), pod.workload, dst_ip, dst_port, env.choose)
        tunnelled = decision.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
        conn.dst = decision.destination
        conn.service = decision.service.hostname if decision.service else ""
        conn.mtls = conn.dst_identity_shown = tunnelled
        conn.dst_addr = f"{decision.target_ip}:{decision.target_port}"
        refusal = guard.outbound_refusal(env.ports, dst_port, mesh_destination=tunnelled)
        if refusal is not None:
            raise RejectedError(refusal, reason="own_port", status=400, flags="NR")
        dialed = decision.tunnel_port if tunnelled else decision.target_port
        tracker.show(conn, src_addr, f"{decision.target_ip}:{dialed}", f"{dst_ip}:{dst_port}",
                     "HBONE" if tunnelled else "TCP")
        if decision.kind is RouteKind.NO_ENDPOINTS:
            raise ProxyError(decision.reason, status=503, flags="UH")
        if decision.kind is RouteKind.PASSTHROUGH:
            upstream = await pod.sockets.connect(str(decision.target_ip), decision.target_port,
                                                 timeout=env.connect_timeout)
            tracker.opened(conn)
            conn.path = _PATHS[decision.kind]
            result = await tunnel.relay_sockets(down, upstream, env.idle_timeout)
        else:
            stream, lease = await _open_stream(pod, decision, src_addr)
            tracker.opened(conn)
            conn.path = _PATHS[decision.kind]
            try:
                result = await tunnel.relay_stream(down, stream, env.idle_timeout)
            finally:
                lease.release()
        if result.reset:
            conn.flags = "UR" if result.error is None else "URX"
        # up = client -> destination; Istio's sent is the response direction.
        tracker.closed(conn, sent=result.bytes_down, received=result.bytes_up)
    except (NodeproxyError, OSError) as exc:
        tracker.failed(conn, exc)
        down.reset()
        log.info("outbound %s failed: %s", conn.conn_id, exc, extra={"component": "outbound"})
    finally:
        down.close()
        tracker.end(conn)


async def _open_stream(pod: PodProxy, decision: Route,
                       src_addr: str) -> tuple[tunnel.Stream, tunnel.PoolLease]:
    key = pod.pool_key(decision)
    lease = await pod.pool.acquire(key)
    try:
        authority = decision.authority or f"{decision.target_ip}:{decision.target_port}"
        headers = tunnel.request_headers(pod.workload, src_addr)
        stream = await lease.conn.open_stream(authority, headers)
    except BaseException:
        lease.release()
        raise
    return stream, lease
