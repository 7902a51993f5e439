"""The waypoint's HTTP/2 upstream pool and the cluster's circuit breaker: every connection
counts against ``tcp.maxConnections`` from before it is opened until it closes; at the limit
a request reuses a connection with a free stream, else an idle connection elsewhere makes
room, else the pool overflows (503 UO upstream of it).  In-memory tunnels, no sockets."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.settings
import pytest

from nodeproxy.waypoint.cluster import Cluster, ClusterKey
from nodeproxy.waypoint.http2_proxy import Http2Pool, Http2Upstream, Overflow
from nodeproxy.waypoint.upstream import Endpoint, endpoint_for
from tests.helpers.waiting import eventually
from ztunnel_cfg.l7 import TrafficPolicy
from ztunnel_cfg.model import (
    ConnectionPool,
    HttpPoolSettings,
    LoadBalancerPolicy,
    TcpPoolSettings,
    Workload,
)

SERVICE = "default/echo.default.svc.cluster.local"


class MemoryStream:
    """The waypoint's end of a tunnel: what it writes is kept, reads wait for the peer."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent = bytearray()

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self.inbox.get()

    async def write(self, data: bytes) -> None:
        self.sent += data

    def write_eof(self) -> None:
        pass

    def reset(self) -> None:
        self.peer_closes()

    def peer_closes(self) -> None:
        self.inbox.put_nowait(b"")


class FakeTunnel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.stream = MemoryStream()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.peer_closes()


class FakeUpstreams:
    """Opens in-memory tunnels (or fails to, when ``refuse`` is set) and remembers them; the
    endpoint at their far end allows ``max_streams`` concurrent streams (its SETTINGS)."""

    def __init__(self, max_streams: int = 100) -> None:
        self.opened: list[FakeTunnel] = []
        self.refuse = False
        self.max_streams = max_streams

    async def open(self, endpoint: Endpoint, headers: Sequence[tuple[str, str]]) -> FakeTunnel:
        if self.refuse:
            raise OSError(f"connecting to {endpoint.address} failed")
        tunnel = FakeTunnel(endpoint.address)
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        server.initiate_connection()
        tunnel.stream.inbox.put_nowait(server.data_to_send())
        self.opened.append(tunnel)
        return tunnel


def _endpoint(name: str, ip: str) -> Endpoint:
    return endpoint_for(Workload(name=name, namespace="default",
                                 workload_ips=(ipaddress.ip_address(ip),), node="node2"),
                        None, 8080)


A = _endpoint("echo-a", "10.0.0.1")
B = _endpoint("echo-b", "10.0.0.2")


def _cluster(max_connections: int, max_requests_per_connection: int = 0) -> Cluster:
    pool = ConnectionPool(tcp=TcpPoolSettings(max_connections=max_connections),
                          http=HttpPoolSettings(
                              max_requests_per_connection=max_requests_per_connection))
    cluster = Cluster(ClusterKey(SERVICE, 80),
                      TrafficPolicy(SERVICE, "default/echo", pool, None,
                                    LoadBalancerPolicy.LEAST_REQUEST))
    cluster.update(cluster.policy, [A, B])
    return cluster


def _connections(cluster: Cluster) -> tuple[int, int]:
    usage = cluster.breaker.stats()["connections"]
    return usage.active, usage.overflows


def _headers() -> list[tuple[str, str]]:
    return []


async def test_connections_count_against_max_connections_and_are_reused() -> None:
    cluster, upstreams = _cluster(1), FakeUpstreams()
    pool = Http2Pool(cluster, upstreams)
    try:
        first = await pool.acquire(A, _headers)
        assert _connections(cluster) == (1, 0)
        first.open_stream()
        # At the limit, a connection to the endpoint with a free stream carries the next one.
        assert await pool.acquire(A, _headers) is first
        assert len(upstreams.opened) == 1
        assert _connections(cluster) == (1, 0)
    finally:
        await pool.aclose()
    assert _connections(cluster)[0] == 0


async def test_full_connection_at_the_limit_overflows() -> None:
    cluster, upstreams = _cluster(1), FakeUpstreams(max_streams=1)
    pool = Http2Pool(cluster, upstreams)
    try:
        conn = await pool.acquire(A, _headers)
        conn.open_stream()  # the endpoint's only stream
        await eventually(lambda: conn.pipe.capacity == 0, 5, "endpoint SETTINGS not applied")
        with pytest.raises(Overflow) as refused:
            await pool.acquire(A, _headers)
        assert "connections" in refused.value.limit
        assert len(upstreams.opened) == 1
        assert _connections(cluster) == (1, 1)
    finally:
        await pool.aclose()


async def test_a_connection_that_closes_gives_its_place_back() -> None:
    cluster, upstreams = _cluster(1), FakeUpstreams()
    pool = Http2Pool(cluster, upstreams)
    try:
        conn = await pool.acquire(A, _headers)
        upstreams.opened[0].stream.peer_closes()  # the endpoint's side went away
        await eventually(lambda: _connections(cluster)[0] == 0, 5,
                         "closed connection still counted by the breaker")
        assert conn.pipe.closed
        assert await pool.acquire(A, _headers) is not conn
        assert _connections(cluster) == (1, 0)
    finally:
        await pool.aclose()


async def test_an_idle_connection_elsewhere_makes_room() -> None:
    cluster, upstreams = _cluster(1), FakeUpstreams(max_streams=1)
    pool = Http2Pool(cluster, upstreams)
    try:
        await pool.acquire(A, _headers)
        to_b = await pool.acquire(B, _headers)
        assert [t.address for t in upstreams.opened] == [A.address, B.address]
        assert upstreams.opened[0].closed
        assert _connections(cluster) == (1, 0)  # room was made: no overflow counted
        # ... but a busy one does not: B's connection has a stream, A overflows.
        to_b.open_stream()
        await eventually(lambda: to_b.pipe.capacity == 0, 5, "endpoint SETTINGS not applied")
        with pytest.raises(Overflow):
            await pool.acquire(A, _headers)
    finally:
        await pool.aclose()


async def test_retired_connection_closes_when_its_last_stream_ends() -> None:
    cluster, upstreams = _cluster(1, max_requests_per_connection=1), FakeUpstreams()
    pool = Http2Pool(cluster, upstreams)
    try:
        conn = await pool.acquire(A, _headers)
        stream = conn.open_stream()
        pool.release(conn, stream.id)
        assert upstreams.opened[0].closed
        await eventually(lambda: _connections(cluster)[0] == 0, 5,
                         "retired connection still counted by the breaker")
        assert await pool.acquire(A, _headers) is not conn
    finally:
        await pool.aclose()


async def test_a_failed_dial_gives_its_place_back() -> None:
    cluster, upstreams = _cluster(1), FakeUpstreams()
    upstreams.refuse = True
    pool = Http2Pool(cluster, upstreams)
    with pytest.raises(OSError):
        await pool.acquire(A, _headers)
    assert _connections(cluster) == (0, 0)
    upstreams.refuse = False
    conn = await pool.acquire(A, _headers)
    assert isinstance(conn, Http2Upstream)
    await pool.aclose()
    assert _connections(cluster)[0] == 0
