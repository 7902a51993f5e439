"""Abuse classes against two in-process agents on loopback (real TLS 1.3, real HTTP/2 from the
independent ``h2`` package): every attack first, then what must hold afterwards: file
descriptors back near the baseline taken in the same test, memory growth bounded relative to
that baseline, the rejection counted, good clients still served.

Synchronisation is by polling with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from h2.errors import ErrorCodes

from nodeproxy.app import AgentApp
from nodeproxy.hbone.flood import FloodLimits
from nodeproxy.proxy.limits import Limits
from nodeproxy.proxy.pod import PodProxy
from tests.abuse.h2peer import HostilePeer, is_closed_by_peer, stalled_handshakes, workload_tls
from tests.integration.test_agent_loopback import CONFIG, Mesh, running_mesh

SERVER_IP = "127.0.2.1"  # the "server" pod on node2
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"  # allowed by the config's policy


# The agent's production loop: memory figures depend on its TLS buffers (tests/conftest.py).
pytestmark = pytest.mark.uvloop


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def poll(check: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(describe())
        await asyncio.sleep(0.02)


def rejected(app: AgentApp, reason: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "nodeproxy_connections_rejected_total", {"direction": "inbound", "reason": reason})
    return value or 0.0


@dataclass
class CountingServer:
    """A TCP echo server that knows how many connections it has open and ever accepted."""

    accepted: int = 0
    open: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()


@dataclass
class Lab:
    mesh: Mesh
    server: CountingServer
    port: int
    tls: object
    tmp: Path

    @property
    def node2(self) -> AgentApp:
        return self.mesh.apps["node2"]

    async def peer(self, receive_buffer: int | None = None) -> HostilePeer:
        import ssl

        assert isinstance(self.tls, ssl.SSLContext)
        return await HostilePeer.connect(SERVER_IP, 15008, self.tls,
                                         receive_buffer=receive_buffer)

    async def good_round_trip(self) -> None:
        reader, writer = await self.mesh.connect_via("127.0.1.1", (SERVER_IP, self.port))
        writer.write(b"still served")
        assert await reader.readexactly(12) == b"STILL SERVED"
        writer.close()

    async def settle(self, baseline_fds: int, margin: int = 12) -> None:
        await poll(lambda: open_fds() <= baseline_fds + margin and self.server.open == 0, 15,
                   lambda: f"fds {open_fds()} (baseline {baseline_fds}), upstream connections "
                           f"still open {self.server.open}")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def lab(tmp_path: Path, limits: Limits | None = None,
              idle_timeout: float = 3600.0) -> AsyncIterator[Lab]:
    port = free_port()
    server = CountingServer()
    srv = await asyncio.start_server(server.handle, SERVER_IP, port)
    try:
        async with running_mesh(tmp_path, CONFIG, (), port, limits=limits,
                                idle_timeout=idle_timeout) as mesh:
            tls = workload_tls(tmp_path / "ca", CLIENT_ID, tmp_path)
            the_lab = Lab(mesh, server, port, tls, tmp_path)
            await the_lab.good_round_trip()  # warm: pool and certificates in place
            await poll(lambda: server.open == 0, 5, lambda: "warm-up connection still open")
            yield the_lab
    finally:
        for writer in list(server.writers):
            writer.close()
        srv.close()
        await srv.wait_closed()


# -- class 4: HTTP/2 rapid reset ----------------------------------------------------------------

async def test_rapid_reset_gets_goaway_and_leaves_no_dials_behind(tmp_path: Path) -> None:
    async with lab(tmp_path) as t:
        baseline, rss0 = open_fds(), rss_bytes()
        peer = await t.peer()
        await peer.rapid_reset(f"{SERVER_IP}:{t.port}", 20_000)
        assert await peer.read_events(10), "the agent never ended the abusive connection"
        peer.close()
        assert peer.outcome.goaway_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert rejected(t.node2, "reset_flood") == 1
        # Each reset cancelled its dial: far fewer upstream connections than streams (the
        # unfixed agent made ~7,000 dials for 20,000 pairs and ran out of descriptors).
        limit = FloodLimits().max_premature_resets
        assert t.server.accepted <= limit + Limits().max_dials_per_connection + 1
        await t.settle(baseline)
        await t.good_round_trip()
        assert rss_bytes() - rss0 < 64 * 1024 * 1024


# -- class 5: every way a stream ends closes its upstream --------------------------------------

@pytest.mark.parametrize("ending", ["rst_then_goaway", "goaway_then_close", "abort"])
async def test_ended_streams_close_their_upstream_sockets(tmp_path: Path, ending: str) -> None:
    async with lab(tmp_path) as t:
        baseline = open_fds()
        peer = await t.peer()
        sids = [peer.open_stream(f"{SERVER_IP}:{t.port}") for _ in range(60)]
        await peer.flush()
        statuses = await peer.wait_statuses(len(sids), 10)
        assert set(statuses.values()) == {200}
        await poll(lambda: t.server.open == len(sids), 10,
                   lambda: f"{t.server.open} upstream connections of {len(sids)}")
        if ending == "rst_then_goaway":
            for sid in sids:
                peer.h2.reset_stream(sid)
            peer.h2.close_connection()
            await peer.flush()
            peer.writer.close()
        elif ending == "goaway_then_close":
            peer.h2.close_connection()
            await peer.flush()
            peer.writer.close()
        else:
            peer.close()
        await t.settle(baseline)
        assert t.mesh.apps["node2"].connections() == []
        await t.good_round_trip()


async def test_idle_streams_are_reset_and_close_their_upstream(tmp_path: Path) -> None:
    async with lab(tmp_path, idle_timeout=1.0) as t:
        baseline = open_fds()
        peer = await t.peer()
        sids = [peer.open_stream(f"{SERVER_IP}:{t.port}") for _ in range(20)]
        await peer.flush()
        assert set((await peer.wait_statuses(len(sids), 10)).values()) == {200}
        await poll(lambda: t.server.open == len(sids), 10, lambda: f"{t.server.open} open")
        # Silence both ways: the agent resets each stream (RST_STREAM to us) and its upstream.
        ended = peer.outcome.reset_streams
        async with asyncio.timeout(10):
            while len(ended) < len(sids):
                lost = await peer.read_events(0.2)
                assert not lost or len(ended) == len(sids), f"connection lost, {ended} reset"
        peer.close()
        await t.settle(baseline)


async def test_drain_closes_every_stream_and_upstream(tmp_path: Path) -> None:
    before = open_fds()
    async with lab(tmp_path) as t:
        peer = await t.peer()
        sids = [peer.open_stream(f"{SERVER_IP}:{t.port}") for _ in range(20)]
        await peer.flush()
        assert set((await peer.wait_statuses(len(sids), 10)).values()) == {200}
        await poll(lambda: t.server.open == len(sids), 10, lambda: f"{t.server.open} open")
        server = t.server
    # The agents have drained (drain timeout 1 s) and stopped: nothing of theirs is left.
    await poll(lambda: server.open == 0 and open_fds() <= before + 12, 15,
               lambda: f"fds {open_fds()} (before the mesh {before}), open {server.open}")
    peer.close()


# -- class 3: the agent never proxies to its own capture ports ---------------------------------

async def test_connect_to_own_capture_ports_is_refused(tmp_path: Path) -> None:
    async with lab(tmp_path) as t:
        baseline = open_fds()
        peer = await t.peer()
        sids = {port: peer.open_stream(f"{SERVER_IP}:{port}") for port in (15001, 15006, 15008)}
        await peer.flush()
        statuses = await peer.wait_statuses(3, 10)
        assert {port: statuses[sid] for port, sid in sids.items()} == {
            15001: 400, 15006: 400, 15008: 400}
        peer.close()
        # Plaintext: a connection to the pod's own 15006 whose destination is 15006 again.
        sock = socket.socket()
        sock.bind(("127.0.1.1", 0))
        t.mesh.targets[sock.getsockname()[:2]] = (SERVER_IP, 15006)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (SERVER_IP, 15006))
        await loop.sock_sendall(sock, b"loop?")
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionResetError):
                await loop.sock_recv(sock, 10)  # reset, never an echo or a clean EOF
        sock.close()
        assert rejected(t.node2, "own_port") == 3
        assert t.node2.metrics.registry.get_sample_value(
            "nodeproxy_connections_rejected_total",
            {"direction": "inbound_plaintext", "reason": "own_port"}) == 1
        await t.settle(baseline)
        assert t.server.accepted == 1  # only the warm-up ever reached the app
        await t.good_round_trip()


# -- class 6: memory and descriptors under hostile or idle clients -----------------------------

async def test_stalled_handshakes_are_bounded_and_timed_out(tmp_path: Path) -> None:
    limits = Limits(max_pending_handshakes=50, handshake_timeout=1.0)
    async with lab(tmp_path, limits) as t:
        baseline = open_fds()
        socks = stalled_handshakes(SERVER_IP, 15008, 80)
        try:
            await poll(lambda: all(is_closed_by_peer(s) for s in socks), 15,
                       lambda: f"{sum(not is_closed_by_peer(s) for s in socks)} stalled "
                               "handshakes still open")
        finally:
            for s in socks:
                s.close()
        await poll(lambda: rejected(t.node2, "handshake_limit") + rejected(
            t.node2, "handshake_timeout") == 80, 5,
            lambda: f"limit {rejected(t.node2, 'handshake_limit')} timeout "
                    f"{rejected(t.node2, 'handshake_timeout')}")
        assert rejected(t.node2, "handshake_limit") >= 30
        await t.settle(baseline)
        await t.good_round_trip()


async def test_memory_per_pending_handshake_is_small(tmp_path: Path) -> None:
    """The unfixed agent held ~300 KB per connection before the TLS handshake."""
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), max(hard, 8192)))
    limits = Limits(max_pending_handshakes=count + 10, handshake_timeout=60.0)
    async with lab(tmp_path, limits) as t:
        rss0 = rss_bytes()
        socks = stalled_handshakes(SERVER_IP, 15008, count)
        try:
            pod = t.node2.agent.pods["c1//Pod/shop/server"]
            assert isinstance(pod, PodProxy)
            await poll(lambda: pod.pending_handshakes == count, 15,
                       lambda: f"the agent accepted {pod.pending_handshakes} of {count}")
            per_connection = (rss_bytes() - rss0) / count
            assert per_connection < 64 * 1024, f"{per_connection / 1024:.0f} KiB per handshake"
        finally:
            for s in socks:
                s.close()
        await t.good_round_trip()


@pytest.mark.parametrize("frame", ["ping", "settings"])
async def test_control_frame_flood_without_reading_is_cut_off(tmp_path: Path, frame: str) -> None:
    async with lab(tmp_path) as t:
        baseline, rss0 = open_fds(), rss_bytes()
        peer = await t.peer()
        await peer.flood(frame, 200_000)
        await poll(lambda: rejected(t.node2, "control_flood") == 1, 10,
                   lambda: "the flood was not detected")
        assert await peer.read_events(10)
        peer.close()
        await t.settle(baseline)
        assert rss_bytes() - rss0 < 32 * 1024 * 1024
        await t.good_round_trip()


async def test_a_peer_that_never_reads_stops_being_read(tmp_path: Path) -> None:
    """With the flood counters out of the way, a peer that sends frames we must answer and
    never reads our answers is no longer read once 1 MiB of answers waits for it."""
    limits = Limits(flood=FloodLimits(max_control_frames=10**9))
    async with lab(tmp_path, limits) as t:
        rss0 = rss_bytes()
        peer = await t.peer(receive_buffer=4096)
        sent = await peer.flood("ping", 3_000_000)
        assert sent < 3_000_000, "the agent kept reading a peer that does not read"
        assert rss_bytes() - rss0 < 48 * 1024 * 1024
        assert rejected(t.node2, "control_flood") == 0
        await t.good_round_trip()  # the loop is not wedged by the stalled peer
        peer.close()


async def test_pod_connection_limit_resets_extra_connections(tmp_path: Path) -> None:
    limits = Limits(max_connections_per_pod=20)
    async with lab(tmp_path, limits) as t:
        held = []
        for _ in range(20):
            reader, writer = await t.mesh.connect_via("127.0.1.1", (SERVER_IP, t.port))
            writer.write(b"hold")
            assert await reader.readexactly(4) == b"HOLD"
            held.append(writer)
        reader, writer = await t.mesh.connect_via("127.0.1.1", (SERVER_IP, t.port))
        writer.write(b"one too many")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
        value = t.mesh.apps["node1"].metrics.registry.get_sample_value(
            "nodeproxy_connections_rejected_total",
            {"direction": "outbound", "reason": "pod_connection_limit"})
        assert value == 1
        for w in held:
            w.close()
        await poll(lambda: t.server.open == 0, 10, lambda: f"{t.server.open} still open")
        await t.good_round_trip()
