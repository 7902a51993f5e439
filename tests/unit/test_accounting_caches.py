"""The data path's per-connection caches stay correct and bounded (issue 13: cheap accounting)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nodeproxy import metrics as metrics_mod
from nodeproxy.metrics import ConnectionLabels, Metrics
from nodeproxy.proxy.env import RoundRobin
from ztunnel_cfg import Snapshot, load_config_text

ROOT = Path(__file__).resolve().parents[2]


def _value(m: Metrics, name: str, labels: ConnectionLabels) -> float | None:
    return m.registry.get_sample_value(name, dict(zip(metrics_mod.TCP_LABELS, labels.values(),
                                                      strict=True)))


def test_cached_children_count_like_fresh_ones_and_stay_bounded() -> None:
    m = Metrics()
    a = ConnectionLabels(reporter="source", source_workload="a")
    b = dataclasses.replace(a, response_flags="UR")
    for _ in range(3):
        m.connection_opened(a)
        m.connection_closed(a, sent=10, received=0)
    m.connection_failed(b)
    assert _value(m, "istio_tcp_connections_opened_total", a) == 3
    assert _value(m, "istio_tcp_connections_closed_total", a) == 3
    assert _value(m, "istio_tcp_sent_bytes_total", a) == 30
    assert _value(m, "istio_tcp_received_bytes_total", a) is None  # never created for 0 bytes
    assert _value(m, "istio_tcp_connections_failed_total", b) == 1
    for n in range(metrics_mod.MAX_CACHED_CHILDREN + 10):
        m.connection_opened(dataclasses.replace(a, source_workload=f"w{n}"))
    assert len(m._children) <= metrics_mod.MAX_CACHED_CHILDREN
    m.connection_opened(a)  # after a clear the series goes on counting
    assert _value(m, "istio_tcp_connections_opened_total", a) == 4


def test_round_robin_rotates_and_its_state_is_bounded() -> None:
    snap = Snapshot.build(load_config_text((ROOT / "examples/cluster.yaml").read_text(), "c"))
    workloads = list(snap.config.workloads)[:3]
    rr = RoundRobin(max_sets=2)
    assert [rr(workloads).uid for _ in range(4)] == [w.uid for w in workloads + workloads[:1]]
    rr(workloads[:1])
    rr(workloads[:2])  # a third set: the table starts again instead of growing
    assert len(rr._counters) <= 2


def test_policies_for_is_remembered_per_workload_of_the_snapshot() -> None:
    snap = Snapshot.build(load_config_text((ROOT / "examples/cluster.yaml").read_text(), "c"))
    for w in snap.config.workloads:
        first = snap.policies_for(w)
        assert snap.policies_for(w) is first
    # A workload that is not this snapshot's (same uid, other labels) is resolved, not cached.
    w = snap.config.workloads[0]
    mine = snap.policies_for(w)
    other = dataclasses.replace(w, labels=(("app", "something-else"),))
    snap.policies_for(other)
    assert snap._policies_memo[w.uid] is mine
