"""Pure plan of a multi-node cluster made of network namespaces.

Nothing here touches the system: :func:`plan_cluster` turns a :class:`ClusterSpec` into
names and addresses, and :func:`render_stages` turns the plan into ``ip -batch`` command
lists that :mod:`meshlab.build` executes.  Layout (see docs/lab.md)::

    fabric netns <prefix>fab: bridge br0 10.250.0.1/24, ports n1, n2, ...
    node netns <prefix>n<i>:  eth0 10.250.0.(10+i)/24 (peer of fabric port n<i>)
                              p<j> -> pod j, each carrying the pod gateway 10.251.<i>.1/32
    pod netns <prefix>n<i>p<j>: eth0 10.251.<i>.(j+1)/32, default via 10.251.<i>.1

Pods use /32 addresses with an on-link gateway that every pod-facing veth of the node
carries (as Calico does with 169.254.1.1); no proxy-ARP, no per-pod subnets, and pod IPs
stay dense in the node's /24.  Nothing is created in the host's root namespace, so
parallel runs do not interfere.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ztunnel_cfg.errors import NodeproxyError

FABRIC_NET = "10.250.0"
POD_NET = "10.251"
FABRIC_IP = f"{FABRIC_NET}.1"
BRIDGE = "br0"
UPLINK = "eth0"
NETNS_DIR = "/var/run/netns"  # where `ip netns add` mounts them; agents open these
MAX_NODES = 200
MAX_PODS_PER_NODE = 250
# Longest netns name is prefix + "n200p250" (8 chars); keep the whole well under NAME_MAX
# and readable in `ip netns list`.
MAX_PREFIX_LEN = 24
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class LabError(NodeproxyError):
    """The namespace cluster could not be planned, built or torn down."""


def random_prefix(stem: str = "np") -> str:
    """A unique short prefix for one run, e.g. ``np3fa9-``."""
    return f"{stem}{secrets.token_hex(2)}-"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What to build: ``nodes`` node namespaces with ``pods_per_node`` pods each."""

    prefix: str
    nodes: int = 2
    pods_per_node: int = 2


@dataclass(frozen=True, slots=True)
class NodePlan:
    index: int
    name: str  # node name in the config: node1, node2, ...
    netns: str  # netns name: <prefix>n1
    netns_path: str
    ip: str  # address on the fabric bridge
    uplink: str  # node-side interface towards the fabric (the node-to-node link)
    fabric_port: str  # its veth peer inside the fabric netns, enslaved to the bridge
    pod_cidr: str
    pod_gateway: str  # carried by every pod-facing veth of this node


@dataclass(frozen=True, slots=True)
class PodPlan:
    index: int
    name: str  # short name, unique in the cluster: n1p1
    netns: str  # <prefix>n1p1
    netns_path: str
    node: str  # node name: node1
    node_netns: str
    ip: str
    gateway: str
    iface: str  # interface inside the pod
    node_iface: str  # its veth peer inside the node netns


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    spec: ClusterSpec
    fabric_netns: str
    fabric_netns_path: str
    bridge: str
    fabric_ip: str
    fabric_cidr: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]

    @property
    def prefix(self) -> str:
        return self.spec.prefix

    def all_netns(self) -> tuple[str, ...]:
        """Every namespace name of the cluster, fabric first."""
        return (
            self.fabric_netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods),
        )

    def node(self, name: str) -> NodePlan:
        """Look a node up by config name (``node1``), netns name or index string."""
        for node in self.nodes:
            if name in (node.name, node.netns, f"n{node.index}", str(node.index)):
                return node
        raise LabError(f"no node {name!r} in cluster {self.prefix!r}",
                       hint=f"nodes are {', '.join(n.name for n in self.nodes)}")

    def pod(self, name: str) -> PodPlan:
        """Look a pod up by short name (``n1p2``), netns name or IP."""
        for pod in self.pods:
            if name in (pod.name, pod.netns, pod.ip):
                return pod
        raise LabError(f"no pod {name!r} in cluster {self.prefix!r}",
                       hint=f"pods are {', '.join(p.name for p in self.pods)}")

    def pods_on(self, node: str) -> tuple[PodPlan, ...]:
        node_name = self.node(node).name
        return tuple(p for p in self.pods if p.node == node_name)


