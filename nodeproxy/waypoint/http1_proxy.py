"""HTTP/1.1 through the waypoint: requests of one downstream connection answered in order,
each decided and retried by :mod:`nodeproxy.waypoint.exchange`, bodies streamed both ways
with the tunnels' flow control as backpressure.  A request body is held only when it fits
the replay buffer, which is what makes a retry possible.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from nodeproxy.hbone.glue import StreamResetError
from nodeproxy.relay import relay
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
from nodeproxy.waypoint.http1 import (
    BodyData,
    BodyKind,
    Event,
    Framing,
    Http1Error,
    MessageEnd,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    Upgraded,
    encode_body,
    encode_end,
    encode_request_head,
    encode_response_head,
    strip_hop_by_hop,
)
from nodeproxy.waypoint.proxy import Downstream, WaypointProxy, tunnel_headers
from nodeproxy.waypoint.retry import Outcome
from nodeproxy.waypoint.upstream import Endpoint
from nodeproxy.waypoint.upstream_http1 import Http1Connection, Http1Pool, Overflow
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import host_without_port
from ztunnel_cfg.l7 import Request, response_headers
from ztunnel_cfg.l7.request import TargetError, normalize_target

REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other",
           307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
           413: "Payload Too Large",
           414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout",
           505: "HTTP Version Not Supported"}
_INLINE_BODY = 65536  # bodies up to this size go out in one write with the head


class _ClientGone(Exception):
    """The downstream ended (EOF mid-request or reset): nothing more can be answered."""


class _Overflowed(Exception):
    def __init__(self, reply: LocalReply) -> None:
        super().__init__(reply.reason)
        self.reply = reply


class Http1Session:
    def __init__(self, proxy: WaypointProxy, down: Downstream, first: bytes) -> None:
        self.proxy = proxy
        self.down = down
        self.reader = RequestReader(proxy.settings.http1)
        self.events: deque[Event] = deque(self.reader.feed(first))
        self.metrics = proxy.metrics
        # Bytes of a first request head already arrived with the protocol sniff.
        self._head_started = bool(first) and not self.events

    def _tunnel_headers(self) -> list[tuple[str, str]]:
        # Called only when a pooled connection is opened (fresh traceparent), not per request.
        return tunnel_headers(self.down)

    # -- downstream bytes ---------------------------------------------------------------------
    async def _next(self) -> Event | None:
        while not self.events:
            if self.reader.stopped:
                return None
            data = await self.down.stream.read()
            self.events.extend(self.reader.feed(data) if data else self.reader.feed_eof())
        return self.events.popleft()

    async def _send(self, data: bytes) -> None:
        if data:
            await self.down.stream.write(data)

    async def _next_head(self) -> Event | None:
        """The next request's first event, bounded: ``idle_timeout`` until its first byte,
        then ``request_header_timeout`` for the rest of its head."""
        settings = self.proxy.settings
        loop = asyncio.get_running_loop()
        started = self._head_started
        deadline = loop.time() + (settings.request_header_timeout if started
                                  else settings.idle_timeout)
        while not self.events:
            if self.reader.stopped:
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                data = await self.down.stream.read()
            if data and not started:
                started = self._head_started = True
                deadline = loop.time() + settings.request_header_timeout
            self.events.extend(self.reader.feed(data) if data else self.reader.feed_eof())
        self._head_started = False  # the next head's clock starts when its first byte comes
        return self.events.popleft()

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_head()
            except TimeoutError:
                if self._head_started:  # slowloris: a head that never completes
                    self.metrics.rejected.labels(reason="request_header_timeout").inc()
                    await self._local_reply(LocalReply(408, "request header timeout"), None,
                                            close=True)
                self.down.stream.write_eof()  # else an idle keep-alive connection: just close
                return
            if event is None:
                self.down.stream.write_eof()
                return
            if isinstance(event, ProtocolError):
                await self._local_reply(LocalReply(event.status, event.reason), None,
                                        close=True)
                return
            if isinstance(event, MessageEnd):
                # The end of a bodyless request that was answered from its head alone (a
                # body, when there is one, is read to its end or the connection closes).
                continue
            if not isinstance(event, RequestHead):  # cannot happen: the reader orders events
                return
            if not await self._exchange(event):
                self.down.stream.write_eof()
                return
            self.reader.response_sent()

    async def _local_reply(self, reply: LocalReply, head: RequestHead | None, *,
                           close: bool) -> None:
        body = f"{reply.text}\n".encode()
        method = head.method if head is not None else "GET"
        version = head.version if head is not None else "1.1"
        await self._send(encode_response_head(
            reply.status, REASONS.get(reply.status, "Unknown"),
            (("content-type", "text/plain"), *reply.headers), BodyKind.of_length(len(body)),
            request_method=method, request_version=version, keep_alive=not close)
            + (b"" if method == "HEAD" else body))

    # -- one request --------------------------------------------------------------------------
    async def _exchange(self, head: RequestHead) -> bool:
        """Answer one request; returns whether the connection stays open."""
        started = time.monotonic()
        grpc = any(n.lower() == "content-type" and v.startswith("application/grpc")
                   for n, v in head.headers)
        ex = Exchange(head.method, head.target, "grpc" if grpc else "http")
        self.metrics.active_requests.inc()
        try:
            return await self._handle(head, ex)
        except _ClientGone as exc:
            ex.flags, ex.reason = "DC", str(exc) or "downstream went away"
            return False
        finally:
            self.metrics.active_requests.dec()
            record(self.proxy, self.down, ex, started)

    async def _reply(self, reply: LocalReply, head: RequestHead, ex: Exchange, *,
                     close: bool = False) -> bool:
        ex.status, ex.flags, ex.reason = reply.status, reply.flags, reply.reason
        # An unread request body cannot be skipped safely: close after answering.
        close = close or not head.body.empty or not head.keep_alive
        await self._local_reply(reply, head, close=close)
        return not close

    async def _handle(self, head: RequestHead, ex: Exchange) -> bool:
        target = self.down.target
        headers, ex.traceparent = with_traceparent(
            tuple((n.lower(), v) for n, v in head.headers))
        normalized = normalize_target(head.target)
        if isinstance(normalized, TargetError):
            return await self._reply(LocalReply(400, "bad request target", "-",
                                                normalized.reason), head, ex, close=True)
        path, url_host = normalized
        # An absolute-form target's host wins over the Host header (RFC 9112 section 3.2.2).
        host = url_host or next((v for n, v in headers if n == "host"), target.authority)
        request = Request(head.method, path, host_without_port(host), headers)
        plan = decide(self.proxy, self.down, request, ex)
        if isinstance(plan, LocalReply):
            return await self._reply(plan, head, ex)
        cluster = plan.cluster
        if not cluster.breaker.try_acquire_request():
            self.metrics.overflows.labels(destination_service=cluster.hostname,
                                          limit="requests").inc()
            return await self._reply(LocalReply(503, "upstream overflow (circuit breaker)",
                                                "UO", "circuit breaker: requests "
                                                "(http2MaxRequests)"), head, ex)
        try:
            if plan.request_timeout is None:
                return await self._forward(head, plan, ex)
            try:
                async with asyncio.timeout(plan.request_timeout):
                    return await self._forward(head, plan, ex)
            except TimeoutError:
                if ex.status:  # the response had started: all we can do is cut it
                    ex.flags = "UT"
                    raise _ClientGone("route timeout during the response") from None
                return await self._reply(LocalReply(
                    504, "upstream request timeout", "UT",
                    f"route timeout {plan.request_timeout:g}s"), head, ex, close=True)
        except _Overflowed as exc:
            return await self._reply(exc.reply, head, ex, close=True)
        finally:
            cluster.breaker.release_request()

    async def _read_body(self, head: RequestHead) -> tuple[bytes | None, bool]:
        """The whole body if it fits the replay buffer (replayable), else None: stream it."""
        if head.body.framing is Framing.NONE:
            return b"", True
        if head.body.framing is not Framing.LENGTH or \
                head.body.length > self.proxy.settings.replay_buffer:
            return None, False  # unknown or large: stream it, no retry
        if head.expect_continue:
            # We read the body before choosing where it goes: ask for it ourselves.
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        parts: list[bytes] = []
        while True:
            event = await self._next()
            if event is None or isinstance(event, ProtocolError):
                raise _ClientGone("client went away in the middle of the request body")
            if isinstance(event, BodyData):
                parts.append(event.data)
            elif isinstance(event, MessageEnd):
                return b"".join(parts), True

    async def _forward(self, head: RequestHead, plan: Forward, ex: Exchange) -> bool:
        pool = self.proxy.http1_pool(plan.cluster)
        body, replayable = await self._read_body(head)
        request = plan.request
        # Expect: 100-continue is answered by the waypoint (Envoy's default): for a body it
        # holds, before reading it; for a streamed one, before streaming it.
        headers = tuple((n, v) for n, v in strip_hop_by_hop(request.headers) if n != "expect")
        if body is not None:
            ex.request_bytes = len(body)
            kind = BodyKind.of_length(len(body)) if head.body.framing is not Framing.NONE \
                else BodyKind.NONE
        else:
            kind = head.body
        upgrade = _upgrade_token(head)
        out_head = encode_request_head(request.method, request.path, headers, kind,
                                       upgrade=upgrade)
        per_try = plan.per_try_timeout
        for mirror in mirror_clusters(self.proxy, self.down, plan):
            if body is None or upgrade is not None:  # a streamed body cannot be copied
                self.metrics.mirrors.labels(result="not_replayable").inc()
                continue
            shadow = tuple((n, shadow_host(v) if n == "host" else v) for n, v in headers)
            self._mirror(mirror, encode_request_head(request.method, request.path, shadow,
                                                     kind) + body, request.method)

        async def try_once(endpoint: Endpoint) -> tuple[Http1Connection, ResponseHead] | Outcome:
            try:
                conn = await pool.acquire(endpoint, self._tunnel_headers)
            except Overflow as exc:
                self.metrics.overflows.labels(destination_service=plan.cluster.hostname,
                                              limit=exc.limit).inc()
                raise _Overflowed(LocalReply(503, "upstream overflow (circuit breaker)", "UO",
                                             f"circuit breaker: {exc.limit}")) from None
            except (NodeproxyError, OSError) as exc:
                ex.reason = str(exc)
                return Outcome("connect_failure")
            result = await self._try(conn, out_head, body, head, per_try, ex)
            if isinstance(result, Outcome):
                pool.release(conn, reuse=False)
                return result
            return conn, result

        done = await run_tries(self.proxy, plan, ex, replayable=lambda: replayable,
                               try_once=try_once,
                               status_of=lambda r: (r[1].status, _grpc_status(r[1].headers)),
                               discard=lambda r: pool.release(r[0], reuse=False))
        if not isinstance(done, Answered):
            return await self._reply(done.reply, head, ex, close=True)
        conn, resp = done.response
        try:
            return await self._respond(resp, conn, pool, head, plan, ex, upgrade is not None)
        finally:
            plan.cluster.finished(done.endpoint.address)

    def _mirror(self, cluster: Cluster, message: bytes, method: str) -> None:
        pool = self.proxy.http1_pool(cluster)

        async def send(endpoint: Endpoint) -> None:
            conn = await pool.acquire(endpoint, self._tunnel_headers)
            reuse = False
            try:
                conn.reader.expect_response(method)
                await conn.write(message)
                while True:  # read the whole response, then drop it
                    event = await conn.next_event()
                    if event is None or isinstance(event, ProtocolError):
                        return
                    if isinstance(event, MessageEnd):
                        reuse = True
                        return
            finally:
                pool.release(conn, reuse=reuse)

        spawn_mirror(self.proxy, cluster, send)

    async def _try(self, conn: Http1Connection, out_head: bytes, body: bytes | None,
                   head: RequestHead, per_try: float | None,
                   ex: Exchange) -> ResponseHead | Outcome:
        """Send the request on ``conn`` and read the response head."""
        try:
            if per_try is None:
                return await self._send_and_head(conn, out_head, body, head, ex)
            async with asyncio.timeout(per_try):
                return await self._send_and_head(conn, out_head, body, head, ex)
        except TimeoutError:
            ex.reason = f"per-try timeout {per_try:g}s"
            return Outcome("per_try_timeout")
        except (StreamResetError, NodeproxyError, OSError) as exc:
            ex.reason = str(exc)
            return Outcome("reset")

    async def _send_and_head(self, conn: Http1Connection, out_head: bytes, body: bytes | None,
                             head: RequestHead, ex: Exchange) -> ResponseHead | Outcome:
        conn.reader.expect_response(head.method)
        if body is None:
            await conn.write(out_head)
            await self._stream_request_body(conn, head, ex)
        elif len(body) <= _INLINE_BODY:
            await conn.write(out_head + body)
        else:
            await conn.write(out_head)
            await conn.write(body)
        while True:
            event = await conn.next_event()
            if event is None:
                return Outcome("reset")
            if isinstance(event, ProtocolError):
                ex.reason = f"upstream: {event.reason}"
                return Outcome("reset")
            if isinstance(event, ResponseHead):
                if 100 <= event.status < 200 and event.status != 101:
                    continue  # interim responses are not forwarded
                return event

    async def _stream_request_body(self, conn: Http1Connection, head: RequestHead,
                                   ex: Exchange) -> None:
        chunked = head.body.framing is Framing.CHUNKED
        if head.upgrade:
            return  # the bytes after an upgrade head travel only once the upstream agreed
        if head.expect_continue:
            # The client waits for this before sending its body (its Expect was not sent on).
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            event = await self._next()
            if event is None or isinstance(event, ProtocolError):
                raise _ClientGone("client went away in the middle of the request body")
            if isinstance(event, BodyData):
                ex.request_bytes += len(event.data)
                await conn.write(encode_body(event.data, chunked))
            elif isinstance(event, MessageEnd):
                await conn.write(encode_end(chunked, event.trailers))
                return

    async def _respond(self, resp: ResponseHead, conn: Http1Connection, pool: Http1Pool,
                       head: RequestHead, plan: Forward, ex: Exchange, upgrading: bool) -> bool:
        """Stream the response to the client; returns whether the downstream stays open."""
        ex.status = resp.status
        grpc = _grpc_status(resp.headers)
        ex.grpc_status = str(grpc) if grpc is not None else ""
        reuse = False
        try:
            headers = strip_hop_by_hop(tuple((n.lower(), v) for n, v in resp.headers))
            if plan.rule is not None:
                headers = response_headers(plan.rule, headers)
            if upgrading and resp.status == 101:
                await self._send(encode_response_head(
                    101, resp.reason or "Switching Protocols", headers, BodyKind.NONE,
                    upgrade=_upgrade_token(head) or "websocket"))
                await self._splice(conn)
                return False
            keep = head.keep_alive and not upgrading
            out_kind = resp.body
            if resp.body.framing is Framing.UNTIL_CLOSE and head.version == "1.1":
                out_kind = BodyKind.CHUNKED
            chunked_out = out_kind.framing is Framing.CHUNKED
            # What already arrived of the response goes out in one write with its head: a
            # small response costs one HBONE DATA frame, TLS record and send, not one per
            # piece (HboneProtocol.flush was 26% of the waypoint's samples, issue 14).
            out = bytearray(encode_response_head(
                resp.status, resp.reason or REASONS.get(resp.status, ""), headers, out_kind,
                request_method=head.method, request_version=head.version, keep_alive=keep))
            keep = keep and out_kind.framing is not Framing.UNTIL_CLOSE
            if head.method == "HEAD" or resp.status in (204, 304) or \
                    resp.body.framing is Framing.NONE:
                await self._send(bytes(out))
                reuse = True
                return keep
            while True:
                event = conn.buffered_event()
                if event is None:
                    if out:
                        await self._send(bytes(out))
                        out.clear()
                    event = await conn.next_event()
                if event is None or isinstance(event, ProtocolError):
                    if out:
                        await self._send(bytes(out))
                    raise _ClientGone("upstream failed in the middle of the response")
                if isinstance(event, BodyData):
                    ex.response_bytes += len(event.data)
                    out += encode_body(event.data, chunked_out)
                    if len(out) >= _INLINE_BODY:
                        await self._send(bytes(out))
                        out.clear()
                elif isinstance(event, MessageEnd):
                    out += encode_end(chunked_out, event.trailers)
                    await self._send(bytes(out))
                    trailer_grpc = _grpc_status(event.trailers)
                    if trailer_grpc is not None:
                        ex.grpc_status = str(trailer_grpc)
                    reuse = True
                    return keep
        except (StreamResetError, Http1Error) as exc:
            raise _ClientGone(str(exc)) from exc
        finally:
            pool.release(conn, reuse=reuse)

    async def _splice(self, conn: Http1Connection) -> None:
        """After 101: raw bytes both ways (the bytes after the request head go first)."""
        rest = b""
        while self.events:
            event = self.events.popleft()
            if isinstance(event, Upgraded):
                rest = event.rest
        if rest:
            await conn.write(rest)
        await relay(self.down.stream, conn.tunnel.stream,
                    idle_timeout=self.proxy.settings.idle_timeout)


def _grpc_status(headers: tuple[tuple[str, str], ...]) -> int | None:
    for name, value in headers:
        if name.lower() == "grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _upgrade_token(head: RequestHead) -> str | None:
    if not head.upgrade or head.method == "CONNECT":
        return None
    for name, value in head.headers:
        if name.lower() == "upgrade":
            return value
    return None

