"""HTTP/2 (prior knowledge) and gRPC through the waypoint.

The client's HTTP/2 connection is terminated here; each request stream is decided and
retried by :mod:`nodeproxy.waypoint.exchange` and sent as a stream on a pooled HTTP/2
connection to the chosen endpoint (the client spoke HTTP/2, so the endpoint is spoken to in
HTTP/2: gRPC needs it).  Request bodies stream as they arrive while a copy of up to
``replay_buffer`` bytes is kept for retries, so bidirectional gRPC streams work and small
requests stay retriable.  gRPC: ``grpc-timeout`` bounds the request, trailers and
``grpc-status`` pass through, and the waypoint's own answers are trailers-only gRPC errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, cast

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from nodeproxy.waypoint.breaker import connection_exhausted
from nodeproxy.waypoint.cluster import Cluster
from nodeproxy.waypoint.exchange import (
    Answered,
    Exchange,
    Forward,
    LocalReply,
    decide,
    mirror_clusters,
    record,
    run_tries,
    shadow_host,
    spawn_mirror,
    with_traceparent,
)
from nodeproxy.waypoint.h2pipe import ByteStream, H2Pipe, H2Stream, Headers, StreamGone
from nodeproxy.waypoint.proxy import Downstream, WaypointProxy, tunnel_headers
from nodeproxy.waypoint.retry import Outcome
from nodeproxy.waypoint.upstream import Endpoint
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import host_without_port
from ztunnel_cfg.l7 import Request, response_headers
from ztunnel_cfg.l7.request import TargetError, normalize_path_and_query

# Envoy's HTTP -> gRPC status mapping for its own replies (grpc/common.cc httpToGrpcStatus).
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 4}
_CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade", "te"})
# Values new in every request: HPACK-indexing them only fills the dynamic table, which hpack
# searches linearly for every header it encodes (HeaderTable.search was 9% of the waypoint's
# samples under h2load while every traceparent was indexed).
_UNIQUE_PER_REQUEST = frozenset({"traceparent", "x-request-id"})
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(value: str | None) -> float | None:
    """Seconds from a ``grpc-timeout`` header (``100m``, ``5S``); None if absent/invalid."""
    if value is None:
        return None
    match = _GRPC_TIMEOUT.match(value)
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)]


class Overflow(Exception):
    """The cluster's circuit breaker refused a new connection and none has room: 503 UO."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"circuit breaker: {limit} limit reached")
        self.limit = limit


class H2Tunnel(Protocol):
    """What an HTTP/2 upstream connection runs over (an HBONE CONNECT stream)."""

    @property
    def stream(self) -> ByteStream: ...

    def close(self) -> None: ...


class TunnelOpener(Protocol):
    """Opens tunnels to endpoints (:class:`Upstreams`; tests inject in-memory ones)."""

    async def open(self, endpoint: Endpoint,
                   headers: Sequence[tuple[str, str]]) -> H2Tunnel: ...


class Http2Upstream:
    """One HTTP/2 client connection to an endpoint, over one HBONE tunnel.  ``on_closed``
    runs once, when the connection ends (the circuit breaker's connection is released)."""

    def __init__(self, tunnel: H2Tunnel, address: str = "",
                 on_closed: Callable[[], None] = lambda: None) -> None:
        self.tunnel = tunnel
        self.address = address  # the endpoint's ip:port
        self.pipe = H2Pipe(tunnel.stream, client_side=True)
        self.reader: asyncio.Task[None] | None = None
        self.requests = 0  # streams opened (maxRequestsPerConnection retires the connection)
        self._on_closed: Callable[[], None] | None = on_closed

    async def start(self) -> None:
        await self.pipe.start()
        self.reader = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.pipe.run()
        finally:
            self.tunnel.close()
            self._closed()

    def _closed(self) -> None:
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed()

    def usable(self, max_requests: int) -> bool:
        return not self.pipe.closed and not self.pipe.goaway and self.pipe.capacity > 0 \
            and not connection_exhausted(self.requests, max_requests)

    def idle(self) -> bool:
        return not self.pipe.streams

    def open_stream(self) -> H2Stream:
        self.requests += 1
        return self.pipe.open_stream()

    def close_soon(self) -> None:
        """Close without waiting: the reader task ends (releasing the breaker's connection)."""
        self.pipe.closed = True
        self.tunnel.close()
        if self.reader is not None and not self.reader.done():
            # Also when the reader is cancelled before its first step (its finally never
            # runs then).
            self.reader.add_done_callback(lambda _task: self._closed())
            self.reader.cancel()
        else:
            self._closed()

    async def aclose(self) -> None:
        self.pipe.closed = True
        self.tunnel.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.pipe.aclose()
        self._closed()


