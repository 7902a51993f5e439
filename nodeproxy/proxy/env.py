"""What every pod proxy on a node shares: snapshot, certificates, metrics, knobs."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nodeproxy.metrics import Metrics
from nodeproxy.proxy.limits import Limits
from nodeproxy.sockets import original_destination
from ztunnel_cfg.model import Workload
from ztunnel_cfg.snapshot import Snapshot


class RoundRobin:
    """Endpoint choice for service VIPs: round-robin per endpoint set, shared by the node.

    Bounded: endpoint sets change with every scale event, so after ``max_sets`` distinct sets
    the counters start again (a reset only restarts a rotation)."""

    def __init__(self, max_sets: int = 4096) -> None:
        self._counters: dict[tuple[str, ...], itertools.count[int]] = {}
        self._max_sets = max_sets

    def __call__(self, endpoints: Sequence[Workload]) -> Workload:
        key = tuple(w.uid for w in endpoints)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self._max_sets:
                self._counters.clear()
            counter = self._counters[key] = itertools.count()
        return endpoints[next(counter) % len(endpoints)]


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    inbound_plaintext: int = 15006
    inbound_hbone: int = 15008


@dataclass(eq=False)
class ProxyEnv:
    snapshot: Callable[[], Snapshot]
    metrics: Metrics
    node: str
    ports: Ports = field(default_factory=Ports)
    choose: Callable[[Sequence[Workload]], Workload] = field(default_factory=RoundRobin)
    # SO_ORIGINAL_DST in iptables/nft REDIRECT mode; tests without redirection inject another.
    original_dst: Callable[[socket.socket], tuple[str, int]] = original_destination
    # Connect to the local pod with the client's source IP (IP_TRANSPARENT + connmark rules).
    preserve_source_ip: bool = True
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    limits: Limits = field(default_factory=Limits)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_conn_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):x}"
