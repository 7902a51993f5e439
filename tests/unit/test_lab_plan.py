"""Pure parts of the namespace lab: the plan, its ip-batch rendering, the config renderer and
the pcap reader."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from meshlab.apps import greeting, parse_reply
from meshlab.build import is_lab_netns
from meshlab.capture import CaptureResult, parse_pcap
from meshlab.config import PodRole, ServiceDef, dump_config, render_config
from meshlab.topology import (
    ClusterPlan,
    ClusterSpec,
    LabError,
    plan_cluster,
    random_prefix,
    render_stages,
)
from ztunnel_cfg import load_config_text

# -- plan_cluster --------------------------------------------------------------------------


def test_names_and_addresses_of_a_small_cluster() -> None:
    plan = plan_cluster(ClusterSpec("np1a2b-", nodes=2, pods_per_node=2))
    assert plan.fabric_netns == "np1a2b-fab"
    assert plan.fabric_ip == "10.250.0.1"
    assert [(n.name, n.netns, n.ip, n.pod_cidr, n.pod_gateway) for n in plan.nodes] == [
        ("node1", "np1a2b-n1", "10.250.0.11", "10.251.1.0/24", "10.251.1.1"),
        ("node2", "np1a2b-n2", "10.250.0.12", "10.251.2.0/24", "10.251.2.1"),
    ]
    assert [(p.name, p.netns, p.ip, p.node, p.node_iface) for p in plan.pods] == [
        ("n1p1", "np1a2b-n1p1", "10.251.1.2", "node1", "p1"),
        ("n1p2", "np1a2b-n1p2", "10.251.1.3", "node1", "p2"),
        ("n2p1", "np1a2b-n2p1", "10.251.2.2", "node2", "p1"),
        ("n2p2", "np1a2b-n2p2", "10.251.2.3", "node2", "p2"),
    ]
    assert plan.pod("n2p1").netns_path == "/var/run/netns/np1a2b-n2p1"
    assert plan.all_netns()[0] == "np1a2b-fab"
    assert len(plan.all_netns()) == 7


@pytest.mark.parametrize(("nodes", "pods"), [(1, 1), (2, 3), (5, 7), (200, 2), (3, 250)])
def test_plan_invariants(nodes: int, pods: int) -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=nodes, pods_per_node=pods))
    ips = [p.ip for p in plan.pods] + [n.ip for n in plan.nodes] + [plan.fabric_ip]
    assert len(set(ips)) == len(ips)
    assert len(set(plan.all_netns())) == 1 + nodes + nodes * pods
    for node in plan.nodes:
        cidr = ipaddress.ip_network(node.pod_cidr)
        assert ipaddress.ip_address(node.pod_gateway) in cidr
        assert ipaddress.ip_address(node.ip) in ipaddress.ip_network(plan.fabric_cidr)
        assert len(plan.pods_on(node.name)) == pods
        for pod in plan.pods_on(node.name):
            assert ipaddress.ip_address(pod.ip) in cidr
            assert pod.gateway == node.pod_gateway
    names = [plan.bridge] + [n.uplink for n in plan.nodes] + [n.fabric_port for n in plan.nodes]
    names += [p.iface for p in plan.pods] + [p.node_iface for p in plan.pods]
    assert max(len(n) for n in names) <= 15


@pytest.mark.parametrize(
    "spec",
    [
        ClusterSpec(""),
        ClusterSpec("Has Space"),
        ClusterSpec("x" * 25),
        ClusterSpec("np/../"),
        ClusterSpec("np0000-", nodes=0),
        ClusterSpec("np0000-", nodes=201),
        ClusterSpec("np0000-", pods_per_node=0),
        ClusterSpec("np0000-", pods_per_node=251),
    ],
)
def test_invalid_specs_are_rejected_with_a_hint(spec: ClusterSpec) -> None:
    with pytest.raises(LabError) as err:
        plan_cluster(spec)
    assert err.value.hint


def test_random_prefixes_are_valid_and_distinct() -> None:
    prefixes = {random_prefix() for _ in range(50)}
    assert len(prefixes) > 40
    for p in prefixes:
        assert p.startswith("np")
        assert p.endswith("-")
        assert len(p) == 7
        plan_cluster(ClusterSpec(p))


def test_lookups() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=2, pods_per_node=2))
    assert plan.node("node2") is plan.node("np0000-n2") is plan.node("n2")
    assert plan.pod("n1p2") is plan.pod("np0000-n1p2") is plan.pod("10.251.1.3")
    with pytest.raises(LabError, match="no pod"):
        plan.pod("n3p1")
    with pytest.raises(LabError, match="no node"):
        plan.node("node9")


# -- render_stages -------------------------------------------------------------------------


def test_stages_create_namespaces_first_and_configure_each_namespace_once() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=3, pods_per_node=2))
    create, fabric, nodes, pods = render_stages(plan)
    assert create[0].netns is None
    assert list(create[0].lines) == [f"netns add {n}" for n in plan.all_netns()]
    assert [b.netns for b in fabric] == ["np0000-fab"]
    assert [b.netns for b in nodes] == ["np0000-n1", "np0000-n2", "np0000-n3"]
    assert [b.netns for b in pods] == [p.netns for p in plan.pods]
    fab = fabric[0].lines
    assert "link add n2 type veth peer name eth0 netns np0000-n2" in fab
    assert "link set n2 master br0" in fab
    assert "route add 10.251.3.0/24 via 10.250.0.13 onlink dev br0" in fab


def test_node_batch_routes_to_other_nodes_only_and_to_each_pod() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=3, pods_per_node=2))
    node2 = render_stages(plan)[2][1].lines
    assert "addr add 10.250.0.12/24 dev eth0" in node2
    assert "route add 10.251.1.0/24 via 10.250.0.11 dev eth0" in node2
    assert "route add 10.251.3.0/24 via 10.250.0.13 dev eth0" in node2
    assert not any("10.251.2.0/24" in line for line in node2)
    assert "link add p2 type veth peer name eth0 netns np0000-n2p2" in node2
    assert "addr add 10.251.2.1/32 dev p2" in node2
    assert "route add 10.251.2.3/32 dev p2 src 10.251.2.1" in node2


def test_pod_batch_uses_onlink_gateway() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=1, pods_per_node=1))
    assert render_stages(plan)[3][0].lines == (
        "link set lo up",
        "addr add 10.251.1.2/32 dev eth0",
        "link set eth0 up",
        "route add 10.251.1.1/32 dev eth0 scope link",
        "route add default via 10.251.1.1 dev eth0 src 10.251.1.2",
    )


@pytest.mark.parametrize(
    ("name", "glob", "expected"),
    [
        ("np1a2b-fab", "np1a2b-", True),
        ("np1a2b-n1", "np1a2b-", True),
        ("np1a2b-n12p3", "np1a2b-", True),
        ("np1a2b-n1p3", "np????-", True),
        ("np1a2b-n1p3", "np*", True),
        ("np1a2b-other", "np1a2b-", False),  # not a lab name: never touched
        ("np1a2b0-n1", "np1a2b-", False),  # another run's prefix
        ("np1a2b-n1", "np", False),  # a bare stem is not a prefix
        ("npx-exp", "np*", False),
    ],
)
def test_is_lab_netns(name: str, glob: str, expected: bool) -> None:
    assert is_lab_netns(name, glob) is expected


# -- render_config -------------------------------------------------------------------------


def _doc() -> tuple[ClusterPlan, dict[str, Any]]:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=2, pods_per_node=2))
    roles = {
        "n1p1": PodRole(name="client", service_account="client"),
        "n1p2": PodRole(name="legacy", mesh=False),
        "n2p1": PodRole(name="echo-1", namespace="apps", service_account="echo"),
        "n2p2": PodRole(name="echo-2", namespace="apps", service_account="echo"),
    }
    svc = ServiceDef("echo", "10.96.0.10", {80: 8080}, ["echo-1", "n2p2"], namespace="apps")
    policy = {
        "name": "allow-client", "namespace": "apps", "scope": "Namespace", "action": "Allow",
        "rules": [[[{"principals": ["spiffe://cluster.local/ns/default/sa/client"]}]]],
    }
    return plan, render_config(plan, roles, [svc], [policy])


def test_render_config_workloads_services_policies() -> None:
    _plan, doc = _doc()
    wl = {w["name"]: w for w in doc["workloads"]}
    assert wl["client"] == {
        "uid": "cluster1//v1/Pod/default/client",
        "name": "client",
        "namespace": "default",
        "serviceAccount": "client",
        "workloadIps": ["10.251.1.2"],
        "node": "node1",
        "protocol": "HBONE",
        "netns": "/var/run/netns/np0000-n1p1",
        "cgroup": "/sys/fs/cgroup/unified/nodeproxy-lab/np0000-n1p1",
    }
    assert wl["legacy"]["protocol"] == "TCP"
    assert "netns" not in wl["legacy"]  # no agent may enroll a pod outside the mesh
    key = "apps/echo.apps.svc.cluster.local"
    assert wl["echo-1"]["services"] == {key: {80: 8080}}
    assert wl["echo-2"]["services"] == {key: {80: 8080}}
    assert "services" not in wl["client"]
    assert doc["services"] == [{
        "name": "echo", "namespace": "apps", "hostname": "echo.apps.svc.cluster.local",
        "vips": ["/10.96.0.10"], "ports": {80: 8080},
    }]
    assert doc["policies"][0]["name"] == "allow-client"


def test_rendered_config_is_accepted_by_the_loader() -> None:
    _plan, doc = _doc()
    cfg = load_config_text(dump_config(doc), "lab.yaml")
    assert sorted(w.name for w in cfg.workloads) == ["client", "echo-1", "echo-2", "legacy"]
    assert len(cfg.services) == 1
    assert len(cfg.policies) == 1


def test_default_roles_and_errors() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=1, pods_per_node=2))
    doc = render_config(plan)
    assert [(w["name"], w["protocol"], w["serviceAccount"]) for w in doc["workloads"]] == [
        ("n1p1", "HBONE", "default"), ("n1p2", "HBONE", "default"),
    ]
    with pytest.raises(LabError, match="unknown pods: n9p9"):
        render_config(plan, {"n9p9": PodRole()})
    with pytest.raises(LabError, match="unknown endpoint pod 'ghost'"):
        render_config(plan, services=[ServiceDef("s", "10.96.0.1", {80: 80}, ["ghost"])])


# -- pcap reader ---------------------------------------------------------------------------


def _pcap(frames: list[bytes], linktype: int = 1, endian: str = "<") -> bytes:
    out = struct.pack(endian + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for frame in frames:
        out += struct.pack(endian + "IIII", 0, 0, len(frame), len(frame)) + frame
    return out


def _tcp_frame(
    src: str, dst: str, sport: int, dport: int, payload: bytes = b"", flags: int = 0x18,
    eth: bool = True,
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    ) + tcp
    return (b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip) if eth else ip


def test_parse_pcap_ethernet_both_byte_orders() -> None:
    frames = [
        _tcp_frame("10.251.1.2", "10.251.2.2", 40000, 15008, b"\x16\x03\x01"),
        _tcp_frame("10.251.2.2", "10.251.1.2", 15008, 40000, flags=0x10),
        b"\x02" * 12 + b"\x08\x06" + b"\x00" * 28,  # ARP: skipped
    ]
    for endian in "<>":
        pkts = parse_pcap(_pcap(frames, endian=endian))
        assert [(p.flow, p.payload) for p in pkts] == [
            (("10.251.1.2", "10.251.2.2", 40000, 15008), b"\x16\x03\x01"),
            (("10.251.2.2", "10.251.1.2", 15008, 40000), b""),
        ]


def test_parse_pcap_raw_ip_padding_and_truncation() -> None:
    frame = _tcp_frame("1.2.3.4", "5.6.7.8", 1, 2, b"abc", eth=False) + b"\x00\x00"  # padding
    data = _pcap([frame], linktype=101)
    pkts = parse_pcap(data)
    assert [p.payload for p in pkts] == [b"abc"]
    assert parse_pcap(data[:-5]) == []  # killed mid-write: partial record ignored
    assert parse_pcap(b"") == []
    with pytest.raises(LabError, match="not a pcap"):
        parse_pcap(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40)


def test_capture_result_helpers() -> None:
    frames = [
        _tcp_frame("10.0.0.1", "10.0.0.2", 5000, 15008, b"xx-MARK"),
        _tcp_frame("10.0.0.1", "10.0.0.2", 5000, 15008, b"ER-yy"),
        _tcp_frame("10.0.0.2", "10.0.0.1", 15008, 5000),
    ]
    raw = _pcap(frames)
    res = CaptureResult(raw, tuple(parse_pcap(raw)))
    assert res.flows() == [("10.0.0.1", "10.0.0.2", 5000, 15008),
                           ("10.0.0.2", "10.0.0.1", 15008, 5000)]
    assert res.ports() == {5000, 15008}
    assert res.payload_bytes() == 12
    assert res.contains(b"xx-MARK")
    assert not res.contains(b"MARKER")  # split across packets: not a plaintext occurrence


# -- apps wire format ----------------------------------------------------------------------


def test_greeting_round_trip() -> None:
    data = greeting("echo-1", ("10.251.1.2", 41000)) + b"payload\nmore"
    assert parse_reply(data) == ("echo-1", "10.251.1.2:41000", b"payload\nmore")
    assert parse_reply(b"no newline") == (None, None, b"")
