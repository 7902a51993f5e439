"""`nodeproxy ca`: create a CA, issue debug/node certificates, run the CA service."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from nodeproxy.controlplane.endpoint import is_store_url
from nodeproxy.controlplane.wiring import StoreSnapshots
from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import (
    DEFAULT_NODE_LIFETIME,
    DEFAULT_SVID_LIFETIME,
    CertificateAuthority,
    new_key_and_csr,
    write_new_file,
)
from nodeproxy.identity.svid import private_key_pem
from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 24h, 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


F = TypeVar("F", bound=Callable[..., Any])


def _duration_option(default: timedelta) -> Callable[[F], F]:
    hours = int(default.total_seconds() // 3600)
    text = f"{hours}h" if hours < 48 else f"{hours // 24}d"
    return click.option(
        "--lifetime",
        default=text,
        show_default=True,
        callback=lambda _c, _p, v: parse_duration(v),
        help="certificate lifetime (s/m/h/d)",
    )


@click.group(name="ca")
def command() -> None:
    """Certificate authority: init, issue certificates, serve CSRs to agents."""


@command.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option(
    "--intermediate", is_flag=True, help="also create an intermediate CA that signs leaves"
)
def init_cmd(directory: str, trust_domain: str, intermediate: bool) -> None:
    """Create a root CA (ECDSA P-256, 10 years) in DIR; never overwrites."""
    ca = CertificateAuthority.init(directory, trust_domain=trust_domain, intermediate=intermediate)
    kind = "root + intermediate" if intermediate else "root"
    click.echo(f"created {kind} CA for trust domain {ca.trust_domain} in {directory}")


def _output_options(func: F) -> F:
    """--out-cert/--out-key/--out-bundle/--force, shared by the issuing commands."""
    for option in reversed((
        click.option("--out-cert", required=True, type=click.Path(dir_okay=False)),
        click.option("--out-key", required=True, type=click.Path(dir_okay=False)),
        click.option("--out-bundle", type=click.Path(dir_okay=False),
                     help="also write the trust bundle"),
        click.option("--force", is_flag=True, help="replace existing output files"),
    )):
        func = option(func)
    return func


def _write_issued(
    out_cert: str, out_key: str, out_bundle: str | None, chain: bytes, key_pem: bytes,
    bundle_pem: bytes, force: bool,
) -> None:
    write_new_file(out_cert, chain, 0o644, force=force)
    write_new_file(out_key, key_pem, 0o600, force=force)
    if out_bundle:
        write_new_file(out_bundle, bundle_pem, 0o644, force=force)


@command.command("issue")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--spiffe-id", "spiffe_id", required=True)
@_output_options
@_duration_option(DEFAULT_SVID_LIFETIME)
def issue_cmd(
    directory: str,
    spiffe_id: str,
    out_cert: str,
    out_key: str,
    out_bundle: str | None,
    lifetime: timedelta,
    force: bool,
) -> None:
    """Issue a workload X.509-SVID with a new key (debug tool; the key is written 0600)."""
    ca = CertificateAuthority.load(directory)
    try:
        identity = SpiffeId.parse(spiffe_id)
    except SpiffeIdError as exc:
        raise IdentityError(f"--spiffe-id: {exc.message}") from None
    key, csr = new_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, lifetime)
    _write_issued(out_cert, out_key, out_bundle, issued.chain_pem, private_key_pem(key),
                  ca.trust_bundle_pem, force)
    click.echo(f"issued {identity} serial {issued.serial_hex} until {issued.not_after.isoformat()}")


@command.command("issue-node")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--node", required=True)
@_output_options
@_duration_option(DEFAULT_NODE_LIFETIME)
def issue_node_cmd(
    directory: str,
    node: str,
    out_cert: str,
    out_key: str,
    out_bundle: str | None,
    lifetime: timedelta,
    force: bool,
) -> None:
    """Issue a node certificate (spiffe://<td>/node/<NODE>) for an agent to use with the CA
    service."""
    ca = CertificateAuthority.load(directory)
    issued, key = ca.issue_node_cert(node, lifetime=lifetime)
    assert key is not None
    _write_issued(out_cert, out_key, out_bundle, issued.chain_pem, private_key_pem(key),
                  ca.trust_bundle_pem, force)
    click.echo(
        f"issued spiffe://{ca.trust_domain}/node/{node} serial {issued.serial_hex} "
        f"until {issued.not_after.isoformat()}"
    )


def _config_arg(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if is_store_url(value) or Path(value).is_file():
        return value
    raise click.BadParameter(f"{value!r} is neither a file nor an etcd:// URL")


@command.command("serve")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--config", "config", required=True, callback=_config_arg,
              help="config FILE, or etcd://HOST:PORT[,...][?ca=&cert=&key=] (node placement)")
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="ADDR:PORT")
@_duration_option(DEFAULT_SVID_LIFETIME)
@click.option("--node-lifetime", default="30d", show_default=True,
              callback=lambda _c, _p, v: parse_duration(v),
              help="lifetime of renewed node certificates (agents renew at half-life)")
def serve_cmd(
    directory: str, config: str, listen: str, lifetime: timedelta, node_lifetime: timedelta
) -> None:
    """Serve CSRs over mTLS to agents holding node certificates (node-restricted issuance)."""
    from nodeproxy.identity import ca_service

    ca = CertificateAuthority.load(directory)
    host, port = ca_service.parse_listen(listen)
    if not is_store_url(config):
        snapshots = ca_service.SnapshotFile(config)
        asyncio.run(ca_service.serve(ca, snapshots, host, port, lifetime=lifetime,
                                     node_lifetime=node_lifetime))
        return

    async def from_store() -> None:
        # Placement (which workload runs on which node) from the store, kept current by a
        # watch; the last good snapshot stays in force while the store is unreachable.
        placement = StoreSnapshots(config)
        await placement.start()
        watch = asyncio.ensure_future(placement.run())
        try:
            await ca_service.serve(ca, placement, host, port, lifetime=lifetime,
                                   node_lifetime=node_lifetime)
        finally:
            placement.stop()
            await watch

    asyncio.run(from_store())
