"""``nodeproxy demo``: a real mesh on a namespace cluster, some traffic, and a report.

Three layers, so the report can be tested without root:

- the *scenario* (pure): who runs where, the service, the policies, the connections to make
  and what each is meant to show (:func:`build_scenario`);
- the *observations* (frozen data): what the client apps, the echo servers, the agents'
  JSON access logs, tcpdump on the node links, ``/metrics`` and ``/config_dump`` actually
  said.  :func:`check` compares them with the scenario's intent and :func:`render_report`
  prints them; nothing in the report is assumed, everything was observed;
- the *runner* (:func:`run_demo`): builds the cluster, starts the CA service and the agents
  (:class:`meshlab.mesh.Mesh`), drives the traffic, collects, and tears everything down
  (also on Ctrl-C, SIGTERM or failure) unless asked to keep it.
"""

from __future__ import annotations

import contextlib
import enum
import glob
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from meshlab.build import Cluster, is_lab_netns, list_netns, sweep
from meshlab.config import PodRole, ServiceDef, render_config, workload_name
from meshlab.topology import ClusterPlan, ClusterSpec, LabError, plan_cluster, random_prefix

DEMO_STEM = "npd"  # demo prefixes look like npd3fa9- (tests use np3fa9-: no overlap)
DEMO_GLOB = "npd????-"
WORKDIR_STEM = "nodeproxy-demo-"
TRUST_DOMAIN = "cluster.local"
HBONE_PORT = 15008
CA_PORT = 15012
METRICS = {
    "opened": "istio_tcp_connections_opened_total",
    "closed": "istio_tcp_connections_closed_total",
    "failed": "istio_tcp_connections_failed_total",
    "sent": "istio_tcp_sent_bytes_total",
    "received": "istio_tcp_received_bytes_total",
}


class DemoError(LabError):
    """The demo could not run, or the mesh did not behave as its config says."""


# == scenario (pure) ==========================================================================


class Intent(enum.Enum):
    MESH = "mesh"  # pod -> mesh pod: must go through HBONE mTLS
    SERVICE = "service"  # pod -> service VIP: HBONE to an endpoint, spread over endpoints
    DENY = "deny"  # must be refused by an authorization policy; nothing reaches the app
    PASSTHROUGH = "passthrough"  # to a pod outside the mesh: plain TCP


@dataclass(frozen=True, slots=True)
class Step:
    title: str
    src: str  # pod short name (n1p1)
    dst: str  # pod short name, or the service name for Intent.SERVICE
    port: int
    intent: Intent
    count: int = 1


@dataclass(frozen=True, slots=True)
class Scenario:
    nodes: int
    pods_per_node: int
    roles: Mapping[str, PodRole]
    services: tuple[ServiceDef, ...]
    policies: tuple[Mapping[str, Any], ...]
    servers: tuple[tuple[str, int], ...]  # echo servers to start: (pod, port)
    steps: tuple[Step, ...]

    def without_policy(self, name: str) -> Scenario:
        """The same intent with one policy missing from the config (a sabotaged mesh, used to
        prove that the demo judges by what it observes)."""
        kept = tuple(p for p in self.policies if p.get("name") != name)
        return Scenario(self.nodes, self.pods_per_node, self.roles, self.services, kept,
                        self.servers, self.steps)


CATALOG_VIP = "10.96.0.20"
CATALOG_PORT = 80
APP_PORT = 8080
DB_PORT = 5432
LEDGER_PORT = 9090


