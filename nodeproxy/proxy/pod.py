"""One enrolled pod: its three listeners, its outbound pool, its identity.

All sockets come from the pod's socket factory, so in-pod mode opens them inside the pod's
netns and loopback mode (``--no-redirect``) opens them in the agent's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass

from nodeproxy import accesslog
from nodeproxy.errors import ProxyError
from nodeproxy.identity.manager import CertificateManager
from nodeproxy.metrics import ConnectionLabels
from nodeproxy.pool import ConnectionPool
from nodeproxy.proxy import tunnel
from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.sockets import SocketFactory
from nodeproxy.tls import ContextCache
from ztunnel_cfg.authz import ConnectionInfo, authorize
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.model import MtlsMode, Workload
from ztunnel_cfg.routing import Route, RouteKind, route
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


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) so the client sees a failure, not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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
        # Live connection table for /debug/connections: one insert and one pop per connection.
        self.live: dict[str, LiveConnection] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.certs.get(self.workload.identity)  # fail closed: no certificate, no listeners
        ports = self.env.ports
        # In-pod the netns belongs to this pod alone, so listen on every address; in loopback
        # mode several pods share the agent's namespace and each binds its own workload IP.
        addr = "0.0.0.0" if self._in_pod else self.listen_ip
        specs: list[tuple[int, Callable[[socket.socket], Coroutine[None, None, None]]]] = [
            (ports.outbound, self._outbound),
            (ports.inbound_plaintext, self._inbound_plaintext),
        ]
        loop = asyncio.get_running_loop()
        try:
            for port, handler in specs:
                lsock = await self.sockets.listener(addr, port)
                self._listeners.append(lsock)
                self._accept_tasks.append(loop.create_task(
                    self._accept_loop(lsock, handler), name=f"accept:{self.workload.name}:{port}"
                ))
            hbone_sock = await self.sockets.listener(addr, ports.inbound_hbone)
            self._listeners.append(hbone_sock)
            identity = self.workload.identity
            ctx = await self.contexts.rotating_server_context(identity)
            self._hbone = await tunnel.serve(
                hbone_sock, ctx, self._on_connect_request, trust_domain=identity.trust_domain
            )
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
        self, lsock: socket.socket, handler: Callable[[socket.socket], Coroutine[None, None, None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if self._closing:
                    return
                log.warning("accept failed: %s", exc, extra={"component": "proxy"})
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            task = loop.create_task(handler(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def live_connections(self) -> list[LiveConnection]:
        return list(self.live.values())

    # -- outbound (15001) ---------------------------------------------------------------------
    async def _outbound(self, sock: socket.socket) -> None:
        env = self.env
        conn_id = env.next_conn_id("out")
        started = time.monotonic()
        peer = sock.getpeername()
        src_addr = f"{peer[0]}:{peer[1]}"
        decision: Route | None = None
        flags, path, reason = "-", "failed", ""
        sent = received = 0
        try:
            dst_ip, dst_port = env.original_dst(sock)
            decision = route(env.snapshot(), self.workload, dst_ip, dst_port, env.choose)
            tunnelled = decision.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
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
            env.metrics.connection_failed(self._outbound_labels(decision, flags))
            _reset(sock)
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
        try:
            host, port = _parse_authority(authority)
            dst = snapshot.workload_by_ip(host)
            if dst is None or dst.node != self.workload.node or not self._serves(dst):
                raise ProxyError(f"{authority} is not a workload of this pod", status=400,
                                 flags="NR")
            src_ip = stream.peer_ip
            self.live[conn_id] = LiveConnection(
                conn_id, time.time(), "inbound", dst.key, authority, src_ip, authority, "HBONE"
            )
            decision = authorize(snapshot, dst, ConnectionInfo(peer, src_ip, host, port))
            policy = decision.policy or ""
            if not decision.allowed:
                raise ProxyError(decision.reason, status=401, flags="DENY")
            upstream = await self._connect_local(host, port, src_ip)
            stream.accept()
            env.metrics.connection_opened(_labels_for("destination", src, src_principal, dst, "",
                                                      "-", True))
            result = await tunnel.relay_stream(upstream, stream, env.idle_timeout)
            # relay_stream counts from the socket's point of view: up = socket -> stream.
            sent, received = result.bytes_up, result.bytes_down
            env.metrics.connection_closed(
                _labels_for("destination", src, src_principal, dst, "", flags, True), sent, received
            )
        except (NodeproxyError, OSError) as exc:
            flags, reason = _failure_flags(exc), str(exc)
            path = "denied" if flags == "DENY" else "failed"
            stream.refuse(getattr(exc, "status", 503))
            env.metrics.connection_failed(
                _labels_for("destination", src, src_principal, dst, "", flags, True)
            )
        finally:
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
        peer_ip, peer_port = sock.getpeername()[:2]
        snapshot = env.snapshot()
        src = snapshot.workload_by_ip(peer_ip)
        flags, path, reason, policy = "-", "plaintext", "", ""
        sent = received = 0
        dst = self.workload
        dst_addr = ""
        try:
            host, port = env.original_dst(sock)
            dst_addr = f"{host}:{port}"
            self.live[conn_id] = LiveConnection(
                conn_id, time.time(), "inbound_plaintext", dst.key, dst_addr,
                f"{peer_ip}:{peer_port}", dst_addr, "TCP",
            )
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
            env.metrics.connection_failed(_labels_for("destination", src, None, dst, "", flags,
                                                      False))
            _reset(sock)
        finally:
            self.live.pop(conn_id, None)
            with contextlib.suppress(OSError):
                sock.close()
            accesslog.write(accesslog.AccessRecord(
                conn_id=conn_id, direction="inbound_plaintext", src_addr=f"{peer_ip}:{peer_port}",
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
    host, sep, port_text = authority.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
        if not sep or not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ProxyError(f"bad CONNECT authority {authority!r}: want IP:PORT", status=400,
                         flags="NR") from None
    return host, port

