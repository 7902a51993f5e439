"""``nodeproxy run``: the node agent."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import click

from nodeproxy.app import AgentApp, AgentOptions
from nodeproxy.hbone.flood import FloodLimits
from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import CaClient, LocalCaClient, RemoteCaClient
from nodeproxy.identity.node_credentials import (
    NodeCertRenewer,
    NodeCredentials,
    NodeCredentialStore,
    choose_credentials,
)
from nodeproxy.proxy.env import Ports
from nodeproxy.proxy.limits import Limits
from redirect import ops
from redirect.spec import RedirectSpec
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.hostport import HostPortError, parse_host_port

log = logging.getLogger("nodeproxy.run")
_LIMITS = Limits()  # the defaults shown by --help
_EXTRA = {"component": "identity"}


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


def _read(path: str | None, what: str) -> bytes:
    if path is None:
        raise click.UsageError(f"--ca-address needs {what}")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _renamed_ca_dir(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # Renamed so that loading a CA private key into the data plane is a visible choice.
    if value is not None:
        raise click.UsageError(
            "--ca-dir is now --dev-ca-dir (development only: it loads the CA private key into "
            "the data-plane agent); in production use --ca-address with --node-cert, "
            "--node-key and --ca-bundle")


DEV_CA_WARNING = ("development only: the CA private key is loaded into the data-plane agent; "
                  "use --ca-address in production")


@click.command(name="run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="cluster config YAML (watched; SIGHUP forces a reload)")
@click.option("--node", required=True, help="this node's name (workloads with node: NAME)")
@click.option("--dev-ca-dir", type=click.Path(file_okay=False),
              help="DEVELOPMENT ONLY: sign in-process with the CA in DIR, whose private key "
                   "is then loaded into the agent; production uses --ca-address")
@click.option("--ca-dir", hidden=True, expose_value=False, callback=_renamed_ca_dir)
@click.option("--ca-address", help="URL of 'nodeproxy ca serve', e.g. https://10.0.0.1:15012")
@click.option("--node-cert", type=click.Path(dir_okay=False), help="node certificate (PEM)")
@click.option("--node-key", type=click.Path(dir_okay=False), help="node private key (PEM)")
@click.option("--ca-bundle", type=click.Path(dir_okay=False), help="trust bundle (PEM)")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="keep the renewed node certificate here (node.pem, 0600); without it "
                   "renewals live in memory only")
@click.option("--redirect", "backend", type=click.Choice(["iptables", "nftables"]),
              default="iptables", show_default=True, help="capture rules backend")
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
@click.option("--svid-lifetime", type=float, default=24.0, show_default=True,
              help="hours; with --dev-ca-dir only (the CA service sets its own)")
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
    config_path: str, node: str, dev_ca_dir: str | None, ca_address: str | None,
    node_cert: str | None, node_key: str | None, ca_bundle: str | None, state_dir: str | None,
    backend: str,
    no_redirect: bool, cleanup_on_exit: bool, readiness_addr: str, metrics_addr: str,
    admin_addr: str, drain_timeout: float, svid_lifetime: float, hbone_port: int,
    outbound_port: int, inbound_port: int, idle_timeout: float, max_conns_per_pod: int,
    max_pending_handshakes: int, handshake_timeout: float, max_dials_per_conn: int,
    max_resets_per_window: int, max_control_frames_per_window: int, abuse_window: float,
    max_peer_backlog: int,
) -> None:
    """Run the node agent: enroll this node's pods and proxy their traffic."""
    if (dev_ca_dir is None) == (ca_address is None):
        raise click.UsageError("give exactly one of --ca-address (production) or --dev-ca-dir "
                               "(development only)")
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
    client: CaClient
    apps: list[AgentApp] = []
    renewer: NodeCertRenewer | None = None
    if dev_ca_dir is not None:
        log.warning(DEV_CA_WARNING, extra=_EXTRA)
        ca = CertificateAuthority.load(dev_ca_dir)
        # Node restriction against the agent's live snapshot (the same file it enrolls from).
        client = LocalCaClient(ca, node, lambda: apps[0].env.snapshot(),
                               lifetime=timedelta(hours=svid_lifetime))
    else:
        assert ca_address is not None
        bootstrap = NodeCredentials.from_pem(
            _read(node_cert, "--node-cert"), _read(node_key, "--node-key"),
            f"{node_cert} / {node_key}")
        store = NodeCredentialStore(state_dir) if state_dir is not None else None
        creds, why = choose_credentials(bootstrap, store.load() if store else None, time.time())
        log.info("node certificate %s serial %s until %s (%s)", creds.node_id,
                 creds.serial_hex, creds.not_after.isoformat(), why, extra=_EXTRA)
        if store is None:
            log.warning("no --state-dir: renewed node certificates are kept in memory only; "
                        "a restart after %s needs a new 'ca issue-node'",
                        creds.not_after.isoformat(), extra=_EXTRA)
        remote = RemoteCaClient(ca_address, creds.chain_pem, creds.key_pem,
                                _read(ca_bundle, "--ca-bundle"))
        client, renewer = remote, NodeCertRenewer(remote, creds, store)
    redirector = None if no_redirect else OpsRedirector(backend)
    app = AgentApp(options, client, redirector, node_renewer=renewer)
    apps.append(app)
    try:
        import uvloop

        uvloop.run(app.run())
    except NodeproxyError:
        raise
    except KeyboardInterrupt:
        pass

