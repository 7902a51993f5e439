"""The namespace cluster itself, without any proxy: routing, addressing, capture, teardown."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

from meshlab import Cluster, ClusterSpec, LabError, plan_cluster, random_prefix, sweep
from meshlab.build import list_netns, netns_pids
from tests.netns.conftest import MakeCluster


def _root_links() -> str:
    return subprocess.run(
        ["ip", "-br", "link"], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.privileged
def test_cross_node_pod_to_pod_and_source_ip_is_preserved(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=2, pods_per_node=2)
    c.serve("n2p1", 8080, tag="server-n2p1")
    [res] = c.connect("n1p2", f"{c.pod('n2p1').ip}:8080", "hello across nodes")
    assert res["ok"], res
    assert res["tag"] == "server-n2p1"
    assert res["echo"] == "hello across nodes"
    assert res["seen_from"].split(":")[0] == c.pod("n1p2").ip == "10.251.1.3"


@pytest.mark.privileged
def test_same_node_pod_to_pod(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=2, pods_per_node=3)
    c.serve("n1p3", 9000, tag="n1p3")
    results = c.connect("n1p1", "10.251.1.4:9000", "local", count=3)
    assert [r["ok"] for r in results] == [True] * 3, results
    assert {r["seen_from"].split(":")[0] for r in results} == {"10.251.1.2"}


@pytest.mark.privileged
def test_nodes_and_pods_reach_the_fabric_address(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=3, pods_per_node=1)
    c.serve("fabric", 7000, tag="ca")
    for who, src in [("node1", "10.250.0.11"), ("node3", "10.250.0.13"), ("n2p1", "10.251.2.2")]:
        [res] = c.connect(who, "10.250.0.1:7000", "x")
        assert res["ok"], (who, res)
        assert res["seen_from"].startswith(src + ":"), (who, res)


@pytest.mark.privileged
def test_node_has_forwarding_on_and_expected_routes(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=3, pods_per_node=2)
    fwd = c.exec("node2", ["cat", "/proc/sys/net/ipv4/ip_forward"], check=True)
    assert fwd.stdout.strip() == "1"
    routes = c.exec("node2", ["ip", "-4", "route"], check=True).stdout
    assert "10.251.1.0/24 via 10.250.0.11 dev eth0" in routes
    assert "10.251.3.0/24 via 10.250.0.13 dev eth0" in routes
    assert "10.251.2.0/24 via" not in routes  # own pods are direct /32 routes
    assert "10.251.2.3 dev p2" in routes
    pod_routes = c.exec("n2p2", ["ip", "-4", "route"], check=True).stdout
    assert "default via 10.251.2.1 dev eth0" in pod_routes


@pytest.mark.privileged
def test_capture_on_node_link_sees_plaintext_marker_without_mesh(lab_cluster: MakeCluster) -> None:
    """Proves the capture tool works, so the mesh test's 'marker never seen' is meaningful."""
    c = lab_cluster(nodes=2, pods_per_node=2)
    c.serve("n2p2", 8080, tag="b")
    cap = c.capture("node1")  # node1's link to the fabric (eth0)
    marker = "MARKER-" + random_prefix("plain")
    [res] = c.connect("n1p1", "10.251.2.3:8080", marker)
    result = cap.stop()
    assert res["ok"], res
    assert result.contains(marker.encode())
    flows = result.flows()
    assert any(f[0] == "10.251.1.2" and f[1] == "10.251.2.3" and f[3] == 8080 for f in flows), flows
    assert any(marker.encode() in p.payload for p in result.packets)
    assert not result.contains(b"MARKER-never-sent")


@pytest.mark.privileged
def test_same_node_traffic_does_not_cross_the_node_link(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=2, pods_per_node=2)
    c.serve("n1p2", 8080)
    cap = c.capture("node1")
    [res] = c.connect("n1p1", "10.251.1.3:8080", "stays-on-node1")
    result = cap.stop()
    assert res["ok"], res
    assert not result.contains(b"stays-on-node1")
    assert result.packets == ()


