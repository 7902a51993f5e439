"""`nodeproxy config`: validate config files and show what they contain."""

from __future__ import annotations

import sys
from typing import Any

import click

from cli.tables import FORMATS, render, render_table
from ztunnel_cfg.dump import config_json_schema_text, config_to_document
from ztunnel_cfg.errors import ConfigError
from ztunnel_cfg.loader import validate_config_file
from ztunnel_cfg.snapshot import Snapshot, load_snapshot


@click.group(name="config")
def command() -> None:
    """Validate and inspect mesh config files (workloads, services, policies)."""


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def summary(snapshot: Snapshot) -> str:
    c = snapshot.config
    parts = [
        _plural(len(c.workloads), "workload"),
        _plural(len(c.services), "service"),
        _plural(len(c.policies), "policy"),
    ]
    if c.waypoints:
        parts.append(_plural(len(c.waypoints), "waypoint"))
    if c.routes:
        parts.append(_plural(len(c.routes), "route"))
    if c.traffic_policies:
        parts.append(_plural(len(c.traffic_policies), "trafficPolicy"))
    if c.peer_authentications:
        parts.append(_plural(len(c.peer_authentications), "peerAuthentication"))
    parts.append(_plural(len(snapshot.nodes), "node"))
    return ", ".join(parts) + f"; trust domain {snapshot.trust_domain}"


@command.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check FILES; list every error with file:line:column.  Exit 1 if any is invalid."""
    errors = 0
    bad_files = 0
    for path in files:
        try:
            result = validate_config_file(path)
            snapshot = Snapshot.build(result.config)
        except ConfigError as exc:
            bad_files += 1
            errors += len(exc.issues)
            for issue in exc.issues:
                click.echo(str(issue))
            continue
        for warning in result.warnings:
            click.echo(str(warning), err=True)  # stdout stays one result line per file
        click.echo(f"{path}: valid ({summary(snapshot)})")
    if bad_files:
        click.echo(
            f"{_plural(errors, 'error')} in {_plural(bad_files, 'file')} "
            f"({len(files) - bad_files} of {len(files)} valid)",
            err=True,
        )
        sys.exit(1)


def _waypoint_name(destination: str | None) -> str:
    if destination is None:
        return "None"
    hostname = destination.partition("/")[2]
    return hostname.split(".", 1)[0]


def workloads_table(snapshot: Snapshot) -> str:
    rows = [
        (
            w.namespace,
            w.name,
            ",".join(str(ip) for ip in w.workload_ips),
            w.node,
            _waypoint_name(w.waypoint.destination if w.waypoint else None),
            w.protocol.value,
        )
        for w in sorted(snapshot.config.workloads, key=lambda w: (w.namespace, w.name))
    ]
    return render_table(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


def services_table(snapshot: Snapshot) -> str:
    rows = []
    for s in sorted(snapshot.config.services, key=lambda s: (s.namespace, s.name)):
        members = snapshot.endpoints(s)
        healthy = sum(1 for w in members if w.healthy)
        rows.append(
            (
                s.namespace,
                s.name,
                ",".join(str(ip) for ip in s.vips),
                _waypoint_name(s.waypoint.destination if s.waypoint else None),
                f"{healthy}/{len(members)}",
            )
        )
    return render_table(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], rows)


def policies_table(snapshot: Snapshot) -> str:
    rows = [
        (p.namespace, p.name, p.action.value, p.scope.value)
        for p in sorted(snapshot.config.policies, key=lambda p: (p.namespace, p.name))
    ]
    return render_table(["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], rows)


def _data(snapshot: Snapshot) -> dict[str, Any]:
    return config_to_document(snapshot.config)


@command.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)
def show(file: str, fmt: str) -> None:
    """Show the workloads, services and policies in FILE."""
    snapshot = load_snapshot(file)  # ConfigError -> "error: ..." and exit 1 (cli.main)

    def tables() -> str:
        return "\n".join(
            [workloads_table(snapshot), services_table(snapshot), policies_table(snapshot)]
        )

    click.echo(render(fmt, tables, lambda: _data(snapshot)), nl=False)


@command.command("schema")
def schema() -> None:
    """Print the JSON Schema of config files (for editors; docs/config.schema.json)."""
    click.echo(config_json_schema_text(), nl=False)


def _register_store_commands() -> None:
    from cli import config_store

    for cmd in config_store.commands:
        command.add_command(cmd)


_register_store_commands()
