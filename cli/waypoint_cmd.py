"""``nodeproxy waypoint``: run a waypoint proxy, and look at a running one."""

from __future__ import annotations

from typing import Any

import click

from cli.identity_opts import IdentitySource, identity_options
from cli.inspect_cmd import admin_option, config_dump, output_option
from cli.logsetup import background_logging
from cli.run_cmd import _hostport
from cli.tables import render, render_table
from nodeproxy.controlplane.wiring import load_snapshot_any
from nodeproxy.proxy.limits import Limits
from nodeproxy.waypoint.app import WaypointApp, WaypointOptions, choose_self
from nodeproxy.waypoint.proxy import WaypointSettings
from ztunnel_cfg.errors import NodeproxyError

_LIMITS = Limits()
_SETTINGS = WaypointSettings()


@click.group(name="waypoint")
def command() -> None:
    """Waypoint proxies: the optional L7 layer (routes, retries, timeouts, L7 policy)."""


@command.command(name="run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="cluster config YAML, the same file the agents use (watched), or the "
                   "agents' etcd:// store (docs/control-plane.md)")
@click.option("--name", required=True, metavar="NS/NAME",
              help="which entry of 'waypoints:' this process is")
@click.option("--node", help="this node's name; picks the waypoint's workload on this node "
                             "(default: the waypoint's only workload)")
@click.option("--workload", metavar="NS/POD",
              help="the waypoint's workload, when it has several on one node")
@identity_options
@click.option("--listen-ip", default="0.0.0.0", show_default=True,
              help="address of the HBONE listener (the waypoint workload's IP)")
@click.option("--hbone-port", type=int, default=15008, show_default=True)
@click.option("--readiness-addr", default="0.0.0.0:15021", show_default=True)
@click.option("--metrics-addr", default="0.0.0.0:15020", show_default=True)
@click.option("--admin-addr", default="127.0.0.1:15000", show_default=True)
@click.option("--drain-timeout", type=float, default=5.0, show_default=True,
              help="seconds open requests may finish after SIGTERM")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_SETTINGS.idle_timeout, show_default=True,
              help="seconds a TCP or upgraded tunnel may stay silent before it is reset")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_SETTINGS.connect_timeout, show_default=True,
              help="seconds to open an HBONE connection to an endpoint")
@click.option("--detection-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_SETTINGS.detection_timeout, show_default=True,
              help="seconds to wait for a tunnel's first bytes before treating it as TCP "
                   "(server-first protocols)")
@click.option("--request-header-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_SETTINGS.request_header_timeout, show_default=True,
              help="seconds a client has to finish a request head once it started one "
                   "(slowloris); then 408 and close")
@click.option("--replay-buffer", type=click.IntRange(min=0), default=_SETTINGS.replay_buffer,
              show_default=True,
              help="request bodies up to this many bytes are held so they can be retried; "
                   "larger ones stream and are never retried")
@click.option("--max-connections", type=click.IntRange(min=1), default=16384,
              show_default=True, help="downstream HBONE connections open at once")
@click.option("--max-pending-handshakes", type=click.IntRange(min=1),
              default=_LIMITS.max_pending_handshakes, show_default=True)
@click.option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_LIMITS.handshake_timeout, show_default=True)
def run(config_path: str, name: str, node: str | None, workload: str | None, listen_ip: str,
        hbone_port: int, readiness_addr: str, metrics_addr: str, admin_addr: str,
        drain_timeout: float, idle_timeout: float, connect_timeout: float,
        detection_timeout: float, request_header_timeout: float, replay_buffer: int,
        max_connections: int,
        max_pending_handshakes: int, handshake_timeout: float, **identity_kwargs: Any) -> None:
    """Run one waypoint proxy (a mesh workload of its own, HBONE on :15008)."""
    identity = IdentitySource.pop(identity_kwargs)
    identity.check()
    options = WaypointOptions(
        config=config_path, name=name, node=node, workload=workload, listen_ip=listen_ip,
        hbone_port=hbone_port,
        readiness_addr=_hostport(readiness_addr, "--readiness-addr"),
        metrics_addr=_hostport(metrics_addr, "--metrics-addr"),
        admin_addr=_hostport(admin_addr, "--admin-addr"),
        drain_timeout=drain_timeout,
        limits=Limits(max_pending_handshakes=max_pending_handshakes,
                      handshake_timeout=handshake_timeout),
        settings=WaypointSettings(connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                                  detection_timeout=detection_timeout,
                                  request_header_timeout=request_header_timeout,
                                  replay_buffer=replay_buffer),
        max_connections=max_connections,
    )
    # Which node's credentials: the waypoint workload's (checked again once running).
    _waypoint, me = choose_self(load_snapshot_any(config_path), options)
    apps: list[WaypointApp] = []
    client, renewer = identity.client(me.node, lambda: apps[0]._current())
    app = WaypointApp(options, client, node_renewer=renewer)
    apps.append(app)
    try:
        import uvloop

        with background_logging():
            uvloop.run(app.run())
    except NodeproxyError:
        raise
    except KeyboardInterrupt:
        pass


