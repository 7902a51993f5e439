"""What the demo observed (frozen data), how it is read, and the verdict.

Readers turn what the client apps, the echo servers, the agents' JSON access logs, tcpdump on
the node links, ``/metrics`` (:mod:`prometheus_client.parser`) and ``/config_dump`` said into
:class:`Observations`.  :func:`check` compares them with the scenario's intent: nothing is
assumed, everything judged was observed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshlab.config import PodRole, ServiceDef, workload_name
from meshlab.demo.scenario import TRUST_DOMAIN, Intent, Step
from meshlab.topology import ClusterPlan

METRICS = {
    "opened": "istio_tcp_connections_opened_total",
    "closed": "istio_tcp_connections_closed_total",
    "failed": "istio_tcp_connections_failed_total",
    "sent": "istio_tcp_sent_bytes_total",
    "received": "istio_tcp_received_bytes_total",
}


# -- observations (frozen data) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One access-log line (component=access) of one agent."""

    node: str
    direction: str  # outbound | inbound | inbound_plaintext
    src_workload: str
    src_identity: str
    dst_workload: str
    dst_identity: str
    dst_service: str
    dst_addr: str
    path: str  # hbone | passthrough | denied | failed | ...
    bytes_sent: int
    bytes_received: int
    response_flags: str
    policy: str = ""
    reason: str = ""

    @classmethod
    def from_log(cls, node: str, doc: Mapping[str, Any]) -> AccessEntry:
        return cls(
            node=node, direction=str(doc.get("direction", "")),
            src_workload=str(doc.get("src_workload", "")),
            src_identity=str(doc.get("src_identity", "")),
            dst_workload=str(doc.get("dst_workload", "")),
            dst_identity=str(doc.get("dst_identity", "")),
            dst_service=str(doc.get("dst_service", "")), dst_addr=str(doc.get("dst_addr", "")),
            path=str(doc.get("path", "")), bytes_sent=int(doc.get("bytes_sent", 0)),
            bytes_received=int(doc.get("bytes_received", 0)),
            response_flags=str(doc.get("response_flags", "")),
            policy=str(doc.get("policy", "")), reason=str(doc.get("reason", "")),
        )


def parse_access_log(node: str, text: str) -> list[AccessEntry]:
    """The access records in a chunk of an agent's ``--log-format json`` output."""
    entries = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("component") == "access":
            entries.append(AccessEntry.from_log(node, doc))
    return entries


@dataclass(frozen=True, slots=True)
class Connection:
    """One connection the demo made, and everything observed about it."""

    step: int  # index into Observations.steps
    seq: int  # 1-based, over the whole run
    marker: str
    target: str  # ip:port the client connected to
    client_ok: bool
    client_error: str | None
    answered: bool  # the app's greeting arrived
    seen_from: str | None  # the peer address the app saw
    client_sent: int
    client_received: int
    app_got_marker: bool  # the marker is in the destination app's record file
    records: tuple[AccessEntry, ...]

    def outbound(self) -> AccessEntry | None:
        return next((r for r in self.records if r.direction == "outbound"), None)

    def inbound(self) -> AccessEntry | None:
        return next((r for r in self.records if r.direction.startswith("inbound")), None)


@dataclass(frozen=True, slots=True)
class WireCapture:
    """tcpdump on one node's link to the fabric, over the whole traffic phase."""

    node: str
    iface: str
    packets: int
    new_connections: Mapping[int, int]  # destination port of each SYN -> count
    markers_seen: frozenset[str]


@dataclass(frozen=True, slots=True)
class MetricRow:
    node: str
    reporter: str
    opened: float = 0
    closed: float = 0
    failed: float = 0
    sent: float = 0
    received: float = 0


@dataclass(frozen=True, slots=True)
class CertRow:
    node: str
    identity: str
    state: str
    serial: str
    not_after: str


@dataclass(frozen=True, slots=True)
class PodInfo:
    pod: str  # short name
    name: str
    namespace: str
    node: str
    ip: str
    mesh: bool
    identity: str


