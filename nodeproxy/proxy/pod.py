"""One enrolled pod: its three listeners, its outbound pool, its identity.

The listeners hand each connection to its direction's module (``outbound``, ``inbound`` for
HBONE, ``inbound_passthrough`` for plaintext); the :class:`ConnectionTracker` keeps their
accounting. All sockets come from the pod's socket factory, so in-pod mode opens them inside
the pod's netns and loopback mode (``--no-redirect``) opens them in the agent's namespace.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass

from nodeproxy.errors import RejectedError
from nodeproxy.hbone import events as hbone_events
from nodeproxy.hbone.glue import HboneProtocol
from nodeproxy.identity.manager import CertificateManager
from nodeproxy.pool import ConnectionPool
from nodeproxy.proxy import tunnel
from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.proxy.inbound import serve_connect
from nodeproxy.proxy.inbound_passthrough import serve_inbound_plaintext
from nodeproxy.proxy.outbound import serve_outbound
from nodeproxy.proxy.tracker import ConnectionTracker, LiveConnection, peer_text
from nodeproxy.relay import TcpStream
from nodeproxy.sockets import SocketFactory, close_with_reset
from nodeproxy.tls import ContextCache
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.model import Workload
from ztunnel_cfg.routing import Route
from ztunnel_cfg.spiffe import SpiffeId

log = logging.getLogger("nodeproxy.proxy")

Handler = Callable[[TcpStream], Coroutine[None, None, None]]
LISTEN_BACKLOG = 1024  # as the listener was made (create_server listens again with its own)


class AcceptedStream(TcpStream):
    """A connection accepted by a plaintext listener's server (``loop.create_server``): handed
    to ``admit`` as soon as it exists; bytes that arrive meanwhile wait in the stream."""

    __slots__ = ("_admit",)

    def __init__(self, admit: Callable[[TcpStream], None]) -> None:
        super().__init__()
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._admit(self)


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId
    destinations: tuple[SpiffeId, ...]
    ip: str
    port: int


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
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._closing = False
        self._hbone: tunnel.InboundServer | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self._handshakes = 0  # inbound TLS handshakes in progress
        self.dial_slots: dict[HboneProtocol, asyncio.Semaphore] = {}  # per HBONE connection
        self.tracker = ConnectionTracker(env, lambda: self.workload)
        # Live connection table for /debug/connections: one insert and one pop per connection.
        self.live: dict[str, LiveConnection] = self.tracker.live

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
        plaintext: list[tuple[int, Handler, str]] = [
            (ports.outbound, self._outbound, "outbound"),
            (ports.inbound_plaintext, self._inbound_plaintext, "inbound_plaintext"),
        ]
        loop = asyncio.get_running_loop()
        try:
            for port, handler, direction in plaintext:
                lsock = await self.sockets.listener(addr, port)
                admit = functools.partial(self._admit, handler, direction)
                try:
                    server = await loop.create_server(functools.partial(AcceptedStream, admit),
                                                      sock=lsock, backlog=LISTEN_BACKLOG)
                except BaseException:
                    lsock.close()
                    raise
                self._servers.append(server)  # it owns the socket from now on
            # 15008 keeps an accept loop: the handshake limit must refuse a connection before
            # its TLS handshake starts, and a TLS server starts it before our code sees it.
            lsock = await self.sockets.listener(addr, ports.inbound_hbone)
            self._listeners.append(lsock)
            self._accept_tasks.append(loop.create_task(
                self._accept_loop(lsock, self._inbound_hbone, "inbound"),
                name=f"accept:{self.workload.name}:{ports.inbound_hbone}",
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
        for server in self._servers:
            server.close()  # and its listening socket
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
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await self.pool.aclose(timeout=max(drain_timeout, 0.5))
        self.sockets.close()

    def _admit(self, handler: Handler, direction: str, stream: TcpStream) -> None:
        """A connection a plaintext listener accepted: refused over the pod's connection limit,
        else served by ``handler`` in one task."""
        limit = self.env.limits.max_connections_per_pod
        if self._closing or len(self._conns) >= limit:
            peer = peer_text(stream.socket)
            stream.reset()
            if not self._closing:
                self.tracker.rejected(direction, self._over_limit(limit), peer)
            return
        task = asyncio.get_running_loop().create_task(handler(stream))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    def _over_limit(self, limit: int) -> RejectedError:
        return RejectedError(
            f"{self.workload.key} has {len(self._conns)} connections open through the agent "
            f"(limit {limit}, --max-conns-per-pod)",
            reason="pod_connection_limit", status=503, flags="UO")

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
                if self.tracker.log_allowed():
                    log.warning("accept failed: %s", exc, extra={"component": "proxy"})
                await asyncio.sleep(0.05)
                continue
            if len(self._conns) >= limit:
                self._reject(conn, direction, self._over_limit(limit))
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
        peer = peer_text(sock)
        close_with_reset(sock)
        self.tracker.rejected(direction, exc, peer)

    # -- the three listeners' handlers --------------------------------------------------------
    async def _outbound(self, stream: TcpStream) -> None:
        await serve_outbound(self, stream)

    async def _inbound_plaintext(self, stream: TcpStream) -> None:
        await serve_inbound_plaintext(self, stream)

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
        peer = peer_text(sock)
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
            self.tracker.rejected("inbound", error, peer)
            return
        finally:
            self._handshakes -= 1
        await proto.closed

    def _on_hbone_error(self, proto: HboneProtocol, event: hbone_events.ConnectionError) -> None:
        if event.kind in ("reset_flood", "control_flood"):
            self.tracker.rejected("inbound", RejectedError(
                f"HBONE connection from {proto.peer_identity} closed with GOAWAY "
                f"ENHANCE_YOUR_CALM: {event.reason}", reason=event.kind, status=503,
                flags="DPE"), proto.peer_ip)

    # -- what the direction modules use ------------------------------------------------------
    @property
    def capture_ports(self) -> tuple[int, int, int]:
        ports = self.env.ports
        return (ports.outbound, ports.inbound_plaintext, ports.inbound_hbone)

    def pool_key(self, decision: Route) -> PoolKey:
        return PoolKey(self.workload.identity, decision.expected_identities,
                       str(decision.target_ip),
                       decision.tunnel_port or self.env.ports.inbound_hbone)

    async def _connect_pool(self, key: Hashable) -> tunnel.ClientConnection:
        assert isinstance(key, PoolKey)
        ctx = await self.contexts.client(key.source)
        sock = await self.sockets.connect(key.ip, key.port, timeout=self.env.connect_timeout)
        return await tunnel.connect(
            sock, ctx, expected=key.destinations, trust_domain=key.source.trust_domain,
            timeout=self.env.connect_timeout,
        )

    async def _on_connect_request(
        self, stream: tunnel.ServerStream, authority: str, peer: SpiffeId,
        headers: dict[str, str],
    ) -> None:
        await serve_connect(self, stream, authority, peer)

    def serves(self, dst: Workload) -> bool:
        # In-pod mode a listener serves exactly its pod; loopback mode may host several.
        return dst.uid == self.workload.uid

    async def connect_local(self, host: str, port: int, src_ip: str) -> socket.socket:
        source = None
        transparent = False
        if self.env.preserve_source_ip and self._in_pod and src_ip != host:
            source, transparent = (src_ip, 0), True
        return await self.sockets.connect(
            host, port, source=source, transparent=transparent, timeout=self.env.connect_timeout
        )