def endpoint_rows(dump: dict[str, Any]) -> list[list[str]]:
    rows = []
    for cluster in dump.get("clusters", []):
        for ep in cluster.get("endpoints", []):
            health = ep.get("health") or {}
            ejected = health.get("ejected", False)
            left = health.get("seconds_left")
            rows.append([
                cluster["cluster"], ep["address"], ep["workload"],
                "EJECTED" if ejected else "HEALTHY",
                f"{left:.0f}s" if ejected and left is not None else "-",
                str(health.get("times_ejected", 0)), str(ep.get("activeRequests", 0)),
            ])
    return rows


@command.command(name="endpoints")
@admin_option
@output_option
def endpoints(admin: str, fmt: str) -> None:
    """Endpoints of a running waypoint's clusters: health, ejections, active requests."""
    dump = config_dump(admin)
    click.echo(render(fmt, lambda: render_table(
        ["CLUSTER", "ENDPOINT", "WORKLOAD", "HEALTH", "EJECTED FOR", "EJECTIONS", "ACTIVE"],
        endpoint_rows(dump)), lambda: list(dump.get("clusters") or [])), nl=False)


def route_rows(dump: dict[str, Any]) -> list[list[str]]:
    rows = []
    for route in dump.get("routes") or []:
        parents = ", ".join(
            p["service"].partition("/")[2].split(".")[0] + (f":{p['port']}" if p.get("port")
                                                           else "")
            for p in route.get("parentRefs", []))
        for index, rule in enumerate(route.get("rules", [])):
            matches = "; ".join(_match_text(m) for m in rule.get("matches") or []) or "*"
            backends = ", ".join(
                b["service"].partition("/")[2].split(".")[0] + f":{b['port']}"
                + (f"[{','.join(f'{k}={v}' for k, v in b['subset'].items())}]"
                   if b.get("subset") else "") + f" w{b.get('weight', 1)}"
                for b in rule.get("backendRefs") or []) or "-"
            timeouts = rule.get("timeouts") or {}
            retry = rule.get("retry")
            rows.append([route["namespace"], route["name"], parents, str(index), matches,
                         backends, f"{timeouts['request']:g}s" if timeouts.get("request")
                         else "-",
                         f"{retry['attempts']}x" if retry else "default"])
    return rows


def _match_text(match: dict[str, Any]) -> str:
    parts = []
    if match.get("method"):
        parts.append(match["method"])
    path = match.get("path")
    if path:
        parts.append(f"{path.get('type', 'PathPrefix')} {path['value']}")
    for h in match.get("headers") or []:
        parts.append(f"{h['name']}={h['value']}")
    for q in match.get("queryParams") or []:
        parts.append(f"?{q['name']}={q['value']}")
    return " ".join(parts) or "*"


@click.command(name="routes")
@admin_option
@output_option
def routes(admin: str, fmt: str) -> None:
    """HTTP routes known to a running waypoint (or agent): one row per rule."""
    dump = config_dump(admin)
    click.echo(render(fmt, lambda: render_table(
        ["NAMESPACE", "ROUTE", "PARENTS", "RULE", "MATCHES", "BACKENDS", "TIMEOUT", "RETRY"],
        route_rows(dump)), lambda: list(dump.get("routes") or [])), nl=False)


commands = [command, routes]
