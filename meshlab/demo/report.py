"""The human report (pure): every fact in it comes from :class:`Observations`; colours come
from :func:`click.style`, and only when asked for."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from meshlab.demo.observe import (
    METRICS,
    Connection,
    Observations,
    PodInfo,
    destination_of,
    problems_of,
)
from meshlab.demo.scenario import APP_PORT, CA_PORT, HBONE_PORT, Intent


class Style:
    """Colours through :func:`click.style`, or none (stdout is not a terminal, NO_COLOR)."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def _wrap(self, text: str, **styles: Any) -> str:
        return click.style(text, **styles) if self.color else text

    def bold(self, t: str) -> str:
        return self._wrap(t, bold=True)

    def dim(self, t: str) -> str:
        return self._wrap(t, dim=True)

    def green(self, t: str) -> str:
        return self._wrap(t, fg="green")

    def red(self, t: str) -> str:
        return self._wrap(t, fg="red", bold=True)

    def yellow(self, t: str) -> str:
        return self._wrap(t, fg="yellow")

    def cyan(self, t: str) -> str:
        return self._wrap(t, fg="cyan")

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


def _render_step(obs: Observations, index: int, st: Style) -> list[str]:
    step = obs.steps[index]
    conns = [c for c in obs.connections if c.step == index]
    good = all(not problems_of(obs, c) for c in conns)
    first = conns[0] if conns else None
    src = obs.pod(step.src)
    target = first.target if first else "?"
    dst_label = (f"service {step.dst}" if step.intent is Intent.SERVICE
                 else destination_of(obs, step, None))
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
            dst = destination_of(obs, step, conn)
            spread[dst] += 1
            mark = st.ok(not problems_of(obs, conn))
            lines.append(f"    {mark} #{conn.seq:<3} → {_who(obs, dst):<26} "
                         f"{_path_text(obs, conn, st)}")
            lines.append(f"           {_bytes_text(conn)}; {_wire_text(obs, conn, st)}; "
                         f"{_app_text(conn, st, step.intent, brief=True)}")
        lines.append("    spread  " + " · ".join(f"{k} x{v}" for k, v in sorted(spread.items())))
    else:
        for conn in conns:
            out, inb = conn.outbound(), conn.inbound()
            dst_name = destination_of(obs, step, conn)
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
        for problem in problems_of(obs, conn):
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
