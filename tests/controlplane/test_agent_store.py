"""Agents with ``--config etcd://``: list + watch, policy changes, bad content, store outage.

Two in-process agents (``--no-redirect``, loopback pods on 127.0.141.x / 127.0.142.x) read
the config from a real etcd (TLS, each agent with its own node certificate and role).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeproxy.app import AgentApp, AgentOptions
from nodeproxy.controlplane.client import TlsClient
from nodeproxy.controlplane.endpoint import StoreSpec, parse_store_url
from nodeproxy.controlplane.source import StoreConfigSource
from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import LocalCaClient
from nodeproxy.metrics import Metrics
from nodeproxy.proxy.env import ProxyEnv
from tests.helpers.etcd import EtcdCluster
from tests.helpers.waiting import eventually
from ztunnel_cfg.snapshot import Snapshot

pytestmark = pytest.mark.uvloop  # the agent's loop; real etcd makes each test seconds long

CONFIG = textwrap.dedent(
    """
    workloads:
    - {uid: c1//Pod/default/client, name: client, namespace: default, serviceAccount: client,
       workloadIps: ["127.0.141.1"], node: node1, protocol: HBONE}
    - {uid: c1//Pod/legacy/intruder, name: intruder, namespace: legacy,
       serviceAccount: intruder, workloadIps: ["127.0.141.2"], node: node1, protocol: HBONE}
    - {uid: c1//Pod/shop/server, name: server, namespace: shop, serviceAccount: server,
       workloadIps: ["127.0.142.1"], node: node2, protocol: HBONE}
    policies:
    - name: deny-legacy
      namespace: shop
      scope: Namespace
      action: Deny
      rules: [[[{namespaces: ["legacy"]}]]]
    """
)
APP_PORT = 18141


async def apply(store: EtcdCluster, tmp_path: Path, text: str) -> None:
    """``nodeproxy config apply`` as the admin would run it (a process of its own)."""
    path = tmp_path / "desired.yaml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "config", "apply", str(path), "--store",
        store.url("admin"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode()


@dataclass
class Mesh:
    apps: dict[str, AgentApp]
    targets: dict[tuple[str, int], tuple[str, int]]

    async def talk(self, pod_ip: str, target: tuple[str, int], data: bytes = b"ping") -> bytes:
        """Send through the agent as if redirected; the echo's answer, b"" when refused."""
        sock = socket.socket()
        sock.bind((pod_ip, 0))
        sock.setblocking(False)
        self.targets[sock.getsockname()[:2]] = target
        await asyncio.get_running_loop().sock_connect(sock, (pod_ip, 15001))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(data)
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.readexactly(len(data)), 10)
            except (ConnectionResetError, asyncio.IncompleteReadError):
                return b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def source(self, node: str) -> StoreConfigSource:
        source = self.apps[node].config
        assert isinstance(source, StoreConfigSource)
        return source


@contextlib.asynccontextmanager
async def running(tmp_path: Path, store: EtcdCluster, url_for: dict[str, str] | None = None
                  ) -> AsyncIterator[Mesh]:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    targets: dict[tuple[str, int], tuple[str, int]] = {}

    def inject(env: ProxyEnv) -> None:
        env.original_dst = lambda sock: targets[sock.getpeername()[:2]]

    apps: dict[str, AgentApp] = {}
    tasks = []
    for node in ("node1", "node2"):
        url = (url_for or {}).get(node) or store.url(node)
        options = AgentOptions(
            config=url, node=node, in_pod=False, readiness_addr=("127.0.0.1", 0),
            metrics_addr=("127.0.0.1", 0), admin_addr=("127.0.0.1", 0), socket_mark=False,
            handle_signals=False, drain_timeout=1.0)
        holder: list[AgentApp] = []

        def snapshot(h: list[AgentApp] = holder) -> Snapshot:
            return h[0].env.snapshot()

        client = LocalCaClient(CertificateAuthority.load(ca_dir), node, snapshot)
        app = AgentApp(options, client, None, metrics=Metrics(), env_overrides=inject)
        holder.append(app)
        apps[node] = app
        tasks.append(asyncio.create_task(app.run()))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.142.1", APP_PORT)
    try:
        await eventually(
            lambda: all(a.started.is_set() and a.agent.ready for a in apps.values()), 30,
            lambda: "agents not ready: " + ", ".join(
                f"{n}: {a.readiness_detail() if a.config else 'no config yet'}"
                for n, a in apps.items()))
        yield Mesh(apps, targets)
    finally:
        for app in apps.values():
            await app.quit()
        await asyncio.gather(*tasks)
        server.close()
        await server.wait_closed()