def build_scenario(nodes: int = 2) -> Scenario:
    """The demo story.  node1: frontend (client), catalog-2 (an endpoint of the catalog
    service on the client's node), old-client (denied by policy).  node2: catalog, an
    inventory database outside the mesh, ledger (only frontend may call it).  Every further
    node adds one more catalog endpoint."""
    if nodes < 2:
        raise DemoError("the demo needs at least 2 nodes", hint="use --nodes 2 or more")
    roles: dict[str, PodRole] = {
        "n1p1": PodRole("default", "frontend", name="frontend"),
        "n1p2": PodRole("shop", "catalog", name="catalog-2"),
        "n1p3": PodRole("legacy", "old-client", name="old-client"),
        "n2p1": PodRole("shop", "catalog", name="catalog"),
        "n2p2": PodRole("data", "inventory-db", mesh=False, name="inventory-db"),
        "n2p3": PodRole("payments", "ledger", name="ledger"),
    }
    endpoints = ["catalog", "catalog-2"]
    for i in range(3, nodes + 1):
        roles[f"n{i}p1"] = PodRole("shop", "catalog", name=f"catalog-{i}")
        roles[f"n{i}p2"] = PodRole("default", "batch", name=f"batch-{i}")
        roles[f"n{i}p3"] = PodRole("default", "batch", name=f"batch-{i}b")
        endpoints.append(f"catalog-{i}")
    services = (ServiceDef("catalog", CATALOG_VIP, {CATALOG_PORT: APP_PORT}, endpoints,
                           namespace="shop"),)
    policies: tuple[Mapping[str, Any], ...] = (
        {"name": "deny-legacy", "namespace": "shop", "scope": "Namespace", "action": "Deny",
         "rules": [[[{"namespaces": ["legacy"]}]]]},
        {"name": "allow-frontend", "namespace": "payments", "scope": "Namespace",
         "action": "Allow",
         "rules": [[[{"principals": [f"spiffe://{TRUST_DOMAIN}/ns/default/sa/frontend"]}]]]},
    )
    servers = [("n2p1", APP_PORT), ("n1p2", APP_PORT), ("n2p2", DB_PORT), ("n2p3", LEDGER_PORT)]
    servers += [(f"n{i}p1", APP_PORT) for i in range(3, nodes + 1)]
    steps = (
        Step("cross-node call", "n1p1", "n2p1", APP_PORT, Intent.MESH),
        Step("allowed by an ALLOW policy", "n1p1", "n2p3", LEDGER_PORT, Intent.MESH),
        Step("service VIP, load-balanced", "n1p1", "catalog", CATALOG_PORT, Intent.SERVICE,
             count=3 * len(endpoints)),
        Step("denied by a DENY policy", "n1p3", "n2p1", APP_PORT, Intent.DENY),
        Step("to a pod outside the mesh", "n1p1", "n2p2", DB_PORT, Intent.PASSTHROUGH),
    )
    return Scenario(nodes, 3, roles, services, policies, tuple(servers), steps)


def marker_for(prefix: str, seq: int, step: Step) -> str:
    """A payload marker unique to one connection of one run."""
    tag = prefix.rstrip("-").removeprefix(DEMO_STEM) or "x"
    return f"NPDEMO-{tag}-{seq:02d}-{step.intent.value}"


# == observations (frozen data) ===============================================================


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


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def summarize_metrics(node: str, text: str) -> list[MetricRow]:
    """Sum the Istio TCP metrics of one agent's /metrics by ``reporter``."""
    sums: dict[str, dict[str, float]] = {}
    wanted = {name: key for key, name in METRICS.items()}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in wanted:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        reporter = labels.get("reporter", "?")
        row = sums.setdefault(reporter, {})
        key = wanted[m.group(1)]
        row[key] = row.get(key, 0.0) + float(m.group(3))
    return [MetricRow(node, reporter, **values) for reporter, values in sorted(sums.items())]


def certificates_from_dump(node: str, dump: Mapping[str, Any]) -> list[CertRow]:
    rows = []
    for cert in dump.get("certificates", []) or []:
        rows.append(CertRow(node, str(cert.get("identity", "")), str(cert.get("state", "")),
                            str(cert.get("serial") or "-"), str(cert.get("not_after") or "-")))
    return rows


# == verdict (pure) ===========================================================================


def _problems_of(obs: Observations, conn: Connection) -> list[str]:
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
                     for p in _problems_of(obs, conn)]
    for index, step in enumerate(obs.steps):
        if step.intent is not Intent.SERVICE:
            continue
        svc = next((s for s in obs.services if s.name == step.dst), None)
        chosen = Counter(_dst_name(obs, step, c) for c in obs.connections if c.step == index)
        if svc is not None and step.count >= len(svc.endpoints):
            unused = [e for e in svc.endpoints if chosen[e] == 0]
            if unused:
                problems.append(f"{step.title}: endpoint(s) {', '.join(unused)} never chosen "
                                f"in {step.count} connections")
    if not obs.captures or sum(c.packets for c in obs.captures) == 0:
        problems.append("the captures on the node links saw no packets at all")
    return problems