class Http2Pool:
    """HTTP/2 connections of one cluster, per endpoint address (a new one when every one is
    full).  Every connection counts against the cluster's circuit breaker
    (``tcp.maxConnections``) from before it is opened until it closes; at the limit a
    request uses a connection to its endpoint that still has a free stream, else an idle
    connection to another endpoint is closed to make room, else :class:`Overflow` (Envoy's
    HTTP/2 pool: no pending queue of its own, 503 UO)."""

    def __init__(self, cluster: Cluster, upstreams: TunnelOpener) -> None:
        self.cluster = cluster
        self.upstreams = upstreams
        self.conns: dict[str, list[Http2Upstream]] = {}
        self._opening: dict[str, asyncio.Future[Http2Upstream]] = {}

    async def acquire(self, endpoint: Endpoint,
                      headers: Callable[[], Sequence[tuple[str, str]]]) -> Http2Upstream:
        """A connection with a free stream (``headers()``: the CONNECT headers of a new
        one).  The cluster's ``maxRequestsPerConnection`` (0: unlimited) retires connections
        that carried that many requests (they finish what they carry, then close).  Raises
        Overflow, or the dial's error (connect failure)."""
        breaker = self.cluster.breaker
        while True:
            max_requests = self.cluster.max_requests_per_connection
            conns = self.conns.get(endpoint.address, [])
            for conn in list(conns):
                if conn.pipe.closed:
                    conns.remove(conn)
                elif conn.usable(max_requests):
                    return conn
                elif connection_exhausted(conn.requests, max_requests) and conn.idle():
                    conns.remove(conn)  # retired and idle: close it
                    await conn.aclose()
            pending = self._opening.get(endpoint.address)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            if not breaker.connection_room():
                await self._evict_idle_elsewhere(endpoint.address)
            if not breaker.try_acquire_connection():
                raise Overflow("connections (maxConnections)")
            return await self._open(endpoint, headers)

    async def _open(self, endpoint: Endpoint,
                    headers: Callable[[], Sequence[tuple[str, str]]]) -> Http2Upstream:
        """Open a connection; the breaker's connection is already acquired for it."""
        fut: asyncio.Future[Http2Upstream] = asyncio.get_running_loop().create_future()
        self._opening[endpoint.address] = fut
        conn: Http2Upstream | None = None
        try:
            tunnel = await self.upstreams.open(endpoint, headers())
            conn = Http2Upstream(tunnel, endpoint.address,
                                 self.cluster.breaker.release_connection)
            await conn.start()
        except BaseException as exc:
            if conn is not None:
                await conn.aclose()  # releases the breaker's connection
            else:
                self.cluster.breaker.release_connection()
            fut.set_exception(exc if isinstance(exc, Exception) else
                              asyncio.CancelledError())
            fut.exception()
            raise
        finally:
            self._opening.pop(endpoint.address, None)
        fut.set_result(conn)
        self.conns.setdefault(endpoint.address, []).append(conn)
        return conn

    async def _evict_idle_elsewhere(self, address: str) -> bool:
        """Close one idle connection to another endpoint (it blocks nobody); False if none."""
        for other, conns in self.conns.items():
            if other == address:
                continue
            for conn in conns:
                if conn.idle() and not conn.pipe.closed:
                    conns.remove(conn)
                    await conn.aclose()
                    return True
        return False

    def release(self, conn: Http2Upstream, stream_id: int) -> None:
        """A stream on ``conn`` is over (answered, reset, given up): a retired connection
        closes once its last stream is over, giving its place in the breaker back."""
        conn.pipe.forget(stream_id)
        if conn.idle() and connection_exhausted(conn.requests,
                                                self.cluster.max_requests_per_connection):
            conns = self.conns.get(conn.address, [])
            if conn in conns:
                conns.remove(conn)
            conn.close_soon()

    async def aclose(self) -> None:
        for conns in self.conns.values():
            for conn in conns:
                await conn.aclose()
        self.conns.clear()


