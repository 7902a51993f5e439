"""The identity options shared by ``nodeproxy run`` and ``nodeproxy waypoint run``: where
certificates come from (the CA service with a node certificate, or a development CA dir)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import CaClient, LocalCaClient, RemoteCaClient
from nodeproxy.identity.node_credentials import (
    NodeCertRenewer,
    NodeCredentials,
    NodeCredentialStore,
    choose_credentials,
)
from ztunnel_cfg.snapshot import Snapshot

log = logging.getLogger("nodeproxy.run")
_EXTRA = {"component": "identity"}
F = TypeVar("F", bound=Callable[..., Any])

DEV_CA_WARNING = ("development only: the CA private key is loaded into the data-plane agent; "
                  "use --ca-address in production")


def _renamed_ca_dir(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # Renamed so that loading a CA private key into the data plane is a visible choice.
    if value is not None:
        raise click.UsageError(
            "--ca-dir is now --dev-ca-dir (development only: it loads the CA private key into "
            "the data-plane agent); in production use --ca-address with --node-cert, "
            "--node-key and --ca-bundle")


def identity_options(func: F) -> F:
    """Adds the options that :class:`IdentitySource` collects (passed as ``identity``)."""
    options = [
        click.option("--dev-ca-dir", type=click.Path(file_okay=False),
                     help="DEVELOPMENT ONLY: sign in-process with the CA in DIR, whose private "
                          "key is then loaded into this process; production uses --ca-address"),
        click.option("--ca-dir", hidden=True, expose_value=False, callback=_renamed_ca_dir),
        click.option("--ca-address",
                     help="URL of 'nodeproxy ca serve', e.g. https://10.0.0.1:15012"),
        click.option("--node-cert", type=click.Path(dir_okay=False),
                     help="node certificate (PEM)"),
        click.option("--node-key", type=click.Path(dir_okay=False), help="node private key (PEM)"),
        click.option("--ca-bundle", type=click.Path(dir_okay=False), help="trust bundle (PEM)"),
        click.option("--state-dir", type=click.Path(file_okay=False),
                     help="keep the renewed node certificate here (node.pem, 0600); without it "
                          "renewals live in memory only"),
        click.option("--svid-lifetime", type=float, default=24.0, show_default=True,
                     help="hours; with --dev-ca-dir only (the CA service sets its own)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True, slots=True)
class IdentitySource:
    dev_ca_dir: str | None
    ca_address: str | None
    node_cert: str | None
    node_key: str | None
    ca_bundle: str | None
    state_dir: str | None
    svid_lifetime: float

    @classmethod
    def pop(cls, kwargs: dict[str, Any]) -> IdentitySource:
        """Take the identity options out of a command's keyword arguments."""
        return cls(*(kwargs.pop(name) for name in (
            "dev_ca_dir", "ca_address", "node_cert", "node_key", "ca_bundle", "state_dir",
            "svid_lifetime")))

    def check(self) -> None:
        if (self.dev_ca_dir is None) == (self.ca_address is None):
            raise click.UsageError("give exactly one of --ca-address (production) or "
                                   "--dev-ca-dir (development only)")

    def client(self, node: str, snapshot: Callable[[], Snapshot]
               ) -> tuple[CaClient, NodeCertRenewer | None]:
        """The CA client for ``node`` (node-restricted against ``snapshot`` in dev mode) and,
        with --ca-address, the node certificate's renewer."""
        self.check()
        if self.dev_ca_dir is not None:
            log.warning(DEV_CA_WARNING, extra=_EXTRA)
            ca = CertificateAuthority.load(self.dev_ca_dir)
            return LocalCaClient(ca, node, snapshot,
                                 lifetime=timedelta(hours=self.svid_lifetime)), None
        assert self.ca_address is not None
        bootstrap = NodeCredentials.from_pem(
            _read(self.node_cert, "--node-cert"), _read(self.node_key, "--node-key"),
            f"{self.node_cert} / {self.node_key}")
        store = NodeCredentialStore(self.state_dir) if self.state_dir is not None else None
        creds, why = choose_credentials(bootstrap, store.load() if store else None, time.time())
        log.info("node certificate %s serial %s until %s (%s)", creds.node_id,
                 creds.serial_hex, creds.not_after.isoformat(), why, extra=_EXTRA)
        if store is None:
            log.warning("no --state-dir: renewed node certificates are kept in memory only; "
                        "a restart after %s needs a new 'ca issue-node'",
                        creds.not_after.isoformat(), extra=_EXTRA)
        remote = RemoteCaClient(self.ca_address, creds.chain_pem, creds.key_pem,
                                _read(self.ca_bundle, "--ca-bundle"))
        return remote, NodeCertRenewer(remote, creds, store)


def _read(path: str | None, what: str) -> bytes:
    if path is None:
        raise click.UsageError(f"--ca-address needs {what}")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
