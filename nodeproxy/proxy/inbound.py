"""Inbound HBONE (15008): one CONNECT stream from a peer agent or waypoint, admitted
(:func:`ztunnel_cfg.admission.admit_inbound` with the verified peer identity) and relayed to
the local pod with the client's source IP."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from nodeproxy.errors import ProxyError, RejectedError
from nodeproxy.proxy import tunnel
from nodeproxy.sockets import close_with_reset
from ztunnel_cfg.admission import Admission, admit_inbound
from ztunnel_cfg.authz import ConnectionInfo
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.spiffe import SpiffeId

if TYPE_CHECKING:
    from nodeproxy.proxy.pod import PodProxy


async def serve_connect(pod: PodProxy, stream: tunnel.ServerStream, authority: str,
                        peer: SpiffeId) -> None:
    env, tracker = pod.env, pod.tracker
    snapshot = env.snapshot()
    src_ip = stream.peer_ip
    conn = tracker.begin("inbound", "in", src_ip, "hbone")
    conn.dst_addr = authority
    conn.mtls = True
    conn.src_principal = str(peer)
    src = snapshot.workload_by_ip(src_ip)
    # The IP does not prove who it is; the certificate does.
    conn.src = src if src is not None and src.identity == peer else None
    upstream: socket.socket | None = None  # owned here until the relay takes it
    try:
        host, port = parse_authority(authority)
        dst = snapshot.workload_by_ip(host)
        if dst is None or dst.node != pod.workload.node or not pod.serves(dst):
            raise ProxyError(f"{authority} is not a workload of this pod", status=400,
                             flags="NR")
        conn.dst = dst
        tracker.show(conn, authority, src_ip, authority, "HBONE")
        admission = admit_inbound(snapshot, dst, ConnectionInfo(peer, src_ip, host, port),
                                  pod.capture_ports)
        conn.policy = admission.policy or ""
        raise_if_refused(admission)
        upstream = await _dial_for(pod, stream, host, port, src_ip)
        if stream.stream.is_reset:
            raise ProxyError("the peer reset the stream while the agent dialled the pod",
                             flags="DC")
        stream.accept()
        tracker.opened(conn)
        owned, upstream = upstream, None
        result = await tunnel.relay_stream(owned, stream, env.idle_timeout)
        # up = socket (the pod) -> stream: Istio's sent (the response direction).
        tracker.closed(conn, sent=result.bytes_up, received=result.bytes_down)
    except (NodeproxyError, OSError) as exc:
        tracker.failed(conn, exc)
        stream.refuse(getattr(exc, "status", 503))
    finally:
        if upstream is not None:  # dialled, but the stream ended before the relay began
            close_with_reset(upstream)
        tracker.end(conn)


async def _dial_for(pod: PodProxy, stream: tunnel.ServerStream, host: str, port: int,
                    src_ip: str) -> socket.socket:
    """Dial the local pod for one CONNECT stream. At most ``max_dials_per_connection`` dials
    run at once per HBONE connection; later streams wait their turn (their number is capped by
    SETTINGS_MAX_CONCURRENT_STREAMS), and a stream reset while waiting or dialling is cancelled
    by the glue, so a client cannot leave dials behind."""
    proto = stream.stream.protocol
    slots = pod.dial_slots.get(proto)
    if slots is None:
        slots = pod.dial_slots[proto] = asyncio.Semaphore(
            pod.env.limits.max_dials_per_connection)
        proto.closed.add_done_callback(lambda _f: pod.dial_slots.pop(proto, None))
    async with slots:
        return await pod.connect_local(host, port, src_ip)


def raise_if_refused(admission: Admission) -> None:
    """A refused admission as the error the tracker accounts: a safety-rule refusal is a
    rejection (counted by reason), a policy or mTLS denial a plain failure."""
    if admission.allowed:
        return
    if admission.rejection:
        raise RejectedError(admission.reason, reason=admission.rejection,
                            status=admission.status, flags=admission.response_flags)
    raise ProxyError(admission.reason, status=admission.status, flags=admission.response_flags)


def parse_authority(authority: str) -> tuple[str, int]:
    try:
        return parse_host_port(authority, "CONNECT authority", ip_only=True)
    except HostPortError as exc:
        raise ProxyError(f"bad CONNECT authority {authority!r}: {exc.reason}; want IP:PORT",
                         status=400, flags="NR") from None
