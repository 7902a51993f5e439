"""``nodeproxy run``: the node agent."""

from __future__ import annotations

import logging
from typing import Any

import click

from cli.ebpf_wiring import EbpfRedirector, check_ebpf, use_map_original_dst
from cli.identity_opts import DEV_CA_WARNING, IdentitySource, identity_options
from cli.logsetup import background_logging
from nodeproxy.app import AgentApp, AgentOptions
from nodeproxy.hbone.flood import FloodLimits
from nodeproxy.proxy.env import Ports
from nodeproxy.proxy.limits import Limits
from redirect import ops
from redirect.spec import RedirectSpec
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, parse_host_port

log = logging.getLogger("nodeproxy.run")
_LIMITS = Limits()  # the defaults shown by --help
__all__ = ["DEV_CA_WARNING", "OpsRedirector", "command"]


class OpsRedirector:
    """The agent's Redirector, implemented with the ``redirect`` package."""

    def __init__(self, backend: str, spec: RedirectSpec | None = None) -> None:
        self.backend = backend
        self.spec = spec or RedirectSpec()

    def install(self, netns: str) -> None:
        ops.install(netns, self.spec, self.backend)

    def remove(self, netns: str) -> None:
        ops.remove(netns, self.backend)


def _hostport(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, what, default_host="0.0.0.0", port_zero=True)
    except HostPortError as exc:
        raise click.BadParameter(f"{text!r}: {exc.reason}; want HOST:PORT",
                                 param_hint=what) from None


@click.command(name="run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="cluster config YAML (watched; SIGHUP forces a reload), or "
                   "etcd://HOST:PORT[,...][?ca=&cert=&key=] (list + watch; docs/control-plane.md)")
@click.option("--node", required=True, help="this node's name (workloads with node: NAME)")
@identity_options
@click.option("--redirect", "backend", type=click.Choice(["iptables", "nftables", "ebpf"]),
              default="iptables", show_default=True,
              help="capture backend (ebpf: bcc programs on each pod's cgroup and netns)")
@click.option("--ebpf-fastpath", is_flag=True,
              help="with --redirect ebpf: short-circuit the loopback hop between a pod's "
                   "sockets and the agent with sk_msg (sock_ops on the agent's own cgroup, "
                   "which must not be the root cgroup)")
@click.option("--no-redirect", is_flag=True,
              help="install no rules; open listeners on workload IPs in this namespace "
                   "(loopback testing and debugging)")
@click.option("--cleanup-on-exit", is_flag=True,
              help="remove capture rules on exit (default: keep them so traffic fails closed)")
@click.option("--readiness-addr", default="0.0.0.0:15021", show_default=True)
@click.option("--metrics-addr", default="0.0.0.0:15020", show_default=True)
@click.option("--admin-addr", default="127.0.0.1:15000", show_default=True)
@click.option("--drain-timeout", type=float, default=5.0, show_default=True,
              help="seconds open connections may finish after SIGTERM")
@click.option("--hbone-port", type=int, default=15008, show_default=True)
@click.option("--outbound-port", type=int, default=15001, show_default=True)
@click.option("--inbound-port", type=int, default=15006, show_default=True)
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0,
              show_default=True,
              help="seconds without a byte either way after which a proxied connection is "
                   "reset on both sides")
@click.option("--max-conns-per-pod", type=click.IntRange(min=1),
              default=_LIMITS.max_connections_per_pod, show_default=True,
              help="connections one pod may have open through the agent; more are reset")
@click.option("--max-pending-handshakes", type=click.IntRange(min=1),
              default=_LIMITS.max_pending_handshakes, show_default=True,
              help="inbound HBONE TLS handshakes in progress per pod; more are reset")
@click.option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True),
              default=_LIMITS.handshake_timeout, show_default=True,
              help="seconds a peer has to finish the TLS handshake on 15008")
@click.option("--max-dials-per-conn", type=click.IntRange(min=1),
              default=_LIMITS.max_dials_per_connection, show_default=True,
              help="upstream dials in flight per HBONE connection; further streams wait")
