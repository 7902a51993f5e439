"""Wiring of eBPF capture into the agent (``nodeproxy run --redirect ebpf``).

The agent hands its Redirector a netns path; eBPF capture also needs the pod's cgroup, which
the workload declares next to ``netns`` (``cgroup:``), so this redirector looks it up in the
agent's live snapshot.  The agent's ``original_dst`` is replaced by the pinned-map lookup
(outbound) / local address (inbound); a miss fails the connection like a missing
SO_ORIGINAL_DST does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.sockets import original_destination
from redirect.ebpf import fastpath as fast
from redirect.ebpf import ops as ebpf_ops
from redirect.ebpf.errors import EbpfError
from redirect.ebpf.origdst import OriginalDst
from redirect.spec import RedirectSpec
from ztunnel_cfg.snapshot import Snapshot


class EbpfRedirector:
    def __init__(self, snapshot: Callable[[], Snapshot], node: str,
                 spec: RedirectSpec | None = None, *, fastpath: bool = False) -> None:
        self._snapshot = snapshot
        self._node = node
        self.spec = spec or RedirectSpec()
        self.fastpath = fastpath

    def cgroup_of(self, netns: str) -> str | None:
        for workload in self._snapshot().workloads_on_node(self._node):
            if workload.netns == netns:
                return workload.cgroup
        return None

    def install(self, netns: str) -> None:
        cgroup = self.cgroup_of(netns)
        if cgroup is None:
            raise EbpfError(f"the workload with netns {netns} names no cgroup", netns=netns,
                            hint="--redirect ebpf attaches to the pod's cgroup v2: add "
                                 "`cgroup: <cgroup2 mount>/...` to the workload")
        ebpf_ops.install(netns, self.spec, cgroup, fastpath=self.fastpath)

    def remove(self, netns: str) -> None:
        ebpf_ops.remove(netns, self.cgroup_of(netns))


def use_map_original_dst(env: ProxyEnv) -> None:
    """env_overrides hook: original destinations come from the eBPF map / local address."""
    lookup = OriginalDst(outbound_port=env.ports.outbound)

    def original_dst(sock: socket.socket) -> tuple[str, int]:
        found = lookup(sock)
        return found if found is not None else original_destination(sock)

    env.original_dst = original_dst


def check_ebpf(*, fastpath: bool = False, outbound_port: int = 15001) -> None:
    """Start-up: every program through the verifier; with ``fastpath`` the node's same-node
    fast path installed on the agent's own cgroup."""
    ebpf_ops.preflight()
    if fastpath:
        fast.install(fast.own_cgroup(), outbound_port=outbound_port)
