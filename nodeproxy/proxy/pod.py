"""One enrolled pod: its three listeners, its outbound pool, its identity.

All sockets come from the pod's socket factory, so in-pod mode opens them inside the pod's
netns and loopback mode (``--no-redirect``) opens them in the agent's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass

from nodeproxy import accesslog
from nodeproxy.errors import ProxyError, RejectedError
from nodeproxy.hbone import events as hbone_events
from nodeproxy.hbone.glue import HboneProtocol
from nodeproxy.identity.manager import CertificateManager
from nodeproxy.metrics import ConnectionLabels
from nodeproxy.pool import ConnectionPool
from nodeproxy.proxy import guard, tunnel
from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.sockets import SocketFactory, close_with_reset
from nodeproxy.tls import ContextCache
from ztunnel_cfg.authz import ConnectionInfo, authorize
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.model import MtlsMode, Workload
from ztunnel_cfg.routing import Route, RouteKind, inbound_waypoint_refusal, route
from ztunnel_cfg.spiffe import SpiffeId

log = logging.getLogger("nodeproxy.proxy")


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId
    destinations: tuple[SpiffeId, ...]
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One row of ``/debug/connections`` (istioctl ztunnel-config connections columns)."""

    conn_id: str
    started: float  # wall-clock epoch seconds
    direction: str  # outbound | inbound | inbound_plaintext
    workload: str  # ns/name of the pod this agent proxies for
    local: str  # the pod-side address
    remote: str  # the peer address (dialed address for outbound)
    target: str  # outbound: the original destination; inbound: the CONNECT authority
    protocol: str  # HBONE | TCP

    def to_row(self) -> dict[str, object]:
        return {
            "id": self.conn_id, "started": self.started, "direction": self.direction,
            "workload": self.workload, "local": self.local, "remote": self.remote,
            "target": self.target, "protocol": self.protocol,
        }


def _peer_text(sock: socket.socket) -> str:
    """``ip:port`` of the peer, or "" once it is gone (a client may reset right after SYN)."""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return f"{peer[0]}:{peer[1]}"