def _errors(app: AgentApp) -> list[str]:
    found = app.config_dump().get("configErrors")
    return [str(e) for e in found] if isinstance(found, list) else []


def gauge(app: AgentApp, name: str) -> float:
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


async def test_agents_enforce_the_stored_policy_and_follow_changes(
        store: EtcdCluster, tmp_path: Path) -> None:
    await apply(store, tmp_path, CONFIG)
    async with running(tmp_path, store) as mesh:
        assert await mesh.talk("127.0.141.1", ("127.0.142.1", APP_PORT)) == b"PING"
        assert await mesh.talk("127.0.141.2", ("127.0.142.1", APP_PORT)) == b""  # denied
        revision = mesh.source("node2").status.revision
        assert revision > 0
        dump = mesh.apps["node1"].config_dump()
        assert dump["configStore"]["state"] == "live"  # type: ignore[index]
        assert gauge(mesh.apps["node1"], "nodeproxy_config_store_connected") == 1.0
        # Remove the deny policy: both agents converge and the intruder gets through.
        await apply(store, tmp_path, CONFIG.split("policies:")[0])
        await eventually(lambda: all(mesh.source(n).status.revision > revision
                                     for n in mesh.apps), 10, "agents saw the change")
        assert not mesh.apps["node2"].env.snapshot().config.policies
        assert await mesh.talk("127.0.141.2", ("127.0.142.1", APP_PORT)) == b"PING"


async def test_invalid_store_content_never_replaces_the_last_good_snapshot(
        store: EtcdCluster, tmp_path: Path) -> None:
    await apply(store, tmp_path, CONFIG)
    async with running(tmp_path, store) as mesh:
        good = mesh.apps["node2"].env.snapshot()
        key = "/nodeproxy/v1/policies/shop/deny-legacy"
        store.etcdctl(["put", key, json.dumps({"name": "deny-legacy", "namespace": "shop",
                                               "scope": "Nowhere", "action": "Deny"})])
        await eventually(lambda: mesh.source("node2").state.fail_count >= 1, 10,
                         "the bad value was seen")
        assert mesh.apps["node2"].env.snapshot() is good
        errors = _errors(mesh.apps["node2"])
        assert any(key in e and "scope" in e for e in errors)
        assert await mesh.talk("127.0.141.2", ("127.0.142.1", APP_PORT)) == b""  # still denied
        # An unknown key is named too; fixing the store recovers.
        store.etcdctl(["put", "/nodeproxy/v1/gadgets/x/y", "{}"])
        await eventually(lambda: any("/nodeproxy/v1/gadgets/x/y" in e
                                     for e in _errors(mesh.apps["node1"])), 10, "bad key named")
        store.etcdctl(["del", "/nodeproxy/v1/gadgets/x/y"])
        await apply(store, tmp_path, CONFIG)
        await eventually(lambda: mesh.source("node2").state.last_error is None, 10, "recovered")


