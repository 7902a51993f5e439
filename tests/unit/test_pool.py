"""ConnectionPool: sharing, capacity, single in-flight handshake, failure fan-out, idle reaping."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from nodeproxy.errors import ProxyError
from nodeproxy.pool import ConnectionPool


class FakeConn:
    def __init__(self, n: int, peer_max: int = 200) -> None:
        self.n = n
        self.usable = True
        self.peer_max_streams = peer_max
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.usable = False


class Connector:
    def __init__(self, peer_max: int = 200, delay: float = 0.01, fail: Exception | None = None):
        self.calls: list[Hashable] = []
        self.conns: list[FakeConn] = []
        self.peer_max = peer_max
        self.delay = delay
        self.fail = fail

    async def __call__(self, key: Hashable) -> FakeConn:
        self.calls.append(key)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        conn = FakeConn(len(self.conns), self.peer_max)
        self.conns.append(conn)
        return conn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_acquirers_share_one_handshake() -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    leases = await asyncio.gather(*(pool.acquire("k") for _ in range(50)))
    assert len(connect.calls) == 1
    assert {lease.conn.n for lease in leases} == {0}
    assert pool.stats() == {"connections": 1, "streams": 50, "keys": 1}
    pool.close()


async def test_more_than_100_streams_open_a_second_connection() -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    leases = await asyncio.gather(*(pool.acquire("k") for _ in range(150)))
    assert len(connect.calls) == 2
    by_conn = [sum(1 for lease in leases if lease.conn.n == i) for i in (0, 1)]
    assert by_conn == [100, 50]
    pool.close()


async def test_peer_max_streams_caps_capacity() -> None:
    connect = Connector(peer_max=3)
    pool = ConnectionPool(connect)
    leases = await asyncio.gather(*(pool.acquire("k") for _ in range(7)))
    counts: dict[int, int] = {}
    for lease in leases:
        counts[lease.conn.n] = counts.get(lease.conn.n, 0) + 1
    assert max(counts.values()) <= 3
    assert sum(counts.values()) == 7
    pool.close()


async def test_distinct_keys_get_distinct_connections() -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    a = await pool.acquire(("src", "dst", "10.0.0.1"))
    b = await pool.acquire(("src", "dst", "10.0.0.2"))
    assert a.conn is not b.conn
    assert len(connect.calls) == 2
    pool.close()


async def test_failed_handshake_fails_all_waiters_with_the_reason() -> None:
    connect = Connector(fail=ProxyError("connection to 10.0.0.5:15008 timed out"))
    pool = ConnectionPool(connect)
    results = await asyncio.gather(*(pool.acquire("k") for _ in range(10)), return_exceptions=True)
    assert len(connect.calls) == 1
    assert all(isinstance(r, ProxyError) and "timed out" in str(r) for r in results)
    assert pool.stats()["keys"] == 0
    # The next attempt tries again instead of caching the failure.
    connect.fail = None
    lease = await pool.acquire("k")
    assert lease.conn.usable
    pool.close()


async def test_released_connection_is_reused() -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    first = await pool.acquire("k")
    first.release()
    first.release()  # idempotent
    second = await pool.acquire("k")
    assert second.conn is first.conn
    assert len(connect.calls) == 1
    assert pool.stats()["streams"] == 1
    pool.close()


async def test_dead_connection_is_replaced() -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    first = await pool.acquire("k")
    first.conn.usable = False  # e.g. GOAWAY received
    first.release()
    second = await pool.acquire("k")
    assert second.conn is not first.conn
    assert first.conn.closed
    pool.close()


async def test_idle_connections_are_reaped_after_timeout() -> None:
    clock = Clock()
    connect = Connector()
    pool = ConnectionPool(connect, idle_timeout=300, clock=clock)
    lease = await pool.acquire("k")
    busy = await pool.acquire("other")
    lease.release()
    clock.now += 299
    assert pool.reap_idle() == 0
    clock.now += 2
    assert pool.reap_idle() == 1
    assert lease.conn.closed
    assert not busy.conn.closed  # a connection with live streams is never reaped
    pool.close()
    assert busy.conn.closed


@pytest.mark.parametrize("n", [1, 99, 100, 101, 250])
async def test_connection_count_is_ceil_of_streams(n: int) -> None:
    connect = Connector()
    pool = ConnectionPool(connect)
    await asyncio.gather(*(pool.acquire("k") for _ in range(n)))
    assert len(connect.calls) == -(-n // 100)
    pool.close()