# == report (pure) ============================================================================


class Style:
    """ANSI styling, or none (stdout is not a terminal)."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, t: str) -> str:
        return self._wrap("1", t)

    def dim(self, t: str) -> str:
        return self._wrap("2", t)

    def green(self, t: str) -> str:
        return self._wrap("32", t)

    def red(self, t: str) -> str:
        return self._wrap("1;31", t)

    def yellow(self, t: str) -> str:
        return self._wrap("33", t)

    def cyan(self, t: str) -> str:
        return self._wrap("36", t)

    def ok(self, good: bool) -> str:
        return self.green("✔") if good else self.red("✘")


def _plural(n: float, word: str) -> str:
    n = int(n)
    return f"{n} {word}{'' if n == 1 else 's'}"


def _who(obs: Observations, workload: str) -> str:
    pod = obs.pod(workload)
    return f"{pod.namespace}/{pod.name} on {pod.node}" if pod else workload or "?"


def _path_text(obs: Observations, conn: Connection, st: Style) -> str:
    out, inb = conn.outbound(), conn.inbound()
    if inb is not None and inb.path == "denied":
        why = inb.reason.removeprefix("denied ") or f"by policy {inb.policy or '?'}"
        return st.yellow("DENIED") + f" {why} " + st.dim(f"({inb.node}'s agent refused the "
                                                         "HBONE CONNECT)")
    if out is None:
        return st.red("no access record from the source agent")
    if out.path == "hbone" and out.response_flags == "-":
        src_node, dst_node = obs.node_of(out.src_workload), obs.node_of(out.dst_workload)
        where = (f"{src_node} → {dst_node}, port {HBONE_PORT}" if src_node != dst_node
                 else f"stayed on {src_node}, port {HBONE_PORT}")
        allowed = f", allowed by {inb.policy}" if inb is not None and inb.policy else ""
        return st.green("HBONE mTLS") + f" ({where}{allowed})"
    if out.path == "passthrough":
        return st.cyan("passthrough") + " (plain TCP: the destination is not in the mesh)"
    return st.red(f"{out.path} (flags {out.response_flags}) {out.reason}".rstrip())


def _wire_text(obs: Observations, conn: Connection, st: Style) -> str:
    step = obs.steps[conn.step]
    on_wire = [c.node for c in obs.captures if conn.marker in c.markers_seen]
    total = sum(c.packets for c in obs.captures)
    out = conn.outbound()
    src = obs.pod(step.src)
    dst_name = out.dst_workload if out and out.dst_workload else step.dst
    dst = obs.pod(dst_name)
    crossed = src is not None and dst is not None and src.node != dst.node
    if on_wire:
        text = f"marker SEEN in plaintext on the link of {', '.join(on_wire)}"
        expected = step.intent is Intent.PASSTHROUGH
        return (st.cyan(text + " (expected: outside the mesh)") if expected else st.red(text))
    if not crossed:
        return st.dim(f"never left {src.node if src else '?'}; marker on no link")
    return st.green(f"marker never seen in {total} captured packets")


def _seen_text(conn: Connection, src_ip: str | None) -> str:
    if not conn.seen_from:
        return ""
    ip = conn.seen_from.rpartition(":")[0]
    same = " (the source pod's own IP)" if src_ip is not None and ip == src_ip else ""
    return f", saw the client as {ip}{same}"


def _app_text(conn: Connection, st: Style, intent: Intent, src_ip: str | None = None,
              *, brief: bool = False) -> str:
    if intent is Intent.DENY:
        if conn.answered or conn.app_got_marker:
            return st.red("the app ANSWERED / received the marker")
        why = conn.client_error or "closed"
        return st.green("0 bytes reached the app") + st.dim(f" (client: {why})")
    if conn.app_got_marker:
        if brief:
            return st.green("the app received the marker")
        return st.green("the app received the marker") + st.dim(_seen_text(conn, src_ip))
    return st.red(f"the app did not receive the marker ({conn.client_error})")


def _bytes_text(conn: Connection) -> str:
    out = conn.outbound()
    if out is None:
        return f"client sent {conn.client_sent} B, received {conn.client_received} B"
    return f"{out.bytes_sent} B sent, {out.bytes_received} B received"


def policy_summary(pol: Mapping[str, Any]) -> str:
    """``DENY when namespaces=legacy``: the rules of a policy in one line."""
    rules = []
    for rule in pol.get("rules") or []:
        clauses = []
        for clause_list in rule or []:
            for clause in clause_list or []:
                clauses += [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in dict(clause).items()]
        rules.append(" and ".join(clauses) or "always")
    action = str(pol.get("action", "?")).upper()
    return f"{action} when " + " or ".join(rules) if rules else f"{action} (no rules)"


def _render_cluster(obs: Observations, st: Style) -> list[str]:
    lines = [st.bold("The cluster")]
    for node, ip in obs.nodes:
        lines.append(f"  {st.bold(node)} {st.dim(ip)}")
        for pod in (p for p in obs.pods if p.node == node):
            # Pad before styling: escape codes would count as width.
            tag = st.green(f"{'mesh':<6}") if pod.mesh else st.yellow("outside the mesh")
            ident = pod.identity if pod.mesh else "(no identity)"
            lines.append(f"    {pod.namespace + '/' + pod.name:<22} {pod.ip:<12} {tag}  "
                         f"{st.dim(ident)}")
    for svc in obs.services:
        ports = ", ".join(f"{p}→{t}" for p, t in svc.ports.items())
        lines.append(f"  service {st.bold(svc.hostname)} {svc.vip} ({ports}) → "
                     f"{', '.join(svc.endpoints)}")
    for pol in obs.policies:
        key = f"{pol.get('namespace')}/{pol.get('name')}"
        lines.append(f"  policy  {st.bold(key)}: {policy_summary(pol)}")
    return lines


def _dst_name(obs: Observations, step: Step, conn: Connection | None) -> str:
    """The workload the connection went to, as the source agent resolved it."""
    out = conn.outbound() if conn else None
    if out is not None and out.dst_workload:
        return out.dst_workload
    pod = obs.pod(step.dst)
    return pod.name if pod else step.dst


def _render_step(obs: Observations, index: int, st: Style) -> list[str]:
    step = obs.steps[index]
    conns = [c for c in obs.connections if c.step == index]
    good = all(not _problems_of(obs, c) for c in conns)
    first = conns[0] if conns else None
    src = obs.pod(step.src)
    target = first.target if first else "?"
    dst_label = (f"service {step.dst}" if step.intent is Intent.SERVICE
                 else _dst_name(obs, step, None))
    seqs = (f"#{conns[0].seq}" if len(conns) == 1
            else f"#{conns[0].seq}-{conns[-1].seq}" if conns else "#-")
    lines = [f"{st.ok(good)} {st.bold(seqs)} {st.bold(step.title)}: "
             f"{src.name if src else step.src} → {dst_label} ({target})"]
    if src is not None:
        # The destination agent's record names the identity of the client certificate it
        # verified; fall back to what the source agent says it used.
        seen = [r for c in conns for r in (c.inbound(), c.outbound()) if r and r.src_identity]
        ident = seen[0].src_identity if seen else src.identity
        lines.append(f"    from  {_who(obs, src.name):<28} {st.dim(ident)}")
    if step.intent is Intent.SERVICE:
        spread: Counter[str] = Counter()
        for conn in conns:
            dst = _dst_name(obs, step, conn)
            spread[dst] += 1
            mark = st.ok(not _problems_of(obs, conn))
            lines.append(f"    {mark} #{conn.seq:<3} → {_who(obs, dst):<26} "
                         f"{_path_text(obs, conn, st)}")
            lines.append(f"           {_bytes_text(conn)}; {_wire_text(obs, conn, st)}; "
                         f"{_app_text(conn, st, step.intent, brief=True)}")
        lines.append("    spread  " + " · ".join(f"{k} x{v}" for k, v in sorted(spread.items())))
    else:
        for conn in conns:
            out, inb = conn.outbound(), conn.inbound()
            dst_name = _dst_name(obs, step, conn)
            dst_ident = (inb.dst_identity if inb and inb.dst_identity
                         else out.dst_identity if out else "")
            dst_pod = obs.pod(dst_name)
            if dst_pod is not None and not dst_pod.mesh:
                dst_ident = "(outside the mesh: no identity)"
            lines.append(f"    to    {_who(obs, dst_name):<28} {st.dim(dst_ident)}")
            lines.append(f"    path  {_path_text(obs, conn, st)}")
            lines.append(f"    bytes {_bytes_text(conn)}")
            lines.append(f"    wire  {_wire_text(obs, conn, st)}")
            lines.append(f"    app   {_app_text(conn, st, step.intent, src.ip if src else None)}")
    for conn in conns:
        for problem in _problems_of(obs, conn):
            lines.append(f"    {st.red('problem')} #{conn.seq}: {problem}")
    return lines


def _render_wire(obs: Observations, st: Style) -> list[str]:
    lines = [st.bold("On the wire") + st.dim("  (tcpdump on each node's link to the fabric)")]
    names = {HBONE_PORT: "HBONE", CA_PORT: "CA"}
    for cap in obs.captures:
        conns = ", ".join(
            f"{port}{'/' + names[port] if port in names else ''} x{n}"
            for port, n in sorted(cap.new_connections.items())
        ) or "none"
        lines.append(f"  {cap.node} {cap.iface}: {_plural(cap.packets, 'packet')}; "
                     f"new TCP connections to port {conns}")
    total = sum(c.packets for c in obs.captures)
    secret = [c for c in obs.connections
              if obs.steps[c.step].intent is not Intent.PASSTHROUGH]
    leaked = [c for c in secret if any(c.marker in cap.markers_seen for cap in obs.captures)]
    plain = [c for c in obs.connections if obs.steps[c.step].intent is Intent.PASSTHROUGH]
    seen_plain = [c for c in plain if any(c.marker in cap.markers_seen for cap in obs.captures)]
    if leaked:
        lines.append("  " + st.red(f"✘ {len(leaked)} of {len(secret)} mesh markers were seen "
                                   f"in plaintext: {', '.join(c.marker for c in leaked)}"))
    else:
        lines.append("  " + st.green(f"✔ none of the {len(secret)} mesh markers was seen in "
                                     f"{total} captured packets: the node-to-node bytes were "
                                     "encrypted"))
    if plain:
        if seen_plain:
            lines.append("  " + st.green("✔ the passthrough marker was seen in plaintext, as it "
                                         "should be: the capture does see payloads"))
        else:
            lines.append("  " + st.yellow("! the passthrough marker was not seen on any link"))
    return lines


def _fmt_num(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() else f"{v:.1f}"


def _render_metrics(obs: Observations, st: Style) -> list[str]:
    lines = [st.bold("Prometheus metrics") + st.dim("  (scraped from :15020/metrics)")]
    cols = sorted(((m.node, m.reporter) for m in obs.metrics),
                  key=lambda c: (c[0], c[1] != "source", c[1]))
    if not cols:
        return [*lines, "  (no istio_tcp_* samples)"]
    head = "  " + f"{'':<34}" + "".join(f"{n + ' ' + r:>22}" for n, r in cols)
    lines.append(st.dim(head))
    by = {(m.node, m.reporter): m for m in obs.metrics}
    for key, name in METRICS.items():
        cells = "".join(f"{_fmt_num(getattr(by[c], key)):>22}" for c in cols)
        lines.append(f"  {name:<34}{cells}")
    return lines


def _render_certs(obs: Observations, st: Style) -> list[str]:
    lines = [st.bold("Certificates issued") + st.dim("  (from each agent's /config_dump; the "
                                                     "keys never left the agent)")]
    for cert in obs.certificates:
        serial = cert.serial if len(cert.serial) <= 16 else cert.serial[:16] + "…"
        state = f"{cert.state:<9}"
        state = st.green(state) if cert.state == "available" else st.red(state)
        lines.append(f"  {cert.node:<6} {cert.identity:<50} {state} serial {serial:<17} "
                     f"{st.dim('until ' + cert.not_after)}")
    if not obs.certificates:
        lines.append("  " + st.red("none"))
    return lines


def render_report(obs: Observations, problems: Sequence[str], *, color: bool = False) -> str:
    """The human report.  Every fact in it comes from ``obs``."""
    st = Style(color)
    pods = len(obs.pods)
    outside = sum(not p.mesh for p in obs.pods)
    lines = [
        "",
        st.bold(f"nodeproxy demo: {_plural(len(obs.nodes), 'node')}, {_plural(pods, 'pod')} "
                f"({outside} outside the mesh), redirect={obs.backend}, prefix {obs.prefix}"),
        "",
        *_render_cluster(obs, st),
        "",
        st.bold("Connections") + st.dim("  (from the client apps, the echo servers and the "
                                        "agents' JSON access logs)"),
    ]
    for index in range(len(obs.steps)):
        lines += _render_step(obs, index, st)
    lines += ["", *_render_wire(obs, st), "", *_render_metrics(obs, st), "",
              *_render_certs(obs, st), ""]
    if problems:
        lines.append(st.red(f"✘ the mesh did not behave as configured ({len(problems)} "
                            f"problem{'s' if len(problems) != 1 else ''}):"))
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append(st.green(f"✔ all {len(obs.connections)} connections behaved as the config "
                              "says"))
    if obs.timings:
        total = sum(t for _, t in obs.timings)
        parts = " · ".join(f"{label} {t:.1f} s" for label, t in obs.timings)
        lines.append(st.dim(f"  ran in {total:.1f} s ({parts})"))
    return "\n".join(lines) + "\n"


def render_next_steps(prefix: str, workdir: Path, nodes: Sequence[str],
                      pods: Sequence[PodInfo], python: str = sys.executable) -> str:
    """Where to look when the demo keeps everything running."""
    n1 = f"{prefix}n1"
    client = next((p for p in pods if p.name == "frontend"), pods[0] if pods else None)
    server = next((p for p in pods if p.name == "catalog"), None)
    lines = [
        "",
        f"Everything is still running (prefix {prefix}; workdir {workdir}). Where to look next:",
        f"  ip netns exec {n1} curl -s localhost:15020/metrics | grep istio_tcp    # Prometheus",
        f"  ip netns exec {n1} curl -s localhost:15000/config_dump | python3 -m json.tool   "
        "# admin",
        f"  ip netns exec {n1} curl -s localhost:15021/healthz/ready                # readiness",
        f"  ip netns exec {n1} nodeproxy workloads        # also services, policies, "
        "certificates, connections",
        f"  ip netns exec {n1} nodeproxy explain --from frontend --to "
        f"{server.ip if server else '10.251.2.2'}:{APP_PORT}   # why allowed/denied/routed",
        f"  nodeproxy config show {workdir / 'cluster.yaml'}",
        f"  nodeproxy redirect show --netns /var/run/netns/{prefix}"
        f"{client.pod if client else 'n1p1'}",
        f"  tail -f {workdir}/agent-{nodes[0] if nodes else 'node1'}.log   "
        "# JSON access log, one line per connection",
        f"  ip netns exec {n1} tcpdump -ni eth0 tcp      # the node-to-node link",
    ]
    if client is not None and server is not None:
        lines.append(f"  ip netns exec {prefix}{client.pod} {python} -m meshlab.apps client "
                     f"--connect {server.ip}:{APP_PORT} --send hello")
    lines += [
        "Tear down:",
        f"  nodeproxy demo --down          (or: python -m meshlab down {prefix})",
        "",
    ]
    return "\n".join(lines)


# == runner ===================================================================================


@dataclass(frozen=True, slots=True)
class DemoOptions:
    nodes: int = 2
    backend: str = "iptables"
    keep: bool = False
    color: bool = False
    prefix: str | None = None
    workdir_root: str | None = None  # default: the system temp dir
    scenario: Scenario | None = None  # default: build_scenario(nodes)


@dataclass(slots=True)
class DemoResult:
    exit_code: int
    prefix: str
    workdir: Path
    problems: list[str] = field(default_factory=list)
    observations: Observations | None = None
    seconds: float = 0.0


class Progress:
    """``[1/6] building namespaces ... ok (0.1 s)`` lines."""

    def __init__(self, out: TextIO, total: int, style: Style,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.total, self.st, self.clock = out, total, style, clock
        self.n = 0
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, text: str, label: str) -> Iterator[None]:
        self.n += 1
        self.out.write(f"[{self.n}/{self.total}] {text} ... ")
        self.out.flush()
        started = self.clock()
        try:
            yield
        except BaseException:
            self.out.write(self.st.red("failed") + f" ({self.clock() - started:.1f} s)\n")
            self.out.flush()
            raise
        took = self.clock() - started
        self.timings.append((label, took))
        self.out.write(self.st.green("ok") + f" ({took:.2f} s)\n" if took < 1
                       else self.st.green("ok") + f" ({took:.1f} s)\n")
        self.out.flush()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM tears down like Ctrl-C does (only possible from the main thread)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Teardown must finish even if Ctrl-C is pressed again."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _LogTail:
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


def _await_records(tail: _LogTail, src_node: str, pods: Sequence[PodInfo],
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


def _new_connections(packets: Sequence[Any]) -> dict[int, int]:
    syn = Counter(p.dport for p in packets if p.flags & 0x12 == 0x02)
    return dict(sorted(syn.items()))


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Build, start, drive, report, and (unless ``keep``) tear down.  The report goes to
    ``out``; the exit code is non-zero when the mesh misbehaved."""
    from meshlab.mesh import Mesh  # imports the agent-side helpers; only when running

    st = Style(options.color)
    scenario = options.scenario or build_scenario(options.nodes)
    prefix = options.prefix or random_prefix(DEMO_STEM)
    plan = plan_cluster(ClusterSpec(prefix, scenario.nodes, scenario.pods_per_node))
    root = options.workdir_root or tempfile.gettempdir()
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_STEM}{prefix}", dir=root))
    progress = Progress(out, 6, st)
    started = time.monotonic()
    result = DemoResult(1, prefix, workdir)
    cluster: Cluster | None = None
    mesh: Mesh | None = None
    keep = False
    pods = describe_pods(plan, scenario.roles)
    try:
        with _sigterm_as_interrupt():
            with progress.step(f"building namespaces ({scenario.nodes} nodes, "
                               f"{len(plan.pods)} pods, prefix {prefix})", "namespaces"):
                cluster = Cluster.create(plan)
            doc = render_config(plan, scenario.roles, scenario.services, scenario.policies)
            mesh = Mesh(cluster, workdir, backend=options.backend, log_format="json")
            with progress.step(f"starting the CA service and {scenario.nodes} agents "
                               f"(redirect: {options.backend}), waiting until ready", "mesh"):
                mesh.start(doc)
            with progress.step(f"starting {len(scenario.servers)} echo apps in the pods",
                               "apps"):
                records = {}
                for pod, port in scenario.servers:
                    rec = workdir / f"received-{pod}-{port}.bin"
                    cluster.serve(pod, port, tag=pod, record=str(rec))
                    records[(pod, port)] = rec
            total = sum(s.count for s in scenario.steps)
            with progress.step(f"sending {total} connections, tcpdump on every node link",
                               "traffic"):
                conns, captures = _drive(cluster, scenario, pods, records, workdir, prefix)
            with progress.step("reading access logs, /metrics and /config_dump", "collect"):
                metrics, certs = [], []
                for node in cluster.nodes:
                    metrics += summarize_metrics(node.name, mesh.metrics(node.name))
                    certs += certificates_from_dump(node.name, mesh.config_dump(node.name))
            obs = Observations(
                prefix=prefix, backend=options.backend,
                nodes=tuple((n.name, n.ip) for n in plan.nodes), pods=pods,
                services=scenario.services, policies=scenario.policies, steps=scenario.steps,
                connections=tuple(conns), captures=tuple(captures), metrics=tuple(metrics),
                certificates=tuple(certs), timings=tuple(progress.timings),
            )
            problems = check(obs)
            result.observations, result.problems = obs, problems
            result.exit_code = 1 if problems else 0
            out.write(render_report(obs, problems, color=options.color))
            keep = options.keep
    finally:
        with _uninterruptible():
            if keep and cluster is not None:
                progress.n = progress.total
                out.write(f"[{progress.n}/{progress.total}] keeping the cluster, agents and "
                          f"apps running\n")
                if mesh is not None:
                    mesh.detach()  # threads only; agents keep running
                out.write(render_next_steps(prefix, workdir, [n.name for n in plan.nodes],
                                            pods))
            else:
                progress.n = progress.total - 1
                with progress.step("tearing everything down", "teardown"):
                    if mesh is not None:
                        mesh.stop()
                    if cluster is not None:
                        cluster.destroy()
                    sweep(prefix)  # also when Cluster.create failed half way
                if result.exit_code == 0:
                    shutil.rmtree(workdir, ignore_errors=True)
                else:
                    out.write(f"agent logs and config kept in {workdir}\n")
            result.seconds = time.monotonic() - started
            out.write(st.dim(f"total {result.seconds:.1f} s") + "\n")
            out.flush()
    return result