class Http2Session:
    def __init__(self, proxy: WaypointProxy, down: Downstream, first: bytes) -> None:
        self.proxy = proxy
        self.down = down
        self.first = first
        self.pipe = H2Pipe(down.stream, client_side=False, on_request=self._request)

    async def run(self) -> None:
        try:
            await self.pipe.start(self.first)
            if not self.pipe.closed:
                await self.pipe.run()
            else:  # the first bytes alone broke the rules: send the GOAWAY
                await self.pipe.flush_final()
        finally:
            await self.pipe.aclose()
        self.down.stream.write_eof()

    def _tunnel_headers(self) -> list[tuple[str, str]]:
        return tunnel_headers(self.down)

    # -- one request stream --------------------------------------------------------------------
    async def _request(self, stream: H2Stream) -> None:
        started = time.monotonic()
        pseudo = {n: v for n, v in stream.headers if n.startswith(":")}
        regular = tuple((n, v) for n, v in stream.headers if not n.startswith(":"))
        method = pseudo.get(":method", "GET")
        path = pseudo.get(":path", "/")
        grpc = any(n == "content-type" and v.startswith("application/grpc") for n, v in regular)
        ex = Exchange(method, path, "grpc" if grpc else "http")
        metrics = self.proxy.metrics
        metrics.active_requests.inc()
        try:
            await self._handle(stream, pseudo, regular, grpc, ex)
        except asyncio.CancelledError:
            ex.flags, ex.reason = "DC", "client reset the stream"
            raise
        except StreamGone as exc:
            ex.flags, ex.reason = "DC", str(exc)
            self.pipe.reset_stream(stream.id, ErrorCodes.CANCEL)
        finally:
            metrics.active_requests.dec()
            self.pipe.forget(stream.id)
            record(self.proxy, self.down, ex, started)

    async def _reply(self, stream: H2Stream, reply: LocalReply, ex: Exchange, grpc: bool) -> None:
        ex.status, ex.flags, ex.reason = reply.status, reply.flags, reply.reason
        if grpc:  # trailers-only gRPC error, as Envoy's local replies to gRPC clients
            code = _GRPC_FOR_HTTP.get(reply.status, 2)
            ex.status, ex.grpc_status = 200, str(code)
            await self.pipe.send_headers(stream.id, [
                (":status", "200"), ("content-type", "application/grpc"),
                ("grpc-status", str(code)), ("grpc-message", reply.text)], end_stream=True)
            return
        body = f"{reply.text}\n".encode()
        await self.pipe.send_headers(stream.id, [
            (":status", str(reply.status)), ("content-type", "text/plain"),
            ("content-length", str(len(body))), *reply.headers])
        await self.pipe.send_data(stream.id, body, end_stream=True)

    async def _handle(self, stream: H2Stream, pseudo: dict[str, str],
                      regular: tuple[tuple[str, str], ...], grpc: bool, ex: Exchange) -> None:
        target = self.down.target
        headers, ex.traceparent = with_traceparent(regular)
        host = pseudo.get(":authority") or target.authority
        normalized = normalize_path_and_query(ex.path)
        if isinstance(normalized, TargetError):
            await self._reply(stream, LocalReply(400, "bad request path", "-",
                                                 normalized.reason), ex, grpc)
            return
        request = Request(ex.method, normalized, host_without_port(host), headers)
        plan = decide(self.proxy, self.down, request, ex)
        if isinstance(plan, LocalReply):
            await self._reply(stream, plan, ex, grpc)
            return
        cluster = plan.cluster
        if not cluster.breaker.try_acquire_request():
            self.proxy.metrics.overflows.labels(destination_service=cluster.hostname,
                                                limit="requests").inc()
            await self._reply(stream, LocalReply(503, "upstream overflow (circuit breaker)",
                                                 "UO", "circuit breaker: requests"), ex, grpc)
            return
        deadline = plan.request_timeout
        client_deadline = grpc_timeout(next((v for n, v in regular if n == "grpc-timeout"),
                                            None)) if grpc else None
        if client_deadline is not None:
            deadline = min(deadline, client_deadline) if deadline else client_deadline
        try:
            if deadline is None:
                await self._forward(stream, pseudo, plan, ex, grpc)
                return
            try:
                async with asyncio.timeout(deadline):
                    await self._forward(stream, pseudo, plan, ex, grpc)
            except TimeoutError:
                if ex.status:
                    ex.flags = "UT"
                    self.pipe.reset_stream(stream.id, ErrorCodes.CANCEL)
                    return
                await self._reply(stream, LocalReply(504, "upstream request timeout", "UT",
                                                     f"request timeout {deadline:g}s"), ex,
                                  grpc)
        except _Overflowed as exc:
            await self._reply(stream, exc.reply, ex, grpc)
        finally:
            cluster.breaker.release_request()

    async def _forward(self, stream: H2Stream, pseudo: dict[str, str], plan: Forward,
                       ex: Exchange, grpc: bool) -> None:
        pool = self.proxy.http2_pool(plan.cluster)
        request = plan.request
        out: Headers = [(":method", request.method), (":scheme", pseudo.get(":scheme", "http")),
                        (":authority", _authority(pseudo, request)),
                        (":path", request.path)]
        out += [_never_indexed(n, v) if n in _UNIQUE_PER_REQUEST else (n, v)
                for n, v in request.headers
                if n not in _CONNECTION_HEADERS or (n == "te" and v == "trailers")]
        body = _ReplayableBody(stream, self.proxy.settings.replay_buffer)
        per_try = plan.per_try_timeout
        # Body senders of this request's tries (per request: streams of one session run at once).
        senders: dict[int, asyncio.Task[None] | None] = {}

        async def try_once(endpoint: Endpoint) -> tuple[Http2Upstream, H2Stream] | Outcome:
            try:
                conn = await pool.acquire(endpoint, self._tunnel_headers)
            except Overflow as exc:
                self.proxy.metrics.overflows.labels(destination_service=plan.cluster.hostname,
                                                    limit="connections").inc()
                raise _Overflowed(LocalReply(503, "upstream overflow (circuit breaker)", "UO",
                                             str(exc))) from None
            except (NodeproxyError, OSError) as exc:
                ex.reason = str(exc)
                return Outcome("connect_failure")
            up = conn.open_stream()
            sender: asyncio.Task[None] | None = None
            try:
                if per_try is None:
                    await self._start(conn, up, out, body)
                    sender = self._sender(conn, up, body, ex)
                    await up.headers_ready
                else:
                    async with asyncio.timeout(per_try):
                        await self._start(conn, up, out, body)
                        sender = self._sender(conn, up, body, ex)
                        await up.headers_ready
            except TimeoutError:
                ex.reason = f"per-try timeout {per_try:g}s"
                _cancel(pool, conn, up, sender)
                return Outcome("per_try_timeout")
            except StreamGone as exc:
                ex.reason = str(exc)
                _cancel(pool, conn, up, sender)
                return Outcome("refused_stream" if exc.code == ErrorCodes.REFUSED_STREAM
                               else "reset")
            except BaseException:
                _cancel(pool, conn, up, sender)
                raise
            senders[up.id] = sender
            return conn, up

        done = await run_tries(
            self.proxy, plan, ex, replayable=lambda: not body.overflowed, try_once=try_once,
            status_of=lambda r: (_status(r[1].headers), _grpc(r[1].headers)),
            discard=lambda r: _cancel(pool, r[0], r[1], senders.pop(r[1].id, None)))
        self._mirrors(plan, out, body)
        if not isinstance(done, Answered):
            await self._reply(stream, done.reply, ex, grpc)
            return
        conn, up = done.response
        sender = senders.pop(up.id, None)
        try:
            await self._respond(stream, conn, up, plan, ex)
        finally:
            plan.cluster.finished(done.endpoint.address)
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            pool.release(conn, up.id)

    def _mirrors(self, plan: Forward, out: Headers, body: _ReplayableBody) -> None:
        """Shadow copies for RequestMirror filters: only of a body already complete within
        the replay buffer (a stream still open, or larger, cannot be copied)."""
        for cluster in mirror_clusters(self.proxy, self.down, plan):
            if not body.done or body.overflowed:
                self.proxy.metrics.mirrors.labels(result="not_replayable").inc()
                continue
            headers = [(n, shadow_host(v) if n == ":authority" else v) for n, v in out]
            payload = b"".join(body.kept)
            pool = self.proxy.http2_pool(cluster)

            async def send(endpoint: Endpoint, headers: Headers = headers,
                           payload: bytes = payload, pool: Http2Pool = pool) -> None:
                conn = await pool.acquire(endpoint, self._tunnel_headers)
                up = conn.open_stream()
                try:
                    await conn.pipe.send_headers(up.id, headers, end_stream=not payload)
                    if payload:
                        await conn.pipe.send_data(up.id, payload, end_stream=True)
                    await up.headers_ready
                    while await up.read():  # drop the response
                        pass
                finally:
                    pool.release(conn, up.id)

            spawn_mirror(self.proxy, cluster, send)

    @staticmethod
    async def _start(conn: Http2Upstream, up: H2Stream, out: Headers,
                     body: _ReplayableBody) -> None:
        await conn.pipe.send_headers(up.id, out, end_stream=body.empty)

    def _sender(self, conn: Http2Upstream, up: H2Stream, body: _ReplayableBody,
                ex: Exchange) -> asyncio.Task[None] | None:
        """The task streaming the request body; None for a bodyless request (its HEADERS
        carried END_STREAM), which is most of them: no task per request for nothing."""
        if body.empty:
            return None
        return asyncio.get_running_loop().create_task(self._pump_body(conn, up, body, ex))

    async def _pump_body(self, conn: Http2Upstream, up: H2Stream, body: _ReplayableBody,
                         ex: Exchange) -> None:
        if body.empty:
            return
        try:
            async for piece in body.pieces():
                ex.request_bytes = max(ex.request_bytes, body.sent_total)
                await conn.pipe.send_data(up.id, piece)
            if body.trailers:
                await conn.pipe.end_stream(up.id, body.trailers)
            else:
                await conn.pipe.end_stream(up.id)
            ex.request_bytes = body.total
        except StreamGone:
            return

    async def _respond(self, stream: H2Stream, conn: Http2Upstream, up: H2Stream,
                       plan: Forward, ex: Exchange) -> None:
        status = _status(up.headers)
        ex.status = status
        grpc = _grpc(up.headers)
        ex.grpc_status = str(grpc) if grpc is not None else ""
        headers = [(n, v) for n, v in up.headers
                   if not n.startswith(":") and n not in _CONNECTION_HEADERS]
        if plan.rule is not None:
            headers = list(response_headers(plan.rule, tuple(headers)))
        try:
            if up.ended and up.reset_code is None:
                # The whole response is here (the common case for small ones): headers, body
                # and trailers in one flush rather than one per frame.
                body = b"".join(up.take_buffered())
                if body:
                    await conn.pipe.acknowledge(up.id, len(body))
                ex.response_bytes += len(body)
                trailers = list(up.trailers)
                trailer_grpc = _grpc(trailers)
                if trailer_grpc is not None:
                    ex.grpc_status = str(trailer_grpc)
                if self.pipe.queue_response(stream.id, [(":status", str(status)), *headers],
                                            body, trailers):
                    await self.pipe.flush()
                    return
                await self.pipe.send_headers(stream.id, [(":status", str(status)), *headers])
                await self.pipe.send_data(stream.id, body)
                await self.pipe.end_stream(stream.id, trailers or None)
                return
            await self.pipe.send_headers(stream.id, [(":status", str(status)), *headers])
            while True:
                data = await up.read()
                if not data:
                    break
                ex.response_bytes += len(data)
                await self.pipe.send_data(stream.id, data)
            if up.trailers:
                trailer_grpc = _grpc(up.trailers)
                if trailer_grpc is not None:
                    ex.grpc_status = str(trailer_grpc)
                await self.pipe.end_stream(stream.id, list(up.trailers))
            else:
                await self.pipe.end_stream(stream.id)
        except StreamGone as exc:
            ex.flags = "UR" if up.reset_code is not None else "DC"
            ex.reason = str(exc)
            if up.reset_code is not None:
                self.pipe.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)
            else:
                conn.pipe.reset_stream(up.id, ErrorCodes.CANCEL)


