"""`nodeproxy explain --from POD --to IP:PORT`: why a connection would be allowed/denied/routed."""

from __future__ import annotations

import click

from cli.inspect_cmd import DEFAULT_ADMIN, config_dump, snapshot_from_dump
from cli.tables import render_data, render_table
from ztunnel_cfg.explain import Explanation, HttpQuery, L7Explanation, explain
from ztunnel_cfg.snapshot import Snapshot, load_snapshot


def render_explanation(e: Explanation) -> str:
    """The decision path as text: one block for the connection, one per possible outcome."""
    src = e.source if e.source == e.source_ip else f"{e.source} ({e.source_ip})"
    lines = [f"connection  {src} -> {e.target}"]
    if e.source_in_mesh:
        lines.append(f"source      in the mesh: captured by the agent of node {e.source_node}, "
                     f"presents {e.presented_identity}")
    else:
        where = f"workload on node {e.source_node}" if e.source_node else "no mesh workload"
        lines.append(f"source      not in the mesh ({where}): plaintext, no identity")
    lines.append(f"service     {e.service or '(none: not a service VIP:port)'}")
    lines.append(f"selection   {e.selection}")
    if e.endpoints:
        table = render_table(
            ["ENDPOINT", "ADDRESS", "NODE", "CANDIDATE"],
            [(ep.workload, ep.address, ep.node, "yes" if ep.candidate else f"no: {ep.why_not}")
             for ep in e.endpoints],
        )
        lines += ["            " + row for row in table.splitlines()]
    lines.append(f"verdict     {e.verdict.value}")
    for index, hop in enumerate(e.hops, 1):
        lines.append("")
        title = hop.endpoint or hop.address
        lines.append(f"outcome {index}: {title}" + (f" on {hop.node}" if hop.node else ""))
        via = f" via {hop.via}" if hop.via and hop.via != hop.address else ""
        lines.append(f"  path      {hop.path.value}{via} -> {hop.address}")
        lines.append(f"  route     {hop.route_reason}")
        if hop.expected_identities:
            lines.append(f"  expects   {', '.join(hop.expected_identities)}")
        if hop.mtls_mode:
            lines.append(f"  mTLS      {hop.mtls_mode} ({hop.mtls_mode_source})")
        decision = f"not enforced: {hop.reason}" if hop.allowed is None else hop.reason
        lines.append(f"  decision  {decision}")
        if hop.allowed is False:
            lines.append(f"  counters  istio_tcp_connections_failed_total{{response_flags="
                         f"\"{hop.response_flags}\"}}")
    if e.l7 is not None:
        lines += ["", *render_l7(e.l7)]
    return "\n".join(lines) + "\n"


def render_l7(l7: L7Explanation) -> list[str]:
    lines = [f"waypoint {l7.waypoint} ({l7.waypoint_identity}): {l7.request}"]
    lines.append(f"  L7 policy {l7.authz_reason}")
    lines.append(f"  route     {l7.route}: {l7.selection}")
    if l7.answer is not None:
        lines.append(f"  answer    {l7.answer} by the waypoint (response_flags "
                     f"\"{l7.answer_flags}\"): {l7.answer_reason}")
        return lines
    lines.append(f"  timeout   {l7.timeout}")
    lines.append(f"  retry     {l7.retry}")
    for b in l7.backends:
        subset = f" subset {b.subset}" if b.subset else ""
        lines.append(f"  backend   {b.service}:{b.port}{subset} weight {b.weight} "
                     f"({b.share:.0%})")
        for ep in b.endpoints:
            verdict = "allowed" if ep.allowed else "DENIED"
            lines.append(f"            {ep.workload} {ep.address}: {verdict} by its agent "
                         f"(sees {l7.waypoint_identity}): {ep.reason}")
        if not b.endpoints:
            lines.append("            no healthy endpoint: 503 UH")
    return lines


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{text!r}: want NAME:VALUE", param_hint="-H")
    return name.strip().lower(), value.strip()


@click.command(name="explain")
@click.option("--from", "source", required=True, metavar="POD",
              help="Source pod: name, namespace/name, uid or IP.")
@click.option("--to", "target", required=True, metavar="IP:PORT", help="Destination address.")
@click.option("--admin", default=None, metavar="ADDR",
              help=f"Read the live snapshot from this agent's admin API [default: "
                   f"{DEFAULT_ADMIN}].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Read the snapshot from a config file instead of a running agent.")
@click.option("--http", "http", nargs=2, metavar="METHOD PATH", default=None,
              help="Also explain what the waypoint on the path does with this HTTP request.")
@click.option("-H", "--header", "headers", multiple=True, metavar="NAME:VALUE",
              help="A request header for --http (repeatable).")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]),
              default="table", show_default=True, help="Output format.")
def command(source: str, target: str, admin: str | None, config_file: str | None,
            http: tuple[str, str] | None, headers: tuple[str, ...], fmt: str) -> None:
    """Explain the decision path of a connection from POD to IP:PORT: source resolved,
    service and endpoint chosen, waypoint or not, HBONE or passthrough, the policy and rule
    that allow or deny it, and the mTLS identities presented and expected."""
    if admin is not None and config_file is not None:
        raise click.UsageError("give --admin or --config, not both")
    snapshot: Snapshot
    if config_file is not None:
        snapshot = load_snapshot(config_file)
    else:
        addr = admin or DEFAULT_ADMIN
        snapshot = snapshot_from_dump(config_dump(addr), f"{addr}/config_dump")
    query = None
    if http is not None:
        parsed = tuple(parse_header(h) for h in headers)
        host = next((v for n, v in parsed if n == "host"), "")
        query = HttpQuery(http[0].upper(), http[1], parsed, host)
    elif headers:
        raise click.UsageError("-H needs --http METHOD PATH")
    result = explain(snapshot, source, target, query)
    if fmt == "table":
        click.echo(render_explanation(result), nl=False)
    else:
        click.echo(render_data(result.to_document(), fmt), nl=False)