def _drive(
    cluster: Cluster, scenario: Scenario, pods: Sequence[PodInfo],
    records: Mapping[tuple[str, int], Path], workdir: Path, prefix: str,
) -> tuple[list[Connection], list[WireCapture]]:
    """Make every connection of the scenario, one at a time, with captures running."""
    nodes = [n.name for n in cluster.nodes]
    tail = _LogTail(workdir, nodes)
    tail.skip_to_end()
    caps = {n: cluster.capture(n) for n in nodes}
    by_short = {p.pod: p for p in pods}
    conns: list[Connection] = []
    seq = 0
    try:
        for index, step in enumerate(scenario.steps):
            src = by_short[step.src]
            if step.intent is Intent.SERVICE:
                svc = next(s for s in scenario.services if s.name == step.dst)
                target = f"{svc.vip}:{step.port}"
            else:
                target = f"{by_short[step.dst].ip}:{step.port}"
            for _ in range(step.count):
                seq += 1
                marker = marker_for(prefix, seq, step)
                [res] = cluster.connect(step.src, target, marker, timeout=3.0)
                recs = _await_records(tail, src.node, pods)
                got = any(marker.encode() in path.read_bytes()
                          for path in records.values() if path.exists())
                conns.append(Connection(
                    step=index, seq=seq, marker=marker, target=target,
                    client_ok=bool(res.get("ok")), client_error=res.get("error"),
                    answered=res.get("tag") is not None, seen_from=res.get("seen_from"),
                    client_sent=int(res.get("bytes_sent") or 0),
                    client_received=int(res.get("bytes_received") or 0),
                    app_got_marker=got, records=recs,
                ))
    finally:
        results = {n: cap.stop() for n, cap in caps.items()}
    markers = [c.marker for c in conns]
    captures = [
        WireCapture(n, "eth0", len(r.packets), _new_connections(r.packets),
                    frozenset(m for m in markers if r.contains(m.encode())))
        for n, r in results.items()
    ]
    return conns, captures


def teardown_leftovers(prefix_glob: str = DEMO_GLOB, workdir_root: str | None = None
                       ) -> tuple[list[str], list[str]]:
    """``nodeproxy demo --down``: remove the namespaces (and everything running in them) and
    the workdirs of demos left running with ``--keep``.  Returns (namespaces, workdirs)."""
    removed = sweep(prefix_glob)
    root = workdir_root or tempfile.gettempdir()
    dirs = []
    for path in sorted(glob.glob(os.path.join(root, f"{WORKDIR_STEM}{prefix_glob}*"))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            dirs.append(path)
    return removed, dirs


def leftover_netns(prefix_glob: str = DEMO_GLOB) -> list[str]:
    return [n for n in list_netns() if is_lab_netns(n, prefix_glob)]
