"""`nodeproxy workloads|services|policies|certificates|connections`: a running agent's view.

Each command reads the agent's admin API (``/config_dump``, ``/debug/connections``; loopback
only, so run it on the node, in the lab inside the node's netns) and prints the columns of
``istioctl ztunnel-config``, or the raw entries with ``-o json|yaml``.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from cli.config_cmd import policies_table, services_table, workloads_table
from cli.tables import FORMATS, render, render_table
from ztunnel_cfg.errors import ConfigError, NodeproxyError
from ztunnel_cfg.loader import load_config_text
from ztunnel_cfg.snapshot import Snapshot

DEFAULT_ADMIN = "127.0.0.1:15000"
# The keys of /config_dump that are the config document itself (the loader's input shape).
CONFIG_KEYS = ("trustDomain", "workloads", "services", "policies", "waypoints", "routes",
               "trafficPolicies", "peerAuthentication")


class AdminError(NodeproxyError):
    """The agent's admin API could not be reached or gave an unusable answer."""


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def fetch(admin: str, path: str, timeout: float = 5.0) -> Any:
    """GET ``http://ADMIN/PATH`` and decode its JSON."""
    url = f"http://{admin}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()[:200]
        raise AdminError(
            f"the agent's admin API at {admin} answered {path} with HTTP {exc.code}: {detail}",
            hint="the admin API serves localhost clients only" if exc.code == 403 else None,
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(
            f"cannot reach the agent's admin API at {admin}: {_reason(exc)}",
            hint="is `nodeproxy run` running on this node? the admin API listens on localhost "
            "only",
        ) from None
    try:
        return json.loads(body)
    except ValueError:
        raise AdminError(f"the agent's admin API at {admin} sent invalid JSON for {path}",
                         hint="is --admin the agent's admin address (default "
                         f"{DEFAULT_ADMIN})?") from None


def config_dump(admin: str) -> dict[str, Any]:
    data = fetch(admin, "/config_dump")
    if not isinstance(data, dict):
        raise AdminError(f"unexpected /config_dump from {admin}: not a JSON object")
    return data


def snapshot_from_dump(dump: dict[str, Any], source: str) -> Snapshot:
    """Rebuild the agent's snapshot from its config dump with the strict loader."""
    if "workloads" not in dump:
        raise AdminError(f"the agent at {source} has no config loaded yet",
                         hint="check its log for config errors")
    doc = {k: dump[k] for k in CONFIG_KEYS if k in dump}
    try:
        return Snapshot.build(load_config_text(json.dumps(doc), filename=source))
    except ConfigError as exc:
        raise AdminError(f"the config dumped by {source} does not load: {exc}") from None


# -- rows ------------------------------------------------------------------------------------

def _utc(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _valid(cert: dict[str, Any], now: datetime) -> bool:
    start, end = _utc(cert.get("notBefore")), _utc(cert.get("notAfter"))
    return start is not None and end is not None and start <= now < end


def _status(state: str) -> str:
    return {"available": "Available", "renewal-failed": "Available (renewal failing)",
            "expired": "Expired", "initializing": "Initializing",
            "unavailable": "Unavailable"}.get(state, state or "Unknown")


def _short_time(text: object) -> str:
    value = _utc(text)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def certificate_rows(certs: list[dict[str, Any]], now: datetime) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for entry in certs:
        name = str(entry.get("identity", ""))
        status = _status(str(entry.get("state", "")))
        chain = list(entry.get("chain") or [])
        if not chain:
            rows.append((name, "Leaf", status, "false", str(entry.get("serial") or "-"),
                         _short_time(entry.get("not_after")), _short_time(entry.get("not_before"))))
            continue
        for cert in [*chain, *(entry.get("roots") or [])]:
            rows.append((
                name, str(cert.get("type", "")), status, str(_valid(cert, now)).lower(),
                str(cert.get("serial", "")), _short_time(cert.get("notAfter")),
                _short_time(cert.get("notBefore")),
            ))
    return rows


CERT_HEADERS = ["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER",
                "NOT BEFORE"]
CONN_HEADERS = ["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL"]


def certificates_table(certs: list[dict[str, Any]], now: datetime | None = None) -> str:
    return render_table(CERT_HEADERS, certificate_rows(certs, now or datetime.now(UTC)))


def connections_table(conns: list[dict[str, Any]]) -> str:
    rows = [(c.get("workload", ""), c.get("direction", ""), c.get("local", ""),
             c.get("remote", ""), c.get("target", ""), c.get("protocol", "")) for c in conns]
    return render_table(CONN_HEADERS, rows)


# -- commands --------------------------------------------------------------------------------

admin_option = click.option(
    "--admin", default=DEFAULT_ADMIN, show_default=True, metavar="ADDR",
    help="The agent's admin API (host:port; localhost only).",
)
output_option = click.option(
    "-o", "--output", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="Output format.",
)


def _listing(name: str, doc: str, key: str,
             table: Callable[[Snapshot], str]) -> click.Command:
    @click.command(name=name, help=doc)
    @admin_option
    @output_option
    def cmd(admin: str, fmt: str) -> None:
        dump = config_dump(admin)
        click.echo(render(fmt, lambda: table(snapshot_from_dump(dump, f"{admin}/config_dump")),
                          lambda: list(dump.get(key) or [])), nl=False)

    return cmd


@click.command(name="workloads")
@admin_option
@output_option
def workloads(admin: str, fmt: str) -> None:
    """Workloads known to the agent (istioctl ztunnel-config workloads columns); in table form
    also the mesh pods of this node that are not enrolled (their traffic is refused)."""
    dump = config_dump(admin)
    click.echo(render(fmt, lambda: workloads_table(snapshot_from_dump(
        dump, f"{admin}/config_dump")), lambda: list(dump.get("workloads") or [])), nl=False)
    if fmt == "table":
        for line in enrollment_failure_lines(dump):
            click.echo(line)


def enrollment_failure_lines(dump: dict[str, Any]) -> list[str]:
    failures = dump.get("enrollmentFailures")
    if not isinstance(failures, dict):
        return []
    return [f"NOT ENROLLED (traffic refused until enrolled): {uid}: {reason}"
            for uid, reason in sorted(failures.items())]

services = _listing("services", "Services known to the agent, with healthy/total endpoints.",
                    "services", services_table)
policies = _listing("policies", "Authorization policies in force on the agent.", "policies",
                    policies_table)


@click.command(name="certificates")
@admin_option
@output_option
def certificates(admin: str, fmt: str) -> None:
    """The agent's workload certificates: leaf and roots, serial, validity (no keys); in table
    form also the node certificate the agent authenticates to the CA with."""
    dump = config_dump(admin)
    certs = list(dump.get("certificates") or [])
    click.echo(render(fmt, lambda: certificates_table(certs), lambda: certs), nl=False)
    node = dump.get("nodeCertificate")
    if fmt == "table" and isinstance(node, dict):
        click.echo(node_certificate_line(node))


def node_certificate_line(node: dict[str, Any]) -> str:
    line = (f"node certificate {node.get('identity')} serial {node.get('serial')} valid until "
            f"{node.get('not_after')}, renews at {node.get('renew_at')}")
    if node.get("failures"):
        line += f"; {node['failures']} renewal failure(s), last: {node.get('last_error')}"
    return line


@click.command(name="connections")
@admin_option
@output_option
def connections(admin: str, fmt: str) -> None:
    """Connections the agent is proxying right now (/debug/connections)."""
    conns = fetch(admin, "/debug/connections")
    if not isinstance(conns, list):
        raise AdminError(f"unexpected /debug/connections from {admin}: not a JSON list")
    click.echo(render(fmt, lambda: connections_table(conns), lambda: conns), nl=False)


commands: list[click.Command] = [workloads, services, policies, certificates, connections]