async def test_store_outage_keeps_serving_says_stale_and_resyncs(
        store: EtcdCluster, tmp_path: Path) -> None:
    await apply(store, tmp_path, CONFIG)
    member = store.members[0]
    async with running(tmp_path, store) as mesh:
        store.stop(member)
        try:
            await eventually(lambda: all(mesh.source(n).status.stale() for n in mesh.apps), 15,
                             "agents noticed the store is gone")
            app = mesh.apps["node1"]
            assert "config stale" in app.readiness_detail()
            assert app.readiness_summary().endswith("config stale")
            assert app.agent.ready  # never un-enrolled because the store went away
            assert app.config_dump()["configStore"]["state"] == "stale"  # type: ignore[index]
            assert gauge(app, "nodeproxy_config_store_connected") == 0.0
            await eventually(lambda: gauge(app, "nodeproxy_config_stale_seconds") > 0, 5,
                             "stale seconds grow")
            assert await mesh.talk("127.0.141.1", ("127.0.142.1", APP_PORT)) == b"PING"
            assert await mesh.talk("127.0.141.2", ("127.0.142.1", APP_PORT)) == b""
        finally:
            store.start(member)
            store.wait_healthy(store.members)
        await eventually(lambda: not any(mesh.source(n).status.stale() for n in mesh.apps), 30,
                         "agents reconnected")
        before = mesh.source("node2").status.revision
        await apply(store, tmp_path, CONFIG.split("policies:")[0])
        await eventually(lambda: mesh.source("node2").status.revision > before, 10,
                         "change after the outage applied")
        assert await mesh.talk("127.0.141.2", ("127.0.142.1", APP_PORT)) == b"PING"


class _CompactedOnce(TlsClient):
    fired: list[int] = []

    async def watch_prefix(self, *args: object, **kwargs: object) -> object:
        if not self.fired:
            from aetcd.exceptions import RevisionCompactedError

            self.fired.append(1)
            raise RevisionCompactedError(99)
        return await super().watch_prefix(*args, **kwargs)


async def test_a_compacted_watch_relists(store: EtcdCluster, tmp_path: Path) -> None:
    await apply(store, tmp_path, CONFIG)
    snapshots: list[Snapshot] = []
    spec: StoreSpec = parse_store_url(store.url("node1"))
    source = StoreConfigSource(spec, snapshots.append, client_factory=_CompactedOnce,
                               backoff_base=0.01)
    runner = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.status.relists >= 1 and source.status.connected, 10,
                         "re-listed after compaction")
        await apply(store, tmp_path, CONFIG.split("policies:")[0])
        await eventually(lambda: snapshots and not snapshots[-1].config.policies, 10,
                         "the watch after the re-list delivers changes")
    finally:
        source.stop()
        await runner


async def nodes(store: EtcdCluster, *extra: str) -> tuple[int, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "nodes", "--store", store.url("admin"), "-o", "json",
        *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    assert out, err.decode()
    return proc.returncode, json.loads(out)


async def test_agents_register_and_nodes_shows_convergence(
        store: EtcdCluster, tmp_path: Path) -> None:
    await apply(store, tmp_path, CONFIG)
    async with running(tmp_path, store) as mesh:
        code, fleet = await nodes(store, "--wait", "20", "--expect", "2")
        assert code == 0, fleet
        members = {m["name"]: m for m in fleet["members"]}  # type: ignore[attr-defined]
        assert set(members) == {"node1", "node2"}
        assert members["node1"]["enrolled"] == ["c1//Pod/default/client",
                                                "c1//Pod/legacy/intruder"]
        assert members["node2"]["configRevision"] == fleet["latestRevision"]
        assert all(m["kind"] == "agent" and m["converged"] for m in members.values())
        await apply(store, tmp_path, CONFIG.split("policies:")[0])
        code, after = await nodes(store, "--wait", "20", "--expect", "2")
        assert code == 0, after
        assert after["latestRevision"] > fleet["latestRevision"]  # type: ignore[operator]
        assert mesh.apps["node1"].registrar is not None
    # A clean stop revokes the leases: the fleet is empty at once.
    code, gone = await nodes(store)
    assert gone["members"] == []


async def test_fetch_snapshot_reads_the_store_once(store: EtcdCluster, tmp_path: Path) -> None:
    """What `waypoint run` uses to pick its workload before its loop starts."""
    from nodeproxy.controlplane.wiring import fetch_snapshot

    await apply(store, tmp_path, CONFIG)
    snapshot = await fetch_snapshot(store.url("node1"))
    assert {w.name for w in snapshot.config.workloads} == {"client", "intruder", "server"}
    assert [p.name for p in snapshot.config.policies] == ["deny-legacy"]
