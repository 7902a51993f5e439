"""Two agents in one process on loopback (``--no-redirect`` mode): the whole data path with
real TLS 1.3, real HTTP/2 CONNECT, real certificates from a real CA directory.

Pods are loopback addresses (127.0.1.x on node1, 127.0.2.x on node2).  There is no REDIRECT
here, so the test injects the "original destination" of each outbound connection, keyed by
the client's source address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeproxy.app import AgentApp, AgentOptions
from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import LocalCaClient
from nodeproxy.metrics import Metrics
from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.proxy.limits import Limits
from tests.helpers.waiting import eventually
from ztunnel_cfg.snapshot import Snapshot

CONFIG = textwrap.dedent(
    """
    workloads:
    - uid: c1//Pod/default/client
      name: client
      namespace: default
      serviceAccount: client
      workloadIps: ["127.0.1.1"]
      node: node1
      protocol: HBONE
    - uid: c1//Pod/legacy/intruder
      name: intruder
      namespace: legacy
      serviceAccount: intruder
      workloadIps: ["127.0.1.2"]
      node: node1
      protocol: HBONE
    - uid: c1//Pod/shop/server
      name: server
      namespace: shop
      serviceAccount: server
      workloadIps: ["127.0.2.1"]
      node: node2
      protocol: HBONE
    - uid: c1//Pod/external/plain
      name: plain
      namespace: external
      serviceAccount: plain
      workloadIps: ["127.0.3.1"]
      node: node2
      protocol: TCP
    policies:
    - name: deny-legacy
      namespace: shop
      scope: Namespace
      action: Deny
      rules: [[[{namespaces: ["legacy"]}]]]
    """
)

APP_PORT = 18080


@dataclass
class Mesh:
    apps: dict[str, AgentApp]
    targets: dict[tuple[str, int], tuple[str, int]]
    received: list[bytes]
    peers: list[str]

    async def connect_via(self, pod_ip: str, target: tuple[str, int]) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter
    ]:
        """Connect from ``pod_ip`` to its outbound listener as if redirected to ``target``."""
        sock = socket.socket()
        sock.bind((pod_ip, 0))
        sock.setblocking(False)
        self.targets[sock.getsockname()[:2]] = target
        await asyncio.get_running_loop().sock_connect(sock, (pod_ip, 15001))
        return await asyncio.open_connection(sock=sock)


async def _echo_server(
    host: str, received: list[bytes], peers: list[str], port: int = APP_PORT
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        while data := await reader.read(65536):
            received.append(data)
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port)


@contextlib.asynccontextmanager
async def running_mesh(
    tmp_path: Path, config_text: str, server_ips: tuple[str, ...], app_port: int,
    admin: dict[str, str] | None = None, limits: Limits | None = None,
    idle_timeout: float = 3600.0,
) -> AsyncIterator[Mesh]:
    """Two in-process agents (node1, node2) on loopback plus echo servers on ``server_ips``.
    ``admin`` maps node -> "127.0.0.1:PORT" for tests that talk to the admin API."""
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    config = tmp_path / "cluster.yaml"
    config.write_text(config_text)
    targets: dict[tuple[str, int], tuple[str, int]] = {}

    def inject(env: ProxyEnv) -> None:
        env.original_dst = lambda sock: targets[sock.getpeername()[:2]]

    apps: dict[str, AgentApp] = {}
    tasks = []
    for node in ("node1", "node2"):
        admin_host, _, admin_port = (admin or {}).get(node, "127.0.0.1:0").rpartition(":")
        options = AgentOptions(
            config=str(config), node=node, in_pod=False,
            readiness_addr=("127.0.0.1", 0), metrics_addr=("127.0.0.1", 0),
            admin_addr=(admin_host, int(admin_port)), socket_mark=False, handle_signals=False,
            drain_timeout=1.0, limits=limits or Limits(), idle_timeout=idle_timeout,
        )
        holder: list[AgentApp] = []
        def snapshot(h: list[AgentApp] = holder) -> Snapshot:
            return h[0].env.snapshot()

        client = LocalCaClient(CertificateAuthority.load(ca_dir), node, snapshot)
        app = AgentApp(options, client, None, metrics=Metrics(), env_overrides=inject)
        holder.append(app)
        apps[node] = app
        tasks.append(asyncio.create_task(app.run()))
    received: list[bytes] = []
    peers: list[str] = []
    servers = [await _echo_server(ip, received, peers, app_port) for ip in server_ips]
    mesh = Mesh(apps, targets, received, peers)
    try:
        await eventually(  # generous: CI may share the machine's two cores
            lambda: all(a.agent.ready and a.started.is_set() for a in apps.values()), 30,
            lambda: "agents not ready: " + ", ".join(
                f"{n}: {a.agent.readiness_detail()}" for n, a in apps.items()))
        yield mesh
    finally:
        for app in apps.values():
            await app.quit()
        await asyncio.gather(*tasks)
        for server in servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(tmp_path, CONFIG, ("127.0.2.1", "127.0.3.1"), APP_PORT) as m:
        yield m


def _counter(app: AgentApp, name: str, **labels: str) -> float:
    total = 0.0
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_round_trip_through_hbone(mesh: Mesh) -> None:
    reader, writer = await mesh.connect_via("127.0.1.1", ("127.0.2.1", APP_PORT))
    writer.write(b"hello mesh")
    await writer.drain()
    assert await reader.readexactly(10) == b"HELLO MESH"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    node1, node2 = mesh.apps["node1"], mesh.apps["node2"]
    # Byte counters are recorded when the connection is over.
    await eventually(lambda: _counter(node1, "istio_tcp_received_bytes_total",
                                      reporter="source") == 10, 5, "node1 counted the bytes")
    assert mesh.received == [b"hello mesh"]
    assert _counter(node1, "istio_tcp_connections_opened_total", reporter="source",
                    connection_security_policy="mutual_tls") == 1
    assert _counter(node2, "istio_tcp_connections_opened_total", reporter="destination",
                    source_principal="spiffe://cluster.local/ns/default/sa/client",
                    destination_workload="server") == 1
    assert _counter(node1, "istio_tcp_sent_bytes_total", reporter="source") == 10
    assert _counter(node1, "istio_tcp_received_bytes_total", reporter="source") == 10


async def test_denied_source_gets_no_byte_through(mesh: Mesh) -> None:
    reader, writer = await mesh.connect_via("127.0.1.2", ("127.0.2.1", APP_PORT))
    writer.write(b"sneaky")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await reader.readexactly(1)
    writer.close()
    # The refusal is counted once node2 decided: from then on no byte can reach the server.
    await eventually(lambda: _counter(mesh.apps["node2"], "istio_tcp_connections_failed_total",
                                      response_flags="DENY"), 5, "node2 counted the denial")
    assert _counter(mesh.apps["node2"], "istio_tcp_connections_failed_total",
                    response_flags="DENY") == 1
    assert mesh.received == []
    assert mesh.peers == []  # the server never even accepted a connection


async def test_non_mesh_destination_is_passed_through(mesh: Mesh) -> None:
    reader, writer = await mesh.connect_via("127.0.1.1", ("127.0.3.1", APP_PORT))
    writer.write(b"plain")
    assert await reader.readexactly(5) == b"PLAIN"
    writer.close()
    assert _counter(mesh.apps["node1"], "istio_tcp_connections_opened_total",
                    connection_security_policy="unknown") == 1


async def test_many_concurrent_connections_share_the_pool(mesh: Mesh) -> None:
    async def one(i: int) -> bytes:
        reader, writer = await mesh.connect_via("127.0.1.1", ("127.0.2.1", APP_PORT))
        payload = f"msg-{i:04d}".encode()
        writer.write(payload)
        reply = await reader.readexactly(len(payload))
        writer.close()
        return reply

    replies = await asyncio.gather(*(one(i) for i in range(150)))
    assert sorted(replies) == sorted(f"MSG-{i:04d}".encode() for i in range(150))
    pod = mesh.apps["node1"].agent.pods["c1//Pod/default/client"]
    stats = pod.pool.stats()  # type: ignore[attr-defined]
    assert 1 <= stats["connections"] <= 2  # 150 streams need at most 2 pooled connections


async def _hbone_connect(tmp_path: Path, sa_ns: str, sa: str, authority: str, data: bytes,
                         *extra: str) -> tuple[int, bytes, str]:
    import sys

    cert, key = tmp_path / f"{sa}.pem", tmp_path / f"{sa}-key.pem"
    if not cert.exists():
        issue = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "ca", "issue", "--dir", str(tmp_path / "ca"),
            "--spiffe-id", f"spiffe://cluster.local/ns/{sa_ns}/sa/{sa}", "--out-cert",
            str(cert), "--out-key", str(key), "--out-bundle", str(tmp_path / "bundle.pem"),
            "--force",
        )
        assert await issue.wait() == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "hbone", "connect", "127.0.2.1:15008",
        "--authority", authority, "--cert", str(cert), "--key", str(key),
        "--ca", str(tmp_path / "bundle.pem"), *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(data)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


async def test_hbone_connect_tool_reports_each_failure_kind(mesh: Mesh, tmp_path: Path) -> None:
    server = f"127.0.2.1:{APP_PORT}"
    code, out, err = await _hbone_connect(
        tmp_path, "default", "client", server, b"tool test",
        "--expect-san", "spiffe://cluster.local/ns/shop/sa/server",
    )
    assert (code, out) == (0, b"TOOL TEST"), err
    assert "CONNECT 127.0.2.1:18080 -> 200" in err
    code, _, err = await _hbone_connect(
        tmp_path, "default", "client", server, b"x",
        "--expect-san", "spiffe://cluster.local/ns/shop/sa/impostor",
    )
    assert code == 3
    assert "not the expected" in err
    code, _, err = await _hbone_connect(tmp_path, "legacy", "intruder", server, b"x")
    assert code == 4
    assert "401" in err
    code, _, err = await _hbone_connect(tmp_path, "default", "client", "10.9.9.9:80", b"x")
    assert code == 6
    assert "400" in err
    code, _, err = await _hbone_connect(tmp_path, "default", "client", "127.0.2.1:1", b"x")
    assert code == 5
    assert "503" in err
    assert mesh.received == [b"tool test"]


async def test_thousand_concurrent_connections_over_the_pool(mesh: Mesh) -> None:
    """1,000 simultaneous client connections: 10 pooled HBONE connections of 100 streams."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(1000):  # all open at once before any is used or closed
            opened.append(await mesh.connect_via("127.0.1.1", ("127.0.2.1", APP_PORT)))

        async def exchange(i: int) -> bytes:
            reader, writer = opened[i]
            writer.write(f"c{i:04d}".encode())
            return await reader.readexactly(5)

        replies = await asyncio.gather(*(exchange(i) for i in range(1000)))
        assert sorted(replies) == sorted(f"C{i:04d}".encode() for i in range(1000))
        pod = mesh.apps["node1"].agent.pods["c1//Pod/default/client"]
        pool = pod.pool  # type: ignore[attr-defined]
        assert pool.stats() == {"connections": 10, "streams": 1000, "keys": 1}
    finally:
        for _, writer in opened:
            writer.close()


