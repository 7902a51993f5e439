"""HBONE connection pool.

Keyed by (source identity, destination identity, destination IP) like ztunnel's WorkloadKey.
A connection carries up to ``max_streams_per_conn`` (100, capped by the peer's
SETTINGS_MAX_CONCURRENT_STREAMS) leases before another connection is opened; concurrent
acquirers of one key share a single in-flight handshake, and a failed handshake fails every
waiter at once with its reason.  Idle connections are closed after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("nodeproxy.pool")


class PoolableConnection(Protocol):
    @property
    def usable(self) -> bool:
        """False once closed, failed, or draining after GOAWAY."""

    @property
    def peer_max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS."""

    def close(self) -> None: ...


C = TypeVar("C", bound=PoolableConnection)


@dataclass(eq=False)
class _Entry(Generic[C]):
    ready: asyncio.Future[C]
    leases: int = 0
    idle_since: float | None = None
    conn: C | None = None


@dataclass(eq=False)
class Lease(Generic[C]):
    """One reserved stream slot on a pooled connection.  Release exactly once."""

    conn: C
    _pool: ConnectionPool[C]
    _key: Hashable
    _entry: _Entry[C]
    _released: bool = field(default=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._key, self._entry)


class ConnectionPool(Generic[C]):
    def __init__(
        self,
        connect: Callable[[Hashable], Awaitable[C]],
        *,
        max_streams_per_conn: int = 100,
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._max_streams = max_streams_per_conn
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._entries: dict[Hashable, list[_Entry[C]]] = {}
        self._reaper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps weak ones

    # -- public -------------------------------------------------------------------------------
    async def acquire(self, key: Hashable) -> Lease[C]:
        while True:
            entry = self._find(key) or self._start(key)
            entry.leases += 1
            entry.idle_since = None
            try:
                conn = await asyncio.shield(entry.ready)
            except BaseException:
                entry.leases -= 1
                raise
            if conn.usable and entry.leases <= self._capacity(conn):
                return Lease(conn, self, key, entry)
            # Over the peer's limit or died meanwhile: give the slot back and look again.
            entry.leases -= 1
            if not conn.usable:
                self._drop(key, entry)

    def stats(self) -> dict[str, int]:
        conns = [e for es in self._entries.values() for e in es if e.conn is not None]
        return {
            "connections": len(conns),
            "streams": sum(e.leases for e in conns),
            "keys": len(self._entries),
        }

    def reap_idle(self) -> int:
        """Close connections idle for longer than the idle timeout; returns how many."""
        now = self._clock()
        closed = 0
        for key, entries in list(self._entries.items()):
            for entry in list(entries):
                conn = entry.conn
                if conn is None:
                    continue
                if entry.leases:
                    continue
                idle_for = now - entry.idle_since if entry.idle_since is not None else 0.0
                if not conn.usable or idle_for >= self._idle_timeout:
                    self._drop(key, entry)
                    closed += 1
        return closed

    def start_reaper(self, interval: float = 30.0) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.reap_idle()
            self._reaper = loop.call_later(interval, tick)

        self._reaper = loop.call_later(interval, tick)

    async def aclose(self, timeout: float = 1.0) -> None:
        """Close every connection (GOAWAY) and wait up to ``timeout`` for them to finish."""
        conns = [e.conn for es in self._entries.values() for e in es if e.conn is not None]
        self.close()
        waits = [c.wait_closed() for c in conns if hasattr(c, "wait_closed")]
        if waits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=timeout
            )
            for conn in conns:
                abort = getattr(conn, "abort", None)
                if pending and abort is not None:
                    abort()
            for task in pending:
                task.cancel()

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for entries in self._entries.values():
            for entry in entries:
                if entry.conn is not None:
                    entry.conn.close()
                elif not entry.ready.done():
                    entry.ready.cancel()
        self._entries.clear()

    # -- internals ----------------------------------------------------------------------------
    def _capacity(self, conn: C) -> int:
        return max(1, min(self._max_streams, conn.peer_max_streams))

    def _find(self, key: Hashable) -> _Entry[C] | None:
        for entry in self._entries.get(key, ()):
            if entry.conn is None:
                # Handshake in flight: assume the default capacity until we know the peer's.
                if not entry.ready.done() and entry.leases < self._max_streams:
                    return entry
                continue
            if entry.conn.usable and entry.leases < self._capacity(entry.conn):
                return entry
        return None

    def _start(self, key: Hashable) -> _Entry[C]:
        loop = asyncio.get_running_loop()
        entry: _Entry[C] = _Entry(ready=loop.create_future())
        self._entries.setdefault(key, []).append(entry)

        async def connect() -> None:
            try:
                conn = await self._connect(key)
            except BaseException as exc:
                self._drop(key, entry)
                if not entry.ready.done():
                    entry.ready.set_exception(exc)
                    # Retrieved by waiters; avoid "exception never retrieved" when none remain.
                    entry.ready.exception()
                if not isinstance(exc, Exception):
                    raise
                return
            if entry.ready.cancelled():
                conn.close()
                return
            entry.conn = conn
            entry.ready.set_result(conn)

        self._tasks.add(task := loop.create_task(connect(), name=f"pool-connect:{key}"))
        task.add_done_callback(self._tasks.discard)
        return entry

    def _release(self, key: Hashable, entry: _Entry[C]) -> None:
        entry.leases -= 1
        if entry.leases == 0:
            entry.idle_since = self._clock()
            if entry.conn is not None and not entry.conn.usable:
                self._drop(key, entry)

    def _drop(self, key: Hashable, entry: _Entry[C]) -> None:
        entries = self._entries.get(key)
        if entries and entry in entries:
            entries.remove(entry)
            if not entries:
                del self._entries[key]
        if entry.conn is not None and entry.leases == 0:
            entry.conn.close()
