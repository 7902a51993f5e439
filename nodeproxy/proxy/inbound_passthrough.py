"""Inbound plaintext (15006): a connection from outside the mesh captured on its way into the
pod, admitted (STRICT, waypoint, policy: :func:`ztunnel_cfg.admission.admit_inbound`) and
relayed to the pod with the client's source IP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodeproxy.errors import ProxyError
from nodeproxy.proxy import tunnel
from nodeproxy.proxy.inbound import raise_if_refused
from nodeproxy.proxy.tracker import peer_text
from ztunnel_cfg.admission import admit_inbound
from ztunnel_cfg.authz import ConnectionInfo
from ztunnel_cfg.errors import NodeproxyError

if TYPE_CHECKING:
    from nodeproxy.proxy.pod import PodProxy
    from nodeproxy.relay import TcpStream


async def serve_inbound_plaintext(pod: PodProxy, down: TcpStream) -> None:
    env, tracker = pod.env, pod.tracker
    sock = down.socket
    peer = peer_text(sock)
    peer_ip = peer.rpartition(":")[0]
    snapshot = env.snapshot()
    conn = tracker.begin("inbound_plaintext", "pt", peer, "plaintext")
    conn.src = snapshot.workload_by_ip(peer_ip)
    conn.dst = pod.workload
    try:
        if not peer:
            raise ProxyError("client went away before it was served", flags="DC")
        host, port = env.original_dst(sock)
        conn.dst_addr = f"{host}:{port}"
        tracker.show(conn, conn.dst_addr, peer, conn.dst_addr, "TCP")
        admission = admit_inbound(snapshot, pod.workload, ConnectionInfo(None, peer_ip, host, port),
                                  pod.capture_ports)
        conn.policy = admission.policy or ""
        raise_if_refused(admission)
        upstream = await pod.connect_local(host, port, peer_ip)
        tracker.opened(conn)
        result = await tunnel.relay_sockets(upstream, down, env.idle_timeout)
        # up = pod -> client: Istio's sent (the response direction).
        tracker.closed(conn, sent=result.bytes_up, received=result.bytes_down)
    except (NodeproxyError, OSError) as exc:
        tracker.failed(conn, exc)
        down.reset()
    finally:
        down.close()
        tracker.end(conn)