def _check(spec: ClusterSpec) -> None:
    if not spec.prefix or len(spec.prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(spec.prefix):
        raise LabError(
            f"invalid cluster prefix {spec.prefix!r}",
            hint=f"use 1-{MAX_PREFIX_LEN} chars of [a-z0-9_.-], e.g. {random_prefix()!r}",
        )
    if not 1 <= spec.nodes <= MAX_NODES:
        raise LabError(f"nodes={spec.nodes} out of range", hint=f"use 1..{MAX_NODES}")
    if not 1 <= spec.pods_per_node <= MAX_PODS_PER_NODE:
        raise LabError(
            f"pods_per_node={spec.pods_per_node} out of range",
            hint=f"use 1..{MAX_PODS_PER_NODE}",
        )


def _pod_plan(prefix: str, node: NodePlan, j: int) -> PodPlan:
    short = f"n{node.index}p{j}"
    return PodPlan(
        index=j,
        name=short,
        netns=f"{prefix}{short}",
        netns_path=os.path.join(NETNS_DIR, f"{prefix}{short}"),
        node=node.name,
        node_netns=node.netns,
        ip=f"{POD_NET}.{node.index}.{j + 1}",
        gateway=node.pod_gateway,
        iface="eth0",
        node_iface=f"p{j}",
    )


def plan_cluster(spec: ClusterSpec) -> ClusterPlan:
    """Names and addresses for ``spec``; pure and deterministic."""
    _check(spec)
    p = spec.prefix
    fabric = f"{p}fab"
    nodes: list[NodePlan] = []
    pods: list[PodPlan] = []
    for i in range(1, spec.nodes + 1):
        node = NodePlan(
            index=i,
            name=f"node{i}",
            netns=f"{p}n{i}",
            netns_path=os.path.join(NETNS_DIR, f"{p}n{i}"),
            ip=f"{FABRIC_NET}.{10 + i}",
            uplink=UPLINK,
            fabric_port=f"n{i}",
            pod_cidr=f"{POD_NET}.{i}.0/24",
            pod_gateway=f"{POD_NET}.{i}.1",
        )
        nodes.append(node)
        pods += [_pod_plan(p, node, j) for j in range(1, spec.pods_per_node + 1)]
    return ClusterPlan(
        spec=spec,
        fabric_netns=fabric,
        fabric_netns_path=os.path.join(NETNS_DIR, fabric),
        bridge=BRIDGE,
        fabric_ip=FABRIC_IP,
        fabric_cidr=f"{FABRIC_NET}.0/24",
        nodes=tuple(nodes),
        pods=tuple(pods),
    )


def plan_more_pods(plan: ClusterPlan, node: str, count: int
                   ) -> tuple[ClusterPlan, tuple[PodPlan, ...]]:
    """``plan`` with ``count`` more pods on ``node`` (the next free indices: a cluster can
    grow while it runs, e.g. for an act of the demo), and those pods."""
    where = plan.node(node)
    taken = {p.index for p in plan.pods_on(where.name)}
    free = [j for j in range(1, MAX_PODS_PER_NODE + 1) if j not in taken][:count]
    if count < 1 or len(free) < count:
        raise LabError(f"cannot add {count} pod(s) to {where.name}: it has {len(taken)} of "
                       f"{MAX_PODS_PER_NODE}", hint="add fewer pods, or spread them over nodes")
    added = tuple(_pod_plan(plan.prefix, where, j) for j in free)
    return replace(plan, pods=plan.pods + added), added


def without_pods(plan: ClusterPlan, names: Sequence[str]) -> ClusterPlan:
    """``plan`` without the pods named (short or netns names)."""
    gone = {plan.pod(n).name for n in names}
    return replace(plan, pods=tuple(p for p in plan.pods if p.name not in gone))


@dataclass(frozen=True, slots=True)
class Batch:
    """``ip -batch`` lines to run in one namespace (``netns=None``: the caller's own)."""

    netns: str | None
    lines: tuple[str, ...]


def _node_side(node: NodePlan, pod: PodPlan) -> list[str]:
    """In the node's netns: the veth to the pod (its peer moved into the pod's netns)."""
    return [
        f"link add {pod.node_iface} type veth peer name {pod.iface} netns {pod.netns}",
        f"addr add {node.pod_gateway}/32 dev {pod.node_iface}",
        f"link set {pod.node_iface} up",
        f"route add {pod.ip}/32 dev {pod.node_iface} src {node.pod_gateway}",
    ]


def _pod_side(pod: PodPlan) -> Batch:
    return Batch(
        pod.netns,
        (
            "link set lo up",
            f"addr add {pod.ip}/32 dev {pod.iface}",
            f"link set {pod.iface} up",
            f"route add {pod.gateway}/32 dev {pod.iface} scope link",
            f"route add default via {pod.gateway} dev {pod.iface} src {pod.ip}",
        ),
    )


def render_stages(plan: ClusterPlan) -> tuple[tuple[Batch, ...], ...]:
    """The ``ip -batch`` work to build ``plan``, as stages: the batches inside one stage are
    independent (may run in parallel); a stage needs the previous ones done."""
    create = Batch(None, tuple(f"netns add {ns}" for ns in plan.all_netns()))

    fab: list[str] = [
        "link set lo up",
        f"link add {plan.bridge} type bridge",
        f"addr add {plan.fabric_ip}/24 dev {plan.bridge}",
        f"link set {plan.bridge} up",
    ]
    for n in plan.nodes:
        fab += [
            f"link add {n.fabric_port} type veth peer name {n.uplink} netns {n.netns}",
            f"link set {n.fabric_port} master {plan.bridge}",
            f"link set {n.fabric_port} up",
        ]
    # Routes to pod ranges make the fabric a usable vantage point (e.g. a CA or a
    # debugging client reaching pods).
    fab += [f"route add {n.pod_cidr} via {n.ip} onlink dev {plan.bridge}" for n in plan.nodes]

    node_batches: list[Batch] = []
    pod_batches: list[Batch] = []
    for n in plan.nodes:
        lines = [
            "link set lo up",
            f"addr add {n.ip}/24 dev {n.uplink}",
            f"link set {n.uplink} up",
        ]
        for pod in plan.pods_on(n.name):
            lines += _node_side(n, pod)
            pod_batches.append(_pod_side(pod))
        lines += [
            f"route add {other.pod_cidr} via {other.ip} dev {n.uplink}"
            for other in plan.nodes
            if other.index != n.index
        ]
        node_batches.append(Batch(n.netns, tuple(lines)))
    return (
        (create,),
        (Batch(plan.fabric_netns, tuple(fab)),),
        tuple(node_batches),
        tuple(pod_batches),
    )


def render_pod_stages(plan: ClusterPlan, pods: Sequence[PodPlan]
                      ) -> tuple[tuple[Batch, ...], ...]:
    """The ``ip -batch`` work to add ``pods`` to the running cluster of ``plan``: their
    namespaces, then each node's side, then each pod's side."""
    nodes = [n for n in plan.nodes if any(p.node == n.name for p in pods)]
    return (
        (Batch(None, tuple(f"netns add {p.netns}" for p in pods)),),
        tuple(Batch(n.netns, tuple(line for p in pods if p.node == n.name
                                   for line in _node_side(n, p)))
              for n in nodes),
        tuple(_pod_side(p) for p in pods),
    )


# Per-namespace sysctls (written through /proc/sys from inside the namespace).
NODE_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/ipv4/ip_forward", "1"),
    # Pods and the agent (source-preserving connects) must never be dropped by
    # reverse-path filtering inherited from the host.
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
)
