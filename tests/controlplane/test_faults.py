"""Fault tests: a 3-member etcd cluster (TLS, roles), one member per network namespace.

- one member killed: agents continue, `config apply` still lands, agents converge;
- every member stopped: agents keep serving the last good snapshot, readiness says stale;
- members back: agents resync, including a change made while they were cut off (their only
  endpoint was down) that the other members had.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.conftest import NODES
from tests.controlplane.test_agent_store import APP_PORT, CONFIG, apply, running
from tests.helpers.etcd import EtcdCluster, cluster, setup_auth
from tests.helpers.etcd_netns import EtcdNetns
from tests.helpers.etcd_pki import EtcdPki
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.uvloop]
NO_POLICY = CONFIG.split("policies:")[0]
SERVER = ("127.0.142.1", APP_PORT)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    root: Path = tmp_path_factory.mktemp("etcd3")
    net = EtcdNetns().create()
    try:
        c = cluster(root, net.hosts, net.namespaces, EtcdPki(root / "pki", ips=net.hosts))
        c.start()
        try:
            setup_auth(c, NODES)
            yield c
        finally:
            c.close()
    finally:
        net.close()


@pytest.fixture
def store3(three: EtcdCluster) -> EtcdCluster:
    for m in three.members:  # every member up and the prefix empty
        if m.proc is None or m.proc.poll() is not None:
            three.start(m)
    three.wait_healthy(three.members)
    three.etcdctl(["del", "--prefix", "/nodeproxy/"])
    return three


async def test_one_member_down_agents_continue_and_changes_apply(
        store3: EtcdCluster, tmp_path: Path) -> None:
    await apply(store3, tmp_path, CONFIG)
    async with running(tmp_path, store3) as mesh:
        before = {n: mesh.source(n).status.revision for n in mesh.apps}
        store3.kill(store3.members[0])
        # If it was the leader, the other two elect one first (a linearizable read passes).
        store3.wait_healthy(store3.members[1:])
        await apply(store3, tmp_path, NO_POLICY)  # 2 of 3: quorum
        await eventually(lambda: all(mesh.source(n).status.revision > before[n]
                                     and not mesh.source(n).status.stale() for n in mesh.apps),
                         30, lambda: "agents did not converge: " + "; ".join(
                             mesh.apps[n].readiness_detail() for n in mesh.apps))
        assert not mesh.apps["node2"].env.snapshot().config.policies
        assert await mesh.talk("127.0.141.2", SERVER) == b"PING"
        assert all(a.agent.ready for a in mesh.apps.values())


async def test_all_down_keeps_serving_then_resyncs_changes_made_meanwhile(
        store3: EtcdCluster, tmp_path: Path) -> None:
    m0, m1, m2 = store3.members
    await apply(store3, tmp_path, CONFIG)
    only_m0 = {n: store3.url(n, members=[m0]) for n in ("node1", "node2")}
    async with running(tmp_path, store3, url_for=only_m0) as mesh:
        good = mesh.source("node2").status.revision
        store3.stop(m0)  # the agents' only endpoint: they are cut off
        await eventually(lambda: all(mesh.source(n).status.stale() for n in mesh.apps), 20,
                         "agents noticed")
        store3.wait_healthy([m1, m2])  # a leader among the two
        await apply(store3, tmp_path, NO_POLICY)  # lands on m1 + m2 while the agents are away
        assert await mesh.talk("127.0.141.2", SERVER) == b""  # last good: still denied
        store3.stop(m1)
        store3.stop(m2)  # every member down
        for node, app in mesh.apps.items():
            assert "config stale" in app.readiness_detail(), node
            assert app.agent.ready  # pods stay enrolled
        assert mesh.source("node2").status.revision == good
        assert await mesh.talk("127.0.141.1", SERVER) == b"PING"  # still serving
        assert await mesh.talk("127.0.141.2", SERVER) == b""
        for m in (m0, m1, m2):
            store3.start(m)
        store3.wait_healthy(store3.members)
        # m0 caught up from its peers; the agents re-list through it and get the change.
        await eventually(lambda: all(not mesh.source(n).status.stale()
                                     and mesh.source(n).status.revision > good
                                     for n in mesh.apps), 30,
                         lambda: "agents did not resync: " + "; ".join(
                             mesh.apps[n].readiness_detail() for n in mesh.apps))
        assert not mesh.apps["node2"].env.snapshot().config.policies
        assert await mesh.talk("127.0.141.2", SERVER) == b"PING"
