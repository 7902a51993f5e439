"""HTTP/1.1 through the waypoint: per request, L7 policy, route, backend, retries, timeouts,
circuit breaking and outlier detection, then the response streamed back.

Requests on one downstream connection are answered in order (HTTP/1.1 has no other way).
Bodies stream both ways with the tunnels' flow control as backpressure; a request body is
held only when it is small enough to be replayed (``replay_buffer``), which is what makes a
retry possible.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from nodeproxy.errors import ProxyError
from nodeproxy.hbone.glue import StreamResetError
from nodeproxy.relay import relay
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
from nodeproxy.waypoint.proxy import Downstream, WaypointProxy, _tunnel_headers
from nodeproxy.waypoint.retry import Outcome, RetryPolicy, backoff, should_retry
from nodeproxy.waypoint.telemetry import RequestRecord
from nodeproxy.waypoint.upstream_http1 import Http1Connection, Http1Pool, Overflow
from ztunnel_cfg.authz import RequestInfo, authorize_request
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.l7 import (
    Request,
    choose_backend,
    redirect_location,
    response_headers,
    retry_policy,
    rewrite_request,
    select_route,
    timeouts,
)
from ztunnel_cfg.l7 import RetryPolicy as ConfigRetry
from ztunnel_cfg.model import BackendRef, RouteRule, Workload

log = logging.getLogger("nodeproxy.waypoint")
_EXTRA = {"component": "waypoint"}

REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other",
           307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 413: "Payload Too Large",
           414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout",
           505: "HTTP Version Not Supported"}


def to_runtime_retry(policy: ConfigRetry) -> RetryPolicy:
    return RetryPolicy(attempts=policy.attempts, retry_on=policy.retry_on, codes=policy.codes,
                       backoff_base=policy.backoff_base, backoff_max=policy.backoff_max,
                       per_try_timeout=policy.per_try_timeout)


class _ClientGone(Exception):
    """The downstream ended (EOF mid-request or reset): nothing more can be answered."""


@dataclass(slots=True)
class _Exchange:
    """What one request accumulated, for the access log and metrics."""

    head: RequestHead
    route: str = "-"
    flags: str = "-"
    status: int = 0
    grpc_status: str = ""
    upstream: str = ""
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    destination: Workload | None = None  # the endpoint's workload that answered
    reason: str = ""
    traceparent: str = ""


class Http1Session:
    def __init__(self, proxy: WaypointProxy, down: Downstream, first: bytes) -> None:
        self.proxy = proxy
        self.down = down
        self.reader = RequestReader(proxy.settings.http1)
        self.events: deque[Event] = deque(self.reader.feed(first))
        self.metrics = proxy.metrics

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

    async def run(self) -> None:
        while True:
            event = await self._next()
            if event is None:
                self.down.stream.write_eof()
                return
            if isinstance(event, ProtocolError):
                await self._local_reply(event.status, event.reason, close=True)
                return
            if not isinstance(event, RequestHead):  # cannot happen: the reader orders events
                return
            keep = await self._exchange(event)
            if not keep:
                self.down.stream.write_eof()
                return
            self.reader.response_sent()

    async def _local_reply(self, status: int, text: str, *, close: bool,
                           head: RequestHead | None = None,
                           extra: tuple[tuple[str, str], ...] = ()) -> None:
        body = f"{text}\n".encode()
        method = head.method if head is not None else "GET"
        version = head.version if head is not None else "1.1"
        await self._send(encode_response_head(
            status, REASONS.get(status, "Unknown"),
            (("content-type", "text/plain"), *extra), BodyKind.of_length(len(body)),
            request_method=method, request_version=version, keep_alive=not close)
            + (b"" if method == "HEAD" else body))

    # -- one request --------------------------------------------------------------------------
    async def _exchange(self, head: RequestHead) -> bool:
        """Answer one request; returns whether the connection stays open."""
        started = time.monotonic()
        ex = _Exchange(head)
        metrics = self.metrics
        metrics.active_requests.inc()
        keep = False
        try:
            keep = await self._route_and_forward(head, ex)
        except _ClientGone as exc:
            ex.flags, ex.reason = "DC", str(exc) or "downstream went away"
            ex.status = ex.status or 0
        finally:
            metrics.active_requests.dec()
            self._record(ex, started)
        return keep

    async def _route_and_forward(self, head: RequestHead, ex: _Exchange) -> bool:
        down = self.down
        target = down.target
        snapshot = down.snapshot
        lower = tuple((n.lower(), v) for n, v in head.headers)
        host_header = next((v for n, v in lower if n == "host"), target.authority)
        host = _strip_port(host_header)
        trace = next((v for n, v in lower if n == "traceparent"), "")
        if not trace:
            trace = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
            lower = (*lower, ("traceparent", trace))
        ex.traceparent = trace
        request = Request(head.method, head.target, host, lower)
        has_body = head.body.framing is not Framing.NONE

        # L7 authorization first: nothing of a denied request reaches routing.
        ip = target.authority.rpartition(":")[0].strip("[]")
        decision = authorize_request(snapshot, down.waypoint, target.service, RequestInfo(
            down.peer, down.peer_ip, ip, target.port, head.method,
            request.path_only, host, lower))
        if not decision.allowed:
            ex.status, ex.flags, ex.reason = 403, "DENY", decision.reason
            await self._local_reply(403, "RBAC: access denied", close=has_body, head=head)
            return not has_body and head.keep_alive

        rule: RouteRule | None = None
        prefix: str | None = None
        if target.service is not None:
            selection = select_route(snapshot, target.service, target.port, request)
            if selection.rule is None:
                ex.status, ex.flags, ex.reason = 404, "NR", selection.reason
                await self._local_reply(404, "no route matched", close=has_body, head=head)
                return not has_body and head.keep_alive
            rule, prefix = selection.rule, selection.matched_prefix
            ex.route = selection.route.key if selection.route is not None else "default"
            redirect = redirect_location(rule, request, prefix, port=target.port)
            if redirect is not None:
                ex.status, ex.reason = redirect.status_code, f"redirect to {redirect.location}"
                await self._local_reply(redirect.status_code, redirect.location,
                                        close=has_body, head=head,
                                        extra=(("location", redirect.location),))
                return not has_body and head.keep_alive
            request = rewrite_request(rule, request, prefix)
            index = choose_backend(rule, self.proxy.rng.random())
            if index is None:
                ex.status, ex.flags = 500, "-"
                ex.reason = f"every backend of route {ex.route} has weight 0"
                await self._local_reply(500, "no backend has weight", close=has_body, head=head)
                return not has_body and head.keep_alive
            backend: BackendRef | None = rule.backend_refs[index]
        else:
            backend = None
        cluster, pool = self.proxy.cluster_for_target(snapshot, target, backend)
        policy = to_runtime_retry(retry_policy(rule))
        request_timeout, per_try = timeouts(rule)
        if not cluster.breaker.try_acquire_request():
            self._overflow(ex, cluster.key.service, "requests (http2MaxRequests)")
            await self._local_reply(503, "upstream overflow (circuit breaker)", close=has_body,
                                    head=head)
            return not has_body and head.keep_alive
        try:
            if request_timeout is None:
                return await self._forward(head, request, rule, cluster, pool, policy, per_try,
                                           ex)
            try:
                async with asyncio.timeout(request_timeout):
                    return await self._forward(head, request, rule, cluster, pool, policy,
                                               per_try, ex, deadline=True)
            except TimeoutError:
                ex.flags = "UT"
                ex.reason = f"route timeout {request_timeout:g}s"
                if ex.status:  # the response had started: all we can do is cut it
                    raise _ClientGone("route timeout during the response") from None
                ex.status = 504
                await self._local_reply(504, "upstream request timeout", close=True, head=head)
                return False
        finally:
            cluster.breaker.release_request()

    def _overflow(self, ex: _Exchange, service: str, limit: str) -> None:
        ex.status, ex.flags, ex.reason = 503, "UO", f"circuit breaker: {limit}"
        self.metrics.overflows.labels(destination_service=service, limit=limit).inc()

    async def _read_body(self, head: RequestHead) -> tuple[bytes | None, bool]:
        """The whole body if it fits the replay buffer (replayable), else None: stream it."""
        if head.body.framing is Framing.NONE:
            return b"", True
        limit = self.proxy.settings.replay_buffer
        if head.body.framing is Framing.LENGTH and head.body.length > limit:
            return None, False
        if head.body.framing is Framing.CHUNKED:
            return None, False  # unknown size: stream it (Envoy buffers up to its limit)
        parts: list[bytes] = []
        while True:
            event = await self._next()
            if event is None or isinstance(event, ProtocolError):
                raise _ClientGone("client went away in the middle of the request body")
            if isinstance(event, BodyData):
                parts.append(event.data)
            elif isinstance(event, MessageEnd):
                return b"".join(parts), True

    async def _forward(self, head: RequestHead, request: Request, rule: RouteRule | None,
                       cluster: object, pool: Http1Pool, policy: RetryPolicy,
                       per_try: float | None, ex: _Exchange, *, deadline: bool = False) -> bool:
        from nodeproxy.waypoint.cluster import Cluster

        assert isinstance(cluster, Cluster)
        if head.expect_continue and head.body.framing is Framing.LENGTH \
                and head.body.length <= self.proxy.settings.replay_buffer:
            # We read the body before choosing where it goes: ask for it ourselves.
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, replayable = await self._read_body(head)
        if body is not None:
            ex.request_bytes = len(body)
        headers = strip_hop_by_hop(request.headers)
        if body is not None:
            headers = tuple((n, v) for n, v in headers if n != "expect")
        upgrade = _upgrade_token(head)
        body_kind = head.body if body is None else (
            BodyKind.of_length(len(body)) if body or head.body.framing is not Framing.NONE
            else BodyKind.NONE)
        out_head = encode_request_head(request.method, request.path, headers, body_kind,
                                       upgrade=upgrade)
        tried: set[str] = set()
        retries = 0
        retry_held = False
        service = cluster.key.service
        try:
            while True:
                endpoint = cluster.pick(tried)
                if endpoint is None:
                    ex.status, ex.flags = 503, "UH"
                    ex.reason = f"no healthy endpoint in {cluster.key}"
                    await self._local_reply(503, "no healthy upstream", close=True, head=head)
                    return False
                tried.add(endpoint.address)
                ex.attempts += 1
                ex.upstream = endpoint.address
                ex.destination = endpoint.workload
                cluster.started(endpoint.address)
                conn: Http1Connection | None = None
                outcome: Outcome
                try:
                    try:
                        conn = await pool.acquire(endpoint, _tunnel_headers(self.down))
                    except Overflow as exc:
                        self._overflow(ex, service, exc.limit)
                        await self._local_reply(503, "upstream overflow (circuit breaker)",
                                                close=True, head=head)
                        return False
                    except (NodeproxyError, OSError) as exc:
                        outcome, ex.reason = Outcome("connect_failure"), str(exc)
                        cluster.record(endpoint.address, "connect_failure")
                    else:
                        result = await self._try(conn, out_head, body, head, per_try, ex)
                        if isinstance(result, ResponseHead):
                            grpc = _grpc_status(result.headers)
                            outcome = Outcome.response(result.status, grpc)
                        else:
                            outcome = result
                        if not isinstance(result, ResponseHead) or (
                                result.status >= 500 and _would_retry(
                                    policy, outcome, retries, replayable, cluster)):
                            # A failed try, or a 5xx we will retry: this connection is done.
                            failure = result.status if isinstance(result, ResponseHead) \
                                else outcome.kind
                            self._eject_note(cluster, endpoint.address, failure, service)
                            pool.release(conn, reuse=False)
                            conn = None
                        else:
                            self._eject_note(cluster, endpoint.address, result.status, service)
                            owned, conn = conn, None
                            return await self._respond(result, owned, pool, head, rule, ex,
                                                       upgrade is not None)
                finally:
                    cluster.finished(endpoint.address)
                    if conn is not None:
                        pool.release(conn, reuse=False)
                if retry_held:
                    cluster.breaker.release_retry()
                    retry_held = False
                budget = cluster.breaker.try_acquire_retry()
                decision = should_retry(policy, outcome, retries, replayable=replayable,
                                        budget_ok=budget)
                if not decision.retry:
                    if budget:
                        cluster.breaker.release_retry()
                    return await self._give_up(outcome, decision.response_flag, ex, head)
                retry_held = True
                retries += 1
                self.metrics.retries.labels(destination_service=service,
                                            reason=outcome.kind if outcome.kind != "response"
                                            else str(outcome.status)).inc()
                await asyncio.sleep(backoff(retries - 1, policy, self.proxy.rng.random()))
        finally:
            if retry_held:
                cluster.breaker.release_retry()

    def _eject_note(self, cluster: object, address: str, result: int | str,
                    service: str) -> None:
        from nodeproxy.waypoint.cluster import Cluster

        assert isinstance(cluster, Cluster)
        reason = cluster.record(address, result)
        if reason is not None:
            self.metrics.ejections.labels(destination_service=service, reason=str(reason)).inc()
            log.info("endpoint %s of %s ejected (%s)", address, cluster.key, reason,
                     extra=_EXTRA)

    async def _give_up(self, outcome: Outcome, flag: str | None, ex: _Exchange,
                       head: RequestHead) -> bool:
        """No (more) retries: answer for the last failed try."""
        if outcome.kind == "response":
            # Only reached for a retried-then-exhausted 5xx: the last response was consumed.
            ex.status, ex.flags = outcome.status or 503, flag or "URX"
            await self._local_reply(ex.status, "upstream failed after retries", close=True,
                                    head=head)
            return False
        if outcome.kind == "per_try_timeout":
            ex.status, ex.flags = 504, "UT"
            await self._local_reply(504, "upstream request timeout", close=True, head=head)
            return False
        ex.status = 503
        ex.flags = {"connect_failure": "UF", "refused_stream": "UF"}.get(outcome.kind, "UC")
        if flag == "URX" and ex.attempts > 1:
            ex.flags = "URX," + ex.flags
        await self._local_reply(503, "upstream connect error or disconnect/reset before "
                                     "headers", close=True, head=head)
        return False

    async def _try(self, conn: Http1Connection, out_head: bytes, body: bytes | None,
                   head: RequestHead, per_try: float | None,
                   ex: _Exchange) -> ResponseHead | Outcome:
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
                             head: RequestHead, ex: _Exchange) -> ResponseHead | Outcome:
        conn.reader.expect_response(head.method)
        if body is not None:
            await conn.write(out_head + body if len(body) < 65536 else out_head)
            if len(body) >= 65536:
                await conn.write(body)
        else:
            await conn.write(out_head)
            await self._stream_request_body(conn, head, ex)
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
                                   ex: _Exchange) -> None:
        chunked = head.body.framing is Framing.CHUNKED
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
            elif isinstance(event, Upgraded):
                return

    async def _respond(self, resp: ResponseHead, conn: Http1Connection, pool: Http1Pool,
                       head: RequestHead, rule: RouteRule | None, ex: _Exchange,
                       upgrading: bool) -> bool:
        """Stream the response to the client; returns whether the downstream stays open."""
        ex.status = resp.status
        if ex.attempts > 1 and resp.status >= 500:
            ex.flags = "URX"  # retries used up: this is the last try's answer
        grpc = _grpc_status(resp.headers)
        ex.grpc_status = str(grpc) if grpc is not None else ""
        reuse = False
        try:
            headers = strip_hop_by_hop(tuple((n.lower(), v) for n, v in resp.headers))
            if rule is not None:
                headers = response_headers(rule, headers)
            if upgrading and resp.status == 101:
                await self._send(encode_response_head(
                    101, resp.reason or "Switching Protocols", headers, BodyKind.NONE,
                    upgrade=_upgrade_token(head) or "websocket"))
                await self._splice(conn)
                return False
            keep = head.keep_alive and not upgrading
            chunked_out = head.version == "1.1" and resp.body.framing in (
                Framing.CHUNKED, Framing.UNTIL_CLOSE)
            out_kind = resp.body
            if resp.body.framing is Framing.UNTIL_CLOSE and head.version == "1.1":
                out_kind = BodyKind.CHUNKED
            await self._send(encode_response_head(
                resp.status, resp.reason or REASONS.get(resp.status, ""), headers, out_kind,
                request_method=head.method, request_version=head.version, keep_alive=keep))
            if head.method == "HEAD" or resp.status in (204, 304) or \
                    resp.body.framing is Framing.NONE:
                reuse = True
                return keep and out_kind.framing is not Framing.UNTIL_CLOSE
            while True:
                event = await conn.next_event()
                if event is None or isinstance(event, ProtocolError):
                    raise _ClientGone("upstream failed in the middle of the response")
                if isinstance(event, BodyData):
                    ex.response_bytes += len(event.data)
                    await self._send(encode_body(event.data, chunked_out))
                elif isinstance(event, MessageEnd):
                    await self._send(encode_end(chunked_out, event.trailers))
                    if event.trailers:
                        grpc = _grpc_status(event.trailers)
                        if grpc is not None:
                            ex.grpc_status = str(grpc)
                    reuse = True
                    return keep and out_kind.framing is not Framing.UNTIL_CLOSE
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

    # -- accounting ---------------------------------------------------------------------------
    def _record(self, ex: _Exchange, started: float) -> None:
        down = self.down
        src = down.source
        service = down.target.service
        dst = down.target.workload
        if ex.destination is not None:
            dst = ex.destination
        grpc = ex.grpc_status
        protocol = "grpc" if any(n.lower() == "content-type" and v.startswith("application/grpc")
                                 for n, v in ex.head.headers) else "http"
        rec = RequestRecord(
            conn_id=down.conn_id,
            source_workload=src.name if src else "unknown",
            source_namespace=src.namespace if src else down.peer.namespace,
            source_principal=str(down.peer),
            source_app=src.canonical_name if src else "unknown",
            source_version=src.canonical_revision if src else "unknown",
            destination_workload=dst.name if dst else "unknown",
            destination_namespace=dst.namespace if dst else (
                service.namespace if service else "unknown"),
            destination_principal=str(dst.identity) if dst else "unknown",
            destination_app=dst.canonical_name if dst else "unknown",
            destination_version=dst.canonical_revision if dst else "unknown",
            destination_service=service.hostname if service else "unknown",
            destination_service_name=service.name if service else "unknown",
            destination_service_namespace=service.namespace if service else "unknown",
            request_protocol=protocol,
            method=ex.head.method,
            path=ex.head.target,
            authority=down.target.authority,
            response_code=ex.status,
            grpc_status=grpc,
            response_flags=ex.flags,
            route=ex.route,
            upstream=ex.upstream,
            attempts=ex.attempts,
            request_bytes=ex.request_bytes,
            response_bytes=ex.response_bytes,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            traceparent=ex.traceparent,
            reason=ex.reason,
        )
        self.metrics.request_done(rec)


def _would_retry(policy: RetryPolicy, outcome: Outcome, retries: int, replayable: bool,
                 cluster: object) -> bool:
    # The same decision as the retry loop's, without taking a retry slot yet.
    return should_retry(policy, outcome, retries, replayable=replayable, budget_ok=True).retry


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


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


__all__ = ["Http1Session", "ProxyError"]