class LogThrottle:
    """At most ``per_second`` lines a second; the next line says how many were dropped.

    Rejections come in floods by nature: one access line each (~35 us) would let a client buy
    agent CPU with connections the agent refuses. Metrics still count every one."""

    def __init__(self, per_second: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        self._second = -1
        self._used = 0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: drop this line. Else the number of lines dropped since the last one."""
        second = int(self._clock())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self._per_second:
            self.suppressed += 1
            return None
        self._used += 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped


def _labels_for(
    reporter: str,
    src: Workload | None,
    src_principal: str | None,
    dst: Workload | None,
    service: str,
    flags: str,
    mtls: bool,
) -> ConnectionLabels:
    return ConnectionLabels(
        reporter=reporter,
        source_workload=src.name if src else "unknown",
        source_workload_namespace=src.namespace if src else "unknown",
        source_principal=src_principal or (str(src.identity) if src else "unknown"),
        source_app=src.canonical_name if src else "unknown",
        destination_workload=dst.name if dst else "unknown",
        destination_workload_namespace=dst.namespace if dst else "unknown",
        destination_principal=str(dst.identity) if dst else "unknown",
        destination_app=dst.canonical_name if dst else "unknown",
        destination_service=service or "unknown",
        response_flags=flags,
        connection_security_policy="mutual_tls" if mtls else "unknown",
    )


class PodProxy:
    def __init__(
        self,
        workload: Workload,
        env: ProxyEnv,
        sockets: SocketFactory,
        certs: CertificateManager,
        contexts: ContextCache,
        listen_ip: str | None = None,
    ) -> None:
        self.workload = workload
        self.env = env
        self.sockets = sockets
        self.certs = certs
        self.contexts = contexts
        # In-pod: bind the pod's IP (15008 must answer on it; 15001/15006 catch REDIRECTs).
        self.listen_ip = listen_ip or str(workload.workload_ips[0])
        self.pool: ConnectionPool[tunnel.ClientConnection] = ConnectionPool(self._connect_pool)
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._closing = False
        self._hbone: tunnel.InboundServer | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self._handshakes = 0  # inbound TLS handshakes in progress
        self._dial_slots: dict[HboneProtocol, asyncio.Semaphore] = {}  # per HBONE connection
        self._reject_log = LogThrottle()
        # Live connection table for /debug/connections: one insert and one pop per connection.
        self.live: dict[str, LiveConnection] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.certs.get(self.workload.identity)  # fail closed: no certificate, no listeners
        ports = self.env.ports
        # In-pod the netns belongs to this pod alone, so listen on every address; in loopback
        # mode several pods share the agent's namespace and each binds its own workload IP.
        addr = "0.0.0.0" if self._in_pod else self.listen_ip
        limits = self.env.limits
        identity = self.workload.identity
        self._server_ctx = await self.contexts.rotating_server_context(identity)
        self._hbone = tunnel.inbound_server(
            self._on_connect_request, trust_domain=identity.trust_domain,
            flood_limits=limits.flood, max_backlog=limits.max_peer_backlog,
            on_connection_error=self._on_hbone_error,
        )
        specs: list[tuple[int, Callable[[socket.socket], Coroutine[None, None, None]], str]] = [
            (ports.outbound, self._outbound, "outbound"),
            (ports.inbound_plaintext, self._inbound_plaintext, "inbound_plaintext"),
            (ports.inbound_hbone, self._inbound_hbone, "inbound"),
        ]
        loop = asyncio.get_running_loop()
        try:
            for port, handler, direction in specs:
                lsock = await self.sockets.listener(addr, port)
                self._listeners.append(lsock)
                self._accept_tasks.append(loop.create_task(
                    self._accept_loop(lsock, handler, direction),
                    name=f"accept:{self.workload.name}:{port}",
                ))
        except BaseException:
            await self.close(0)
            raise
        self.pool.start_reaper()

    @property
    def _in_pod(self) -> bool:
        return getattr(self.sockets, "path", None) is not None

    def update(self, workload: Workload) -> None:
        self.workload = workload

    async def close(self, drain_timeout: float) -> None:
        self._closing = True
        for task in self._accept_tasks:
            task.cancel()
        for lsock in self._listeners:
            lsock.close()
        self._listeners.clear()
        if self._hbone is not None:
            await self._hbone.close(drain_timeout)
            self._hbone = None
        if self._conns and drain_timeout > 0:
            await asyncio.wait(set(self._conns), timeout=drain_timeout)
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        self._accept_tasks.clear()
        await self.pool.aclose(timeout=max(drain_timeout, 0.5))
        self.sockets.close()

    async def _accept_loop(
        self, lsock: socket.socket,
        handler: Callable[[socket.socket], Coroutine[None, None, None]], direction: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        limit = self.env.limits.max_connections_per_pod
        while not self._closing:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if self._closing:
                    return
                if self._reject_log.allow() is not None:
                    log.warning("accept failed: %s", exc, extra={"component": "proxy"})
                await asyncio.sleep(0.05)
                continue
            if len(self._conns) >= limit:
                self._reject(conn, direction, RejectedError(
                    f"{self.workload.key} has {len(self._conns)} connections open through the "
                    f"agent (limit {limit}, --max-conns-per-pod)",
                    reason="pod_connection_limit", status=503, flags="UO"))
                continue
            conn.setblocking(False)
            task = loop.create_task(handler(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def live_connections(self) -> list[LiveConnection]:
        return list(self.live.values())

    @property
    def pending_handshakes(self) -> int:
        """Inbound HBONE TLS handshakes in progress (bounded by max_pending_handshakes)."""
        return self._handshakes

    # -- rejections (limits and safety rules) -------------------------------------------------
    def _reject(self, sock: socket.socket, direction: str, exc: RejectedError) -> None:
        """Reset a connection refused before any handler ran; count and log it."""
        peer = _peer_text(sock)
        close_with_reset(sock)
        self._rejected(direction, exc, peer)

    def _rejected(self, direction: str, exc: RejectedError, peer: str, dst: str = "") -> None:
        self.env.metrics.connection_rejected(direction, exc.reason)
        dropped = self._reject_log.allow()
        if dropped is None:
            return
        note = f" ({dropped} similar lines dropped)" if dropped else ""
        accesslog.write(accesslog.AccessRecord(
            conn_id=self.env.next_conn_id("rej"), direction=direction, src_addr=peer,
            dst_addr=dst, src_workload="", src_identity="", dst_workload=self.workload.name,
            dst_identity=str(self.workload.identity), dst_service="", path="rejected",
            bytes_sent=0, bytes_received=0, duration_ms=0.0, response_flags=exc.flags,
            policy="", reason=exc.message + note,
        ))

    # -- inbound HBONE connections (15008) ----------------------------------------------------
    async def _inbound_hbone(self, sock: socket.socket) -> None:
        limits = self.env.limits
        if self._handshakes >= limits.max_pending_handshakes:
            self._reject(sock, "inbound", RejectedError(
                f"{self._handshakes} TLS handshakes in progress for {self.workload.key} (limit "
                f"{limits.max_pending_handshakes}, --max-pending-handshakes)",
                reason="handshake_limit", status=503, flags="UO"))
            return
        assert self._hbone is not None
        assert self._server_ctx is not None
        peer = _peer_text(sock)
        self._handshakes += 1
        started = time.monotonic()
        try:
            proto = await self._hbone.accept(sock, self._server_ctx,
                                             handshake_timeout=limits.handshake_timeout)
        except (OSError, NodeproxyError) as exc:  # ssl.SSLError is an OSError
            # The transport owned the socket and has closed it.
            # Loop timers may fire a little early; no real handshake fails only that late.
            if time.monotonic() - started >= 0.95 * limits.handshake_timeout:
                error = RejectedError(
                    f"TLS handshake not completed within {limits.handshake_timeout:g}s "
                    "(--handshake-timeout)", reason="handshake_timeout", status=503,
                    flags="TLS_FAILURE")
            else:
                error = RejectedError(f"TLS handshake failed: {exc}", reason="tls_failure",
                                      status=503, flags="TLS_FAILURE")
            self._rejected("inbound", error, peer)
            return
        finally:
            self._handshakes -= 1
        await proto.closed

    def _on_hbone_error(self, proto: HboneProtocol, event: hbone_events.ConnectionError) -> None:
        if event.kind in ("reset_flood", "control_flood"):
            self._rejected("inbound", RejectedError(
                f"HBONE connection from {proto.peer_identity} closed with GOAWAY "
                f"ENHANCE_YOUR_CALM: {event.reason}", reason=event.kind, status=503,
                flags="DPE"), proto.peer_ip)

    # -- outbound (15001) ---------------------------------------------------------------------
    async def _outbound(self, sock: socket.socket) -> None:
        env = self.env
        conn_id = env.next_conn_id("out")
        started = time.monotonic()
        src_addr = _peer_text(sock)
        decision: Route | None = None
        flags, path, reason = "-", "failed", ""
        sent = received = 0
        try:
            dst_ip, dst_port = env.original_dst(sock)
            decision = route(env.snapshot(), self.workload, dst_ip, dst_port, env.choose)
            tunnelled = decision.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
            refusal = guard.outbound_refusal(env.ports, dst_port, mesh_destination=tunnelled)
            if refusal is not None:
                raise RejectedError(refusal, reason="own_port", status=400, flags="NR")
            dialed = decision.tunnel_port if tunnelled else decision.target_port
            self.live[conn_id] = LiveConnection(
                conn_id, time.time(), "outbound", self.workload.key, src_addr,
                f"{decision.target_ip}:{dialed}",
                f"{dst_ip}:{dst_port}", "HBONE" if tunnelled else "TCP",
            )
            if decision.kind is RouteKind.NO_ENDPOINTS:
                raise ProxyError(decision.reason, status=503, flags="UH")
            if decision.kind is RouteKind.PASSTHROUGH:
                upstream = await self.sockets.connect(
                    str(decision.target_ip), decision.target_port, timeout=env.connect_timeout
                )
                # Opened only once the upstream side exists, so opened - closed = open now.
                env.metrics.connection_opened(self._outbound_labels(decision, "-"))
                path = "passthrough"
                result = await tunnel.relay_sockets(sock, upstream, env.idle_timeout)
            else:
                stream, lease = await self._open_stream(decision, src_addr)
                env.metrics.connection_opened(self._outbound_labels(decision, "-"))
                path = "waypoint" if decision.kind is RouteKind.WAYPOINT else "hbone"
                try:
                    result = await tunnel.relay_stream(sock, stream, env.idle_timeout)
                finally:
                    lease.release()
            sent, received = result.bytes_up, result.bytes_down
            if result.reset:
                flags = "UR" if result.error is None else "URX"
            # Istio's istio_tcp_sent_bytes is the response direction (destination -> source) on
            # both reporters, received the request direction; here up = client -> destination.
            env.metrics.connection_closed(self._outbound_labels(decision, flags), received, sent)
        except (NodeproxyError, OSError) as exc:
            flags, reason = _failure_flags(exc), str(exc)
            path = "denied" if flags == "DENY" else "failed"
            if isinstance(exc, RejectedError):
                path = "rejected"
                env.metrics.connection_rejected("outbound", exc.reason)
            env.metrics.connection_failed(self._outbound_labels(decision, flags))
            close_with_reset(sock)
            log.info("outbound %s failed: %s", conn_id, exc, extra={"component": "outbound"})
        finally:
            self.live.pop(conn_id, None)
            with contextlib.suppress(OSError):
                sock.close()
            self._access(
                conn_id, "outbound", src_addr, decision, path, sent, received, started, flags,
                reason,
            )

    def _outbound_labels(self, decision: Route | None, flags: str) -> ConnectionLabels:
        dst = decision.destination if decision else None
        service = decision.service.hostname if decision and decision.service else ""
        mtls = decision is not None and decision.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
        return _labels_for("source", self.workload, None, dst, service, flags, mtls)

    async def _open_stream(
        self, decision: Route, src_addr: str
    ) -> tuple[tunnel.Stream, tunnel.PoolLease]:
        key = PoolKey(
            self.workload.identity, decision.expected_identities, str(decision.target_ip),
            decision.tunnel_port or self.env.ports.inbound_hbone,
        )
        lease = await self.pool.acquire(key)
        try:
            authority = decision.authority or f"{decision.target_ip}:{decision.target_port}"
            headers = tunnel.request_headers(self.workload, src_addr)
            stream = await lease.conn.open_stream(authority, headers)
        except BaseException:
            lease.release()
            raise
        return stream, lease

    async def _connect_pool(self, key: Hashable) -> tunnel.ClientConnection:
        assert isinstance(key, PoolKey)
        ctx = await self.contexts.client(key.source)
        sock = await self.sockets.connect(key.ip, key.port, timeout=self.env.connect_timeout)
        return await tunnel.connect(
            sock, ctx, expected=key.destinations, trust_domain=key.source.trust_domain,
            timeout=self.env.connect_timeout,
        )

    # -- inbound HBONE (15008) ----------------------------------------------------------------
    async def _on_connect_request(
        self, stream: tunnel.ServerStream, authority: str, peer: SpiffeId,
        headers: dict[str, str],
    ) -> None:
        env = self.env
        conn_id = env.next_conn_id("in")
        started = time.monotonic()
        snapshot = env.snapshot()
        src = snapshot.workload_by_ip(stream.peer_ip)
        if src is not None and src.identity != peer:
            src = None  # the IP does not prove who it is; the certificate does
        src_principal = str(peer)
        flags, path, reason, policy = "-", "hbone", "", ""
        sent = received = 0
        dst: Workload | None = None
        upstream: socket.socket | None = None  # owned here until the relay takes it
        try:
            host, port = _parse_authority(authority)
            dst = snapshot.workload_by_ip(host)
            if dst is None or dst.node != self.workload.node or not self._serves(dst):
                raise ProxyError(f"{authority} is not a workload of this pod", status=400,
                                 flags="NR")
            refusal = guard.inbound_refusal(env.ports, port)
            if refusal is not None:
                raise RejectedError(refusal, reason="own_port", status=400, flags="NR")
            src_ip = stream.peer_ip
            self.live[conn_id] = LiveConnection(
                conn_id, time.time(), "inbound", dst.key, authority, src_ip, authority, "HBONE"
            )
            bypass = inbound_waypoint_refusal(snapshot, dst, peer)
            if bypass is not None:
                raise RejectedError(bypass, reason="waypoint_bypass", status=401, flags="DENY")
            decision = authorize(snapshot, dst, ConnectionInfo(peer, src_ip, host, port))
            policy = decision.policy or ""
            if not decision.allowed:
                raise ProxyError(decision.reason, status=401, flags="DENY")
            upstream = await self._dial_for(stream, host, port, src_ip)
            if stream.stream.is_reset:
                raise ProxyError("the peer reset the stream while the agent dialled the pod",
                                 flags="DC")
            stream.accept()
            env.metrics.connection_opened(_labels_for("destination", src, src_principal, dst, "",
                                                      "-", True))
            owned, upstream = upstream, None
            result = await tunnel.relay_stream(owned, stream, env.idle_timeout)
            # relay_stream counts from the socket's point of view: up = socket -> stream.
            sent, received = result.bytes_up, result.bytes_down
            env.metrics.connection_closed(
                _labels_for("destination", src, src_principal, dst, "", flags, True), sent, received
            )
        except (NodeproxyError, OSError) as exc:
            flags, reason = _failure_flags(exc), str(exc)
            path = "denied" if flags == "DENY" else "failed"
            if isinstance(exc, RejectedError):
                path = "rejected"
                env.metrics.connection_rejected("inbound", exc.reason)
            stream.refuse(getattr(exc, "status", 503))
            env.metrics.connection_failed(
                _labels_for("destination", src, src_principal, dst, "", flags, True)
            )
        finally:
            if upstream is not None:  # dialled, but the stream ended before the relay began
                close_with_reset(upstream)
            self.live.pop(conn_id, None)
            env_src = src.name if src else ""
            accesslog.write(accesslog.AccessRecord(
                conn_id=conn_id, direction="inbound", src_addr=stream.peer_ip,
                dst_addr=authority, src_workload=env_src, src_identity=src_principal,
                dst_workload=dst.name if dst else "", dst_identity=str(dst.identity) if dst else "",
                dst_service="", path=path, bytes_sent=sent, bytes_received=received,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                response_flags=flags, policy=policy, reason=reason,
            ))

    async def _dial_for(self, stream: tunnel.ServerStream, host: str, port: int,
                        src_ip: str) -> socket.socket:
        """Dial the local pod for one CONNECT stream. At most ``max_dials_per_connection``
        dials run at once per HBONE connection; later streams wait their turn (their number
        is capped by SETTINGS_MAX_CONCURRENT_STREAMS), and a stream reset while waiting or
        dialling is cancelled by the glue, so a client cannot leave dials behind."""
        proto = stream.stream.protocol
        slots = self._dial_slots.get(proto)
        if slots is None:
            slots = self._dial_slots[proto] = asyncio.Semaphore(
                self.env.limits.max_dials_per_connection)
            proto.closed.add_done_callback(lambda _f: self._dial_slots.pop(proto, None))
        async with slots:
            return await self._connect_local(host, port, src_ip)

    def _serves(self, dst: Workload) -> bool:
        # In-pod mode a listener serves exactly its pod; loopback mode may host several.
        return dst.uid == self.workload.uid

    async def _connect_local(self, host: str, port: int, src_ip: str) -> socket.socket:
        source = None
        transparent = False
        if self.env.preserve_source_ip and self._in_pod and src_ip != host:
            source, transparent = (src_ip, 0), True
        return await self.sockets.connect(
            host, port, source=source, transparent=transparent, timeout=self.env.connect_timeout
        )

    # -- inbound plaintext (15006) ------------------------------------------------------------
    async def _inbound_plaintext(self, sock: socket.socket) -> None:
        env = self.env
        conn_id = env.next_conn_id("pt")
        started = time.monotonic()
        peer = _peer_text(sock)
        peer_ip = peer.rpartition(":")[0]
        snapshot = env.snapshot()
        src = snapshot.workload_by_ip(peer_ip)
        flags, path, reason, policy = "-", "plaintext", "", ""
        sent = received = 0
        dst = self.workload
        dst_addr = ""
        try:
            if not peer:
                raise ProxyError("client went away before it was served", flags="DC")
            host, port = env.original_dst(sock)
            dst_addr = f"{host}:{port}"
            self.live[conn_id] = LiveConnection(
                conn_id, time.time(), "inbound_plaintext", dst.key, dst_addr, peer, dst_addr,
                "TCP",
            )
            refusal = guard.inbound_refusal(env.ports, port)
            if refusal is not None:
                raise RejectedError(refusal, reason="own_port", status=400, flags="NR")
            bypass = inbound_waypoint_refusal(snapshot, self.workload, None)
            if bypass is not None:
                raise RejectedError(bypass, reason="waypoint_bypass", status=401, flags="DENY")
            if snapshot.mtls_mode(self.workload) is MtlsMode.STRICT:
                raise ProxyError(
                    f"plaintext connection from {peer_ip} refused: {self.workload.namespace}/"
                    f"{self.workload.name} requires mTLS (STRICT)", status=401, flags="DENY",
                )
            decision = authorize(snapshot, self.workload, ConnectionInfo(None, peer_ip, host, port))
            policy = decision.policy or ""
            if not decision.allowed:
                raise ProxyError(decision.reason, status=401, flags="DENY")
            upstream = await self._connect_local(host, port, peer_ip)
            env.metrics.connection_opened(
                _labels_for("destination", src, None, dst, "", "-", False)
            )
            result = await tunnel.relay_sockets(upstream, sock, env.idle_timeout)
            sent, received = result.bytes_up, result.bytes_down
            env.metrics.connection_closed(
                _labels_for("destination", src, None, dst, "", flags, False), sent, received
            )
        except (NodeproxyError, OSError) as exc:
            flags, reason = _failure_flags(exc), str(exc)
            path = "denied" if flags == "DENY" else "failed"
            if isinstance(exc, RejectedError):
                path = "rejected"
                env.metrics.connection_rejected("inbound_plaintext", exc.reason)
            env.metrics.connection_failed(_labels_for("destination", src, None, dst, "", flags,
                                                      False))
            close_with_reset(sock)
        finally:
            self.live.pop(conn_id, None)
            with contextlib.suppress(OSError):
                sock.close()
            accesslog.write(accesslog.AccessRecord(
                conn_id=conn_id, direction="inbound_plaintext", src_addr=peer,
                dst_addr=dst_addr, src_workload=src.name if src else "", src_identity="",
                dst_workload=dst.name, dst_identity=str(dst.identity), dst_service="", path=path,
                bytes_sent=sent, bytes_received=received,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                response_flags=flags, policy=policy, reason=reason,
            ))

    # -- helpers ------------------------------------------------------------------------------
    def _access(
        self, conn_id: str, direction: str, src_addr: str, decision: Route | None, path: str,
        sent: int, received: int, started: float, flags: str, reason: str,
    ) -> None:
        dst = decision.destination if decision else None
        meshed = decision is not None and decision.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
        accesslog.write(accesslog.AccessRecord(
            conn_id=conn_id, direction=direction, src_addr=src_addr,
            dst_addr=f"{decision.target_ip}:{decision.target_port}" if decision else "",
            src_workload=self.workload.name, src_identity=str(self.workload.identity),
            dst_workload=dst.name if dst else "",
            dst_identity=str(dst.identity) if dst and meshed else "",
            dst_service=decision.service.hostname if decision and decision.service else "",
            path=path, bytes_sent=sent, bytes_received=received,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            response_flags=flags, policy="", reason=reason,
        ))


def _failure_flags(exc: BaseException) -> str:
    """Istio response_flags for a failure: the error's own, else CONNECT."""
    flags = getattr(exc, "flags", None)
    return flags if isinstance(flags, str) else "CONNECT"


def _parse_authority(authority: str) -> tuple[str, int]:
    try:
        return parse_host_port(authority, "CONNECT authority", ip_only=True)
    except HostPortError as exc:
        raise ProxyError(f"bad CONNECT authority {authority!r}: {exc.reason}; want IP:PORT",
                         status=400, flags="NR") from None

