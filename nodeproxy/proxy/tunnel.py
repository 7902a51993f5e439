"""Adapter between the pod proxy and the HBONE glue, TLS identity checks and the relay.

Keeps the pod proxy free of transport details: it sees poolable client connections, server
streams that carry the peer's verified SPIFFE ID, and relays that return exact byte counts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nodeproxy.hbone import glue
from nodeproxy.hbone.events import ConnectRequest
from nodeproxy.hbone.flood import FloodLimits
from nodeproxy.pool import Lease
from nodeproxy.relay import RelayResult, TcpStream, relay, wrap_socket
from nodeproxy.sockets import close_with_reset
from nodeproxy.tls import PeerIdentityError, verify_peer
from ztunnel_cfg.model import Workload
from ztunnel_cfg.spiffe import SpiffeId

Stream = glue.HboneStream
RequestHandler = Callable[["ServerStream", str, SpiffeId, dict[str, str]], Awaitable[None]]


class ClientConnection:
    """A client HBONE connection as the pool sees it."""

    def __init__(self, conn: glue.HboneClientConnection, peer: SpiffeId) -> None:
        self._conn = conn
        self.peer = peer

    @property
    def usable(self) -> bool:
        proto = self._conn.protocol
        return proto.transport is not None and not proto.conn.goaway_received and not (
            proto.conn.goaway_sent_last_id is not None
        )

    @property
    def peer_max_streams(self) -> int:
        return int(self._conn.protocol.conn.remote_settings.max_concurrent_streams)

    async def open_stream(self, authority: str, headers: Sequence[tuple[str, str]]) -> Stream:
        return await self._conn.open_stream(authority, headers)

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.abort()

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()


PoolLease = Lease[ClientConnection]


class ServerStream:
    """An inbound CONNECT stream plus who sent it."""

    def __init__(self, stream: Stream, peer_ip: str) -> None:
        self.stream = stream
        self.peer_ip = peer_ip

    def accept(self) -> None:
        self.stream.accept()

    def refuse(self, status: int) -> None:
        self.stream.refuse(status)


def request_headers(source: Workload, client_addr: str) -> list[tuple[str, str]]:
    """Request headers of DESIGN §4: baggage, forwarded, a fresh traceparent."""
    baggage = ",".join(
        f"{k}={v}"
        for k, v in (
            ("k8s.cluster.name", source.cluster_id),
            ("k8s.namespace.name", source.namespace),
            ("k8s.pod.name", source.name),
            ("service.name", source.canonical_name),
            ("service.version", source.canonical_revision),
        )
        if v
    )
    trace = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
    return [("baggage", baggage), ("forwarded", f'for="{client_addr}"'), ("traceparent", trace)]


def _ssl_object(transport: asyncio.BaseTransport) -> ssl.SSLObject:
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        raise PeerIdentityError("connection is not TLS", flags="TLS_FAILURE")
    return obj  # type: ignore[no-any-return]


async def connect(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    expected: Sequence[SpiffeId],
    trust_domain: str,
    timeout: float,
) -> ClientConnection:
    """TLS + HTTP/2 over an already connected socket; the server's SAN must be expected."""
    peers: list[SpiffeId] = []

    def check(transport: asyncio.BaseTransport) -> None:
        peers.append(verify_peer(_ssl_object(transport), trust_domain, expected))

    conn = await glue.open_connection(None, None, ctx, sock=sock, verify_peer=check,
                                      timeout=timeout)
    return ClientConnection(conn, peers[0])


class InboundServer:
    """Serves HBONE on accepted sockets; each CONNECT reaches ``handler`` with the peer's
    verified identity (checked once per TLS connection, before any byte is processed)."""

    def __init__(self, server: glue.HboneServer) -> None:
        self._server = server

    async def accept(self, sock: socket.socket, ctx: ssl.SSLContext, *,
                     handshake_timeout: float) -> glue.HboneProtocol:
        return await self._server.accept(sock, ctx, handshake_timeout=handshake_timeout)

    async def close(self, timeout: float) -> None:
        await self._server.close(graceful=True, timeout=timeout)


def inbound_server(
    handler: RequestHandler, *, trust_domain: str, flood_limits: FloodLimits,
    max_backlog: int, on_connection_error: glue.ConnectionErrorHook | None = None,
) -> InboundServer:
    def check(transport: asyncio.BaseTransport) -> None:
        peer = verify_peer(_ssl_object(transport), trust_domain, None)
        peername: Any = transport.get_extra_info("peername")
        proto = transport.get_protocol()
        assert isinstance(proto, glue.HboneProtocol)
        proto.peer_identity = peer
        proto.peer_ip = str(peername[0]) if peername else ""

    async def on_request(stream: Stream, req: ConnectRequest) -> None:
        proto = stream.protocol
        if proto.peer_identity is None:  # cannot happen: checked at connection_made
            stream.refuse(503)
            return
        await handler(ServerStream(stream, proto.peer_ip), req.authority, proto.peer_identity,
                      dict(req.headers))

    return InboundServer(glue.HboneServer(
        on_request, verify_peer=check, flood_limits=flood_limits,
        on_connection_error=on_connection_error, max_backlog=max_backlog))


async def relay_sockets(downstream: TcpStream | socket.socket,
                        upstream: TcpStream | socket.socket, idle_timeout: float) -> RelayResult:
    """Relay two TCP connections; both are closed whatever happens (also on cancellation)."""
    try:
        down = await _stream_of(downstream)
    except BaseException:
        _reset(upstream)
        raise
    try:
        up = await _stream_of(upstream)
    except BaseException:
        down.reset()
        raise
    return await relay(down, up, idle_timeout=idle_timeout)


async def relay_stream(downstream: TcpStream | socket.socket, stream: Stream | ServerStream,
                       idle_timeout: float) -> RelayResult:
    """Relay a TCP connection (downstream) and an HBONE stream (upstream); the connection is
    closed and the stream ended whatever happens (also on cancellation)."""
    hbone = stream.stream if isinstance(stream, ServerStream) else stream
    try:
        tcp = await _stream_of(downstream)
    except BaseException:
        hbone.reset()
        raise
    return await relay(tcp, hbone, idle_timeout=idle_timeout)


async def _stream_of(conn: TcpStream | socket.socket) -> TcpStream:
    """A connection accepted by a listener's server is a TcpStream already; a dialled socket
    is attached to the loop here (and reset if that fails)."""
    if isinstance(conn, TcpStream):
        return conn
    try:
        return await wrap_socket(conn)
    except BaseException:
        close_with_reset(conn)
        raise


def _reset(conn: TcpStream | socket.socket) -> None:
    if isinstance(conn, TcpStream):
        conn.reset()
    else:
        close_with_reset(conn)