async def test_one_gib_transfer_keeps_integrity(mesh: Mesh) -> None:
    """1 GiB through outbound -> HBONE -> inbound; sha256 compared on both ends."""
    import hashlib

    chunk = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB of non-repeating-ish bytes
    total = 1 << 30
    sender_hash = hashlib.sha256()
    receiver_hash = hashlib.sha256()
    received = 0
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(1 << 18):
            receiver_hash.update(data)
            received += len(data)
        writer.write(b"done")
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.2.1", APP_PORT + 1)
    try:
        reader, writer = await mesh.connect_via("127.0.1.1", ("127.0.2.1", APP_PORT + 1))
        sent = 0
        while sent < total:
            writer.write(chunk)
            sender_hash.update(chunk)
            sent += len(chunk)
            await writer.drain()
        writer.write_eof()
        assert await reader.read() == b"done"
        await done.wait()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert received == total
    assert receiver_hash.hexdigest() == sender_hash.hexdigest()


def _inotify_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify"
    return count


async def test_stopped_agent_closes_its_config_watch(tmp_path: Path) -> None:
    """quit() cancels the config watcher during its own cleanup; its inotify descriptor must
    be closed all the same (one per agent leaked before)."""
    before = _inotify_fds()
    async with running_mesh(tmp_path, CONFIG, (), APP_PORT):
        assert _inotify_fds() == before + 2  # one watch per agent
    assert _inotify_fds() == before