@pytest.mark.privileged
def test_app_server_records_received_bytes(lab_cluster: MakeCluster, tmp_path: Path) -> None:
    c = lab_cluster(nodes=1, pods_per_node=2)
    record = tmp_path / "received.bin"
    c.serve("n1p2", 8080, record=str(record))
    assert record.read_bytes() == b""
    c.connect("n1p1", "10.251.1.3:8080", "first")
    c.connect("n1p1", "10.251.1.3:8080", "second")
    assert record.read_bytes() == b"firstsecond"


@pytest.mark.privileged
def test_client_reports_refused_connection(lab_cluster: MakeCluster) -> None:
    c = lab_cluster(nodes=2, pods_per_node=1)
    [res] = c.connect("n1p1", "10.251.2.2:8081", "nobody listens", timeout=2)
    assert res["ok"] is False
    assert "ConnectionRefused" in res["error"]


@pytest.mark.privileged
def test_teardown_removes_everything_and_kills_processes(lab_cluster: MakeCluster) -> None:
    before = _root_links()
    c = lab_cluster(nodes=2, pods_per_node=3)
    assert _root_links() == before  # nothing is created in the root namespace
    names = set(c.plan.all_netns())
    assert names <= set(list_netns())
    assert len(names) == 1 + 2 + 6
    server = c.serve("n1p1", 8080)
    c.destroy()
    assert server.wait(timeout=5) is not None
    assert not [n for n in list_netns() if n.startswith(c.prefix)]
    c.destroy()  # converges: a second teardown is a no-op


@pytest.mark.privileged
def test_two_clusters_with_same_addresses_are_isolated(lab_cluster: MakeCluster) -> None:
    a = lab_cluster(nodes=2, pods_per_node=1)
    b = lab_cluster(nodes=2, pods_per_node=1)
    a.serve("n2p1", 8080, tag="cluster-a")
    b.serve("n2p1", 8080, tag="cluster-b")
    assert a.connect("n1p1", "10.251.2.2:8080")[0]["tag"] == "cluster-a"
    assert b.connect("n1p1", "10.251.2.2:8080")[0]["tag"] == "cluster-b"


@pytest.mark.privileged
def test_failed_create_rolls_back() -> None:
    plan = plan_cluster(ClusterSpec(random_prefix(), nodes=2, pods_per_node=2))
    bad_node = dataclasses.replace(plan.nodes[1], ip="10.250.0.999")
    broken = dataclasses.replace(plan, nodes=(plan.nodes[0], bad_node))
    with pytest.raises(LabError, match="building the namespace cluster failed"):
        Cluster.create(broken)
    assert not [n for n in list_netns() if n.startswith(plan.prefix)]


@pytest.mark.privileged
def test_create_refuses_existing_namespaces_and_sweep_removes_leftovers() -> None:
    plan = plan_cluster(ClusterSpec(random_prefix(), nodes=1, pods_per_node=1))
    crashed = Cluster.create(plan)  # a "crashed run": never destroyed by its owner
    holder = crashed.popen("n1p1", ["sleep", "300"])
    # `ip netns exec` enters the namespace just after the fork: wait until it is inside, or
    # the sweep below could miss it and the test would race.
    deadline = time.monotonic() + 5
    while holder.pid not in netns_pids([plan.pod("n1p1").netns]):
        assert time.monotonic() < deadline, "sleep never entered the pod namespace"
        time.sleep(0.01)
    try:
        with pytest.raises(LabError, match="already exist"):
            Cluster.create(plan)
        removed = sweep(plan.prefix)
        assert sorted(removed) == sorted(plan.all_netns())
        assert holder.wait(timeout=5) is not None  # processes inside were ended
        assert not [n for n in list_netns() if n.startswith(plan.prefix)]
    finally:
        crashed.destroy()


@pytest.mark.privileged
def test_context_manager_tears_down_on_error() -> None:
    plan = plan_cluster(ClusterSpec(random_prefix(), nodes=1, pods_per_node=1))
    seen: list[str] = []

    def use_and_fail() -> None:
        with Cluster.create(plan):
            seen.extend(list_netns())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_and_fail()
    assert set(plan.all_netns()) <= set(seen)
    assert not [n for n in list_netns() if n.startswith(plan.prefix)]
