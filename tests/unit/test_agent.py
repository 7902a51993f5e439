"""Agent convergence: enroll / un-enroll / fail closed / readiness, with injected fakes."""

from __future__ import annotations

import pytest

from nodeproxy.agent import Agent
from nodeproxy.errors import ProxyError
from nodeproxy.metrics import Metrics
from ztunnel_cfg.loader import load_config_text
from ztunnel_cfg.model import Workload
from ztunnel_cfg.snapshot import Snapshot


def snapshot(*pods: tuple[str, str, str]) -> Snapshot:
    """pods: (name, node, ip)."""
    entries = [
        f"- {{uid: c//Pod/default/{name}, name: {name}, namespace: default, "
        f"workloadIps: ['{ip}'], node: {node}, netns: /var/run/netns/{name}}}"
        for name, node, ip in pods
    ]
    return Snapshot.build(load_config_text("workloads:\n" + "\n".join(entries) + "\n"))


class FakeRedirector:
    def __init__(self, fail_for: set[str] | None = None) -> None:
        self.installed: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail_for = fail_for or set()

    def install(self, netns: str) -> None:
        self.calls.append(("install", netns))
        self.installed.add(netns)

    def remove(self, netns: str) -> None:
        self.calls.append(("remove", netns))
        self.installed.discard(netns)


class FakePod:
    def __init__(self, workload: Workload, fail: bool) -> None:
        self.workload = workload
        self.fail = fail
        self.started = False
        self.closed = False

    async def start(self) -> None:
        if self.fail:
            raise ProxyError("cannot bind 0.0.0.0:15001 in pod", hint="port taken")
        self.started = True

    async def close(self, drain_timeout: float) -> None:
        self.closed = True

    def update(self, workload: Workload) -> None:
        self.workload = workload


class Factory:
    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.made: list[FakePod] = []

    async def __call__(self, workload: Workload) -> FakePod:
        pod = FakePod(workload, workload.name in self.failing)
        self.made.append(pod)
        return pod


@pytest.fixture
def parts() -> tuple[Agent, FakeRedirector, Factory]:
    redirector, factory = FakeRedirector(), Factory()
    return Agent("node1", factory, Metrics(), redirector), redirector, factory


async def test_enrolls_only_this_nodes_pods(parts: tuple[Agent, FakeRedirector, Factory]) -> None:
    agent, redirector, _ = parts
    await agent.apply(snapshot(("a", "node1", "10.0.0.1"), ("b", "node2", "10.0.0.2")))
    assert set(agent.pods) == {"c//Pod/default/a"}
    assert redirector.installed == {"/var/run/netns/a"}
    assert agent.ready


async def test_removed_pod_is_drained_and_rules_removed(
    parts: tuple[Agent, FakeRedirector, Factory],
) -> None:
    agent, redirector, factory = parts
    await agent.apply(snapshot(("a", "node1", "10.0.0.1"), ("c", "node1", "10.0.0.3")))
    await agent.apply(snapshot(("c", "node1", "10.0.0.3")))
    assert set(agent.pods) == {"c//Pod/default/c"}
    assert factory.made[0].closed
    assert redirector.installed == {"/var/run/netns/c"}
    assert not factory.made[1].closed  # the unaffected pod was left alone


def _gauge(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def test_failed_start_keeps_rules_so_traffic_is_refused_not_plaintext() -> None:
    redirector, factory, metrics = FakeRedirector(), Factory(), Metrics()
    agent = Agent("node1", factory, metrics, redirector)
    factory.failing.add("a")
    await agent.apply(snapshot(("a", "node1", "10.0.0.1")))
    assert agent.pods == {}
    # Fail closed: the rules stay, so the pod's connections reach ports nobody listens on.
    assert redirector.installed == {"/var/run/netns/a"}
    assert ("remove", "/var/run/netns/a") not in redirector.calls
    assert not agent.ready
    assert "cannot bind" in agent.readiness_detail()
    # The public readiness text (0.0.0.0:15021) names no pod and no error.
    assert agent.readiness_summary() == "not ready: 0 of 1 pods enrolled"
    assert _gauge(metrics, "nodeproxy_unenrolled_pods") == 1
    assert _gauge(metrics, "nodeproxy_enrollment_failures_total") == 1
    await agent.retry_failed()  # still failing: the rules are never flipped off in between
    assert ("remove", "/var/run/netns/a") not in redirector.calls
    assert _gauge(metrics, "nodeproxy_enrollment_failures_total") == 2
    factory.failing.clear()
    await agent.retry_failed()
    assert agent.ready
    assert agent.readiness_summary() == "ready"
    assert redirector.installed == {"/var/run/netns/a"}
    assert _gauge(metrics, "nodeproxy_unenrolled_pods") == 0


async def test_failed_pod_removed_from_config_loses_its_rules(
    parts: tuple[Agent, FakeRedirector, Factory],
) -> None:
    agent, redirector, factory = parts
    factory.failing.add("a")
    await agent.apply(snapshot(("a", "node1", "10.0.0.1"), ("c", "node1", "10.0.0.3")))
    await agent.apply(snapshot(("c", "node1", "10.0.0.3")))  # explicit removal from the mesh
    assert redirector.installed == {"/var/run/netns/c"}
    assert agent.failures == {}
    assert agent.ready


async def test_shutdown_keeps_rules_unless_cleanup(
    parts: tuple[Agent, FakeRedirector, Factory],
) -> None:
    agent, redirector, _ = parts
    await agent.apply(snapshot(("a", "node1", "10.0.0.1")))
    await agent.shutdown()
    assert redirector.installed == {"/var/run/netns/a"}  # fail closed while down
    cleanup = Agent("node1", Factory(), Metrics(), redirector, cleanup_on_exit=True)
    await cleanup.apply(snapshot(("a", "node1", "10.0.0.1")))
    await cleanup.shutdown()
    assert redirector.installed == set()


async def test_reapply_is_idempotent(parts: tuple[Agent, FakeRedirector, Factory]) -> None:
    agent, redirector, factory = parts
    snap = snapshot(("a", "node1", "10.0.0.1"))
    await agent.apply(snap)
    await agent.apply(snap)
    assert len(factory.made) == 1
    assert redirector.calls == [("install", "/var/run/netns/a")]