@click.option("--max-resets-per-window", type=click.IntRange(min=1),
              default=_LIMITS.flood.max_premature_resets, show_default=True,
              help="streams a peer may reset before their answer per window (rapid reset); "
                   "beyond it: GOAWAY ENHANCE_YOUR_CALM")
@click.option("--max-control-frames-per-window", type=click.IntRange(min=1),
              default=_LIMITS.flood.max_control_frames, show_default=True,
              help="PING/SETTINGS/PRIORITY/empty DATA frames a peer may send per window")
@click.option("--abuse-window", type=click.FloatRange(min=0, min_open=True),
              default=_LIMITS.flood.window, show_default=True,
              help="seconds over which resets and control frames are counted")
@click.option("--max-peer-backlog", type=click.IntRange(min=1),
              default=_LIMITS.max_peer_backlog, show_default=True,
              help="bytes of answers an HBONE peer may leave unread before the agent stops "
                   "reading it")
def command(
    config_path: str, node: str, backend: str, ebpf_fastpath: bool,
    no_redirect: bool, cleanup_on_exit: bool, readiness_addr: str, metrics_addr: str,
    admin_addr: str, drain_timeout: float, hbone_port: int,
    outbound_port: int, inbound_port: int, idle_timeout: float, max_conns_per_pod: int,
    max_pending_handshakes: int, handshake_timeout: float, max_dials_per_conn: int,
    max_resets_per_window: int, max_control_frames_per_window: int, abuse_window: float,
    max_peer_backlog: int, **identity_kwargs: Any,
) -> None:
    """Run the node agent: enroll this node's pods and proxy their traffic."""
    if ebpf_fastpath and backend != "ebpf":
        raise click.BadParameter("needs --redirect ebpf", param_hint="--ebpf-fastpath")
    identity = IdentitySource.pop(identity_kwargs)
    identity.check()
    options = AgentOptions(
        config=config_path,
        node=node,
        in_pod=not no_redirect,
        readiness_addr=_hostport(readiness_addr, "--readiness-addr"),
        metrics_addr=_hostport(metrics_addr, "--metrics-addr"),
        admin_addr=_hostport(admin_addr, "--admin-addr"),
        ports=Ports(outbound=outbound_port, inbound_plaintext=inbound_port,
                    inbound_hbone=hbone_port),
        drain_timeout=drain_timeout,
        cleanup_on_exit=cleanup_on_exit,
        idle_timeout=idle_timeout,
        limits=Limits(
            max_connections_per_pod=max_conns_per_pod,
            max_pending_handshakes=max_pending_handshakes,
            handshake_timeout=handshake_timeout,
            max_dials_per_connection=max_dials_per_conn,
            flood=FloodLimits(window=abuse_window, max_premature_resets=max_resets_per_window,
                              max_control_frames=max_control_frames_per_window),
            max_peer_backlog=max_peer_backlog,
        ),
    )
    apps: list[AgentApp] = []
    # Node restriction (dev CA) against the agent's live snapshot (the file it enrolls from).
    client, renewer = identity.client(node, lambda: apps[0].env.snapshot())
    redirector: OpsRedirector | EbpfRedirector | None = None
    overrides = None
    if backend == "ebpf" and not no_redirect:
        # A missing kernel feature stops start-up with its name.
        check_ebpf(fastpath=ebpf_fastpath, outbound_port=outbound_port)
        redirector = EbpfRedirector(lambda: apps[0].env.snapshot(), node,
                                    fastpath=ebpf_fastpath)
        overrides = use_map_original_dst
    elif not no_redirect:
        redirector = OpsRedirector(backend)
    app = AgentApp(options, client, redirector, node_renewer=renewer, env_overrides=overrides)
    apps.append(app)
    try:
        import uvloop

        with background_logging():
            uvloop.run(app.run())
    except NodeproxyError:
        raise
    except KeyboardInterrupt:
        pass

