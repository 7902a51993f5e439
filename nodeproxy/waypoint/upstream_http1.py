"""HTTP/1.1 connections from the waypoint to endpoints, pooled per cluster.

Each connection is one HBONE CONNECT stream to the endpoint carrying keep-alive HTTP/1.1.
The cluster's circuit breaker bounds how many exist (``tcp.maxConnections``); a request that
finds none idle and no room waits as *pending* (``http1MaxPendingRequests``, beyond it 503
UO at once), exactly as Envoy's HTTP/1 connection pool does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence

from nodeproxy.waypoint.breaker import connection_exhausted
from nodeproxy.waypoint.cluster import Cluster
from nodeproxy.waypoint.http1 import Event, Http1Limits, ResponseReader
from nodeproxy.waypoint.upstream import Endpoint, Upstreams, UpstreamTunnel


class Overflow(Exception):
    """The cluster's circuit breaker refused: answer 503 with flag UO."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"circuit breaker: {limit} limit reached")
        self.limit = limit


class Http1Connection:
    __slots__ = ("_events", "endpoint", "reader", "requests", "tunnel")

    def __init__(self, tunnel: UpstreamTunnel, limits: Http1Limits) -> None:
        self.tunnel = tunnel
        self.endpoint = tunnel.endpoint
        self.reader = ResponseReader(limits)
        self.requests = 0
        self._events: deque[Event] = deque()

    async def write(self, data: bytes) -> None:
        if data:
            await self.tunnel.stream.write(data)

    async def next_event(self) -> Event | None:
        """The next response event; None when the upstream closed with nothing pending."""
        while not self._events:
            if self.reader.stopped:
                return None
            data = await self.tunnel.stream.read()
            self._events.extend(self.reader.feed(data) if data else self.reader.feed_eof())
        return self._events.popleft()

    def buffered_event(self) -> Event | None:
        """The next response event if it already arrived (parsed from bytes read earlier),
        else None; never waits."""
        return self._events.popleft() if self._events else None

    @property
    def reusable(self) -> bool:
        return not self.reader.stopped and not self._events and not self.tunnel.stream.at_eof \
            and not self.tunnel.stream.is_reset

    def close(self) -> None:
        self.tunnel.close()


class Http1Pool:
    """Idle connections and pending requests of one cluster."""

    def __init__(self, cluster: Cluster, upstreams: Upstreams, limits: Http1Limits) -> None:
        self.cluster = cluster
        self.upstreams = upstreams
        self.limits = limits
        self.idle: dict[str, list[Http1Connection]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.open = 0

    async def acquire(self, endpoint: Endpoint,
                      headers: Callable[[], Sequence[tuple[str, str]]]) -> Http1Connection:
        """A connection to ``endpoint``: idle, new (room permitting), or after waiting as a
        pending request; ``headers()`` gives the CONNECT headers of a new one.  Raises
        Overflow, or the dial's error (connect failure)."""
        breaker = self.cluster.breaker
        while True:
            conns = self.idle.get(endpoint.address)
            while conns:
                conn = conns.pop()
                if conn.reusable:
                    return conn
                self._discard(conn)
            if breaker.try_acquire_connection():
                self.open += 1
                try:
                    tunnel = await self.upstreams.open(endpoint, headers())
                except BaseException:
                    self.open -= 1
                    breaker.release_connection()
                    self._wake()
                    raise
                return Http1Connection(tunnel, self.limits)
            if not breaker.try_acquire_pending():
                raise Overflow("pending requests (http1MaxPendingRequests)")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                breaker.release_pending()
                if not waiter.done():
                    waiter.cancel()
                with_suppressed_remove(self._waiters, waiter)
            # An idle connection to another endpoint blocks nobody: make room if needed.
            self._evict_idle_elsewhere(endpoint.address)

    def release(self, conn: Http1Connection, *, reuse: bool) -> None:
        conn.requests += 1
        limit = self.cluster.max_requests_per_connection
        if reuse and conn.reusable and not connection_exhausted(conn.requests, limit) \
                and conn.endpoint.address in self.cluster.endpoints:
            self.idle.setdefault(conn.endpoint.address, []).append(conn)
        else:
            self._discard(conn)
        self._wake()

    def _discard(self, conn: Http1Connection) -> None:
        conn.close()
        self.open -= 1
        self.cluster.breaker.release_connection()

    def _evict_idle_elsewhere(self, address: str) -> None:
        for other, conns in self.idle.items():
            if other != address and conns:
                self._discard(conns.pop())
                return

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                self._discard(conn)
        self.idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()


def with_suppressed_remove(queue: deque[asyncio.Future[None]],
                           item: asyncio.Future[None]) -> None:
    with contextlib.suppress(ValueError):  # already taken by _wake
        queue.remove(item)