class _Overflowed(Exception):
    """A circuit breaker refused the request mid-way (no connection): answer ``reply``."""

    def __init__(self, reply: LocalReply) -> None:
        super().__init__(reply.reason)
        self.reply = reply


class _ReplayableBody:
    """A request body read from the client once, replayable from the start while it fits
    ``limit``: every try iterates :meth:`pieces` from the beginning."""

    def __init__(self, stream: H2Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.kept: list[bytes] = []
        self.total = 0
        self.sent_total = 0
        self.overflowed = False
        self.done = stream.ended and not stream._data
        self.trailers: Headers = []
        self._read_lock = asyncio.Lock()

    @property
    def empty(self) -> bool:
        return self.done and not self.kept

    async def pieces(self) -> AsyncIterator[bytes]:
        """Kept pieces first, then new ones from the client (kept while they fit)."""
        if self.overflowed:
            raise StreamGone("request body already streamed past the replay buffer")
        index = 0
        self.sent_total = 0
        while True:
            if index < len(self.kept):
                piece = self.kept[index]
                index += 1
                self.sent_total += len(piece)
                yield piece
                continue
            if self.done:
                return
            async with self._read_lock:
                if index < len(self.kept) or self.done:
                    continue
                piece = await self.stream.read()
                if not piece:
                    self.done = True
                    self.trailers = list(self.stream.trailers)
                    return
                self.total += len(piece)
                if self.total <= self.limit:
                    self.kept.append(piece)
                    index += 1
                else:
                    self.overflowed = True
            self.sent_total += len(piece)
            yield piece


def _cancel(pool: Http2Pool, conn: Http2Upstream, up: H2Stream,
            sender: asyncio.Task[None] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()
    conn.pipe.reset_stream(up.id, ErrorCodes.CANCEL)
    pool.release(conn, up.id)


def _status(headers: Headers) -> int:
    for name, value in headers:
        if name == ":status":
            try:
                return int(value)
            except ValueError:
                return 502
    return 502


def _grpc(headers: Headers) -> int | None:
    for name, value in headers:
        if name == "grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None



def _never_indexed(name: str, value: str) -> tuple[str, str]:
    """A header h2 sends as an HPACK literal never indexed (a tuple to everyone else)."""
    return cast("tuple[str, str]", NeverIndexedHeaderTuple(name, value))


def _authority(pseudo: dict[str, str], request: Request) -> str:
    """The client's :authority, unless a URLRewrite changed the host."""
    original = pseudo.get(":authority", "")
    if original and host_without_port(original) == request.host:
        return original
    return request.host