@dataclass(frozen=True, slots=True)
class Observations:
    prefix: str
    backend: str
    nodes: tuple[tuple[str, str], ...]  # (name, ip)
    pods: tuple[PodInfo, ...]
    services: tuple[ServiceDef, ...]
    policies: tuple[Mapping[str, Any], ...]
    steps: tuple[Step, ...]
    connections: tuple[Connection, ...]
    captures: tuple[WireCapture, ...]
    metrics: tuple[MetricRow, ...]
    certificates: tuple[CertRow, ...]
    timings: tuple[tuple[str, float], ...] = ()

    def pod(self, short_or_name: str) -> PodInfo | None:
        return next((p for p in self.pods if short_or_name in (p.pod, p.name)), None)

    def node_of(self, workload: str) -> str:
        pod = self.pod(workload)
        return pod.node if pod else "?"


def describe_pods(plan: ClusterPlan, roles: Mapping[str, PodRole]) -> tuple[PodInfo, ...]:
    out = []
    for pod in plan.pods:
        role = roles.get(pod.name, PodRole())
        out.append(PodInfo(
            pod.name, workload_name(pod, role), role.namespace, pod.node, pod.ip, role.mesh,
            f"spiffe://{TRUST_DOMAIN}/ns/{role.namespace}/sa/{role.service_account}",
        ))
    return tuple(out)


