"""``nodeproxy hbone connect``: pipe stdin/stdout through one HBONE CONNECT stream."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeproxy.hbone.client_tool import ConnectOptions, connect
from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.spiffe import SpiffeId


@click.group(name="hbone")
def command() -> None:
    """HBONE debugging tools."""


@command.command(name="connect")
@click.argument("target")
@click.option("--authority", required=True, help="CONNECT :authority, the pod IP:PORT")
@click.option("--cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="client SVID chain (PEM), e.g. from 'nodeproxy ca issue'")
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False),
              help="trust bundle (PEM)")
@click.option("--expect-san", multiple=True,
              help="SPIFFE ID the server must present (repeatable; default: any in our "
                   "trust domain)")
@click.option("--timeout", type=float, default=10.0, show_default=True)
def connect_cmd(target: str, authority: str, cert: str, key: str, ca: str,
                expect_san: tuple[str, ...], timeout: float) -> None:
    """Open TARGET (HOST:15008), CONNECT to --authority, relay stdin/stdout.

    Exit codes: 0 ok, 2 TLS failure, 3 identity mismatch, 4 denied (401),
    5 upstream/connect failure (503, refused, timeout), 6 bad request (400), 1 other.
    """
    try:
        host, port = parse_host_port(target, "TARGET")
    except HostPortError as exc:
        raise click.BadParameter(f"{target!r}: {exc.reason}; want HOST:PORT",
                                 param_hint="TARGET") from None
    try:
        expected = tuple(SpiffeId.parse(s) for s in expect_san)
    except SpiffeIdError as exc:
        raise click.BadParameter(str(exc), param_hint="--expect-san") from None
    sys.exit(connect(ConnectOptions(host, port, authority, Path(cert),
                                    Path(key), Path(ca), expected, timeout)))