def summarize_metrics(node: str, text: str) -> list[MetricRow]:
    """Sum the Istio TCP metrics of one agent's /metrics by ``reporter``."""
    sums: dict[str, dict[str, float]] = {}
    wanted = {name: key for key, name in METRICS.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is None:
                continue
            row = sums.setdefault(sample.labels.get("reporter", "?"), {})
            row[key] = row.get(key, 0.0) + sample.value
    return [MetricRow(node, reporter, **values) for reporter, values in sorted(sums.items())]


def certificates_from_dump(node: str, dump: Mapping[str, Any]) -> list[CertRow]:
    rows = []
    for cert in dump.get("certificates", []) or []:
        rows.append(CertRow(node, str(cert.get("identity", "")), str(cert.get("state", "")),
                            str(cert.get("serial") or "-"), str(cert.get("not_after") or "-")))
    return rows


# -- reading the agents' access logs --------------------------------------------------------


class LogTail:
    """Reads what agents appended to their logs since the last call."""

    def __init__(self, workdir: Path, nodes: Sequence[str]) -> None:
        self.paths = {n: workdir / f"agent-{n}.log" for n in nodes}
        self.offsets = dict.fromkeys(nodes, 0)
        self.partial = dict.fromkeys(nodes, "")

    def skip_to_end(self) -> None:
        for node, path in self.paths.items():
            self.offsets[node] = path.stat().st_size if path.exists() else 0

    def read(self) -> list[AccessEntry]:
        entries = []
        for node, path in self.paths.items():
            if not path.exists():
                continue
            with open(path, "rb") as fh:
                fh.seek(self.offsets[node])
                data = fh.read()
            self.offsets[node] += len(data)
            text = self.partial[node] + data.decode(errors="replace")
            complete, _, self.partial[node] = text.rpartition("\n")
            entries += parse_access_log(node, complete)
        return entries


def await_records(tail: LogTail, src_node: str, pods: Sequence[PodInfo],
                   timeout: float = 5.0) -> tuple[AccessEntry, ...]:
    """Access records of the connection just made: the source agent's outbound record and,
    when it tunnelled to a mesh pod, the destination agent's inbound record (both are written
    when the connection closes, on two different agents)."""
    deadline = time.monotonic() + timeout
    records: list[AccessEntry] = []
    mesh = {p.name for p in pods if p.mesh}
    while True:
        records += tail.read()
        out = next((r for r in records if r.direction == "outbound" and r.node == src_node), None)
        want_inbound = out is not None and out.path == "hbone" and out.dst_workload in mesh
        have_inbound = any(r.direction.startswith("inbound") for r in records)
        if out is not None and (have_inbound or not want_inbound):
            return tuple(records)
        if time.monotonic() > deadline:
            return tuple(records)
        time.sleep(0.02)


def new_connections(packets: Sequence[Any]) -> dict[int, int]:
    syn = Counter(p.dport for p in packets if p.flags & 0x12 == 0x02)
    return dict(sorted(syn.items()))


# -- verdict (pure) --------------------------------------------------------------------------


def destination_of(obs: Observations, step: Step, conn: Connection | None) -> str:
    """The workload the connection went to, as the source agent resolved it."""
    out = conn.outbound() if conn else None
    if out is not None and out.dst_workload:
        return out.dst_workload
    pod = obs.pod(step.dst)
    return pod.name if pod else step.dst


def problems_of(obs: Observations, conn: Connection) -> list[str]:
    step = obs.steps[conn.step]
    out, inb = conn.outbound(), conn.inbound()
    on_wire = [c.node for c in obs.captures if conn.marker in c.markers_seen]
    problems: list[str] = []
    if step.intent in (Intent.MESH, Intent.SERVICE):
        if not conn.client_ok:
            problems.append(f"the client failed: {conn.client_error}")
        if not conn.app_got_marker:
            problems.append("the destination app never received the marker")
        if out is None or out.path != "hbone" or out.response_flags != "-":
            got = f"path={out.path} flags={out.response_flags}" if out else "no record"
            problems.append(f"the source agent did not tunnel it over HBONE ({got})")
        if inb is None or inb.path != "hbone":
            problems.append("no inbound HBONE record at the destination agent")
        if step.intent is Intent.SERVICE and out is not None and not out.dst_service:
            problems.append("the source agent did not resolve the service VIP")
        if on_wire:
            problems.append(f"the marker was seen in plaintext on the wire ({', '.join(on_wire)})")
    elif step.intent is Intent.DENY:
        if conn.answered or conn.app_got_marker or conn.client_ok:
            problems.append("a connection the policy denies got through to the app")
        if inb is None or inb.path != "denied" or not inb.policy:
            problems.append("no agent recorded a denial by an authorization policy")
        if on_wire:
            problems.append(f"the marker was seen in plaintext on the wire ({', '.join(on_wire)})")
    elif step.intent is Intent.PASSTHROUGH:
        if not conn.client_ok or not conn.app_got_marker:
            problems.append(f"passthrough to a pod outside the mesh failed: {conn.client_error}")
        if out is None or out.path != "passthrough":
            problems.append(f"the source agent did not pass it through "
                            f"({out.path if out else 'no record'})")
        src, dst = obs.pod(step.src), obs.pod(step.dst)
        if src and dst and src.node != dst.node and not on_wire:
            # Keeps the "never seen on the wire" proof honest: the same captures must see
            # plaintext when there is plaintext.
            problems.append("the captures did not see the plaintext passthrough marker, so "
                            "'marker never seen' would prove nothing")
    return problems


def check(obs: Observations) -> list[str]:
    """Every way the observed run differs from what the config says must happen."""
    problems = []
    for conn in obs.connections:
        problems += [f"#{conn.seq} {obs.steps[conn.step].title}: {p}"
                     for p in problems_of(obs, conn)]
    for index, step in enumerate(obs.steps):
        if step.intent is not Intent.SERVICE:
            continue
        svc = next((s for s in obs.services if s.name == step.dst), None)
        chosen = Counter(destination_of(obs, step, c) for c in obs.connections if c.step == index)
        if svc is not None and step.count >= len(svc.endpoints):
            unused = [e for e in svc.endpoints if chosen[e] == 0]
            if unused:
                problems.append(f"{step.title}: endpoint(s) {', '.join(unused)} never chosen "
                                f"in {step.count} connections")
    if not obs.captures or sum(c.packets for c in obs.captures) == 0:
        problems.append("the captures on the node links saw no packets at all")
    return problems
