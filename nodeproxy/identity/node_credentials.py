"""The agent's node certificate: loading it, keeping renewals, renewing it before it expires.

The node certificate (``spiffe://<td>/node/<name>``) is how an agent authenticates to the CA
service.  ``nodeproxy ca issue-node`` bootstraps it (30 days by default); from then on the agent
renews it at half-life through the CA service (``POST /v1/renew-node``, authenticated with the
current one), so a long-running node never goes dark when its bootstrap certificate expires.

Renewals are kept in the state directory as ONE file, ``node.pem`` (private key + chain, mode
0600), replaced atomically: key and certificate can never be seen out of step.  At start the
agent takes whichever of the bootstrap pair and the stored pair is valid and expires last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import load_ec_private_key, new_key_and_csr
from nodeproxy.identity.manager import MIN_REFRESH, backoff_delay
from nodeproxy.identity.svid import (
    certs_to_pem,
    load_pem_chain,
    private_key_pem,
    same_public_key,
    single_uri_san,
)
from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.spiffe import NodeId

log = logging.getLogger("nodeproxy.identity")
_EXTRA = {"component": "identity"}

STATE_FILE = "node.pem"
_KEY_MARKER = b"-----BEGIN PRIVATE KEY-----"


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    """A node certificate chain (leaf first) and its private key, checked to belong together."""

    node_id: NodeId
    chain_pem: bytes
    key_pem: bytes
    not_before: datetime
    not_after: datetime
    serial_hex: str

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, origin: str) -> NodeCredentials:
        """Parse and cross-check; IdentityError names ``origin`` (a file, or "renewal")."""
        chain = load_pem_chain(chain_pem, f"{origin}: node certificate")
        leaf = chain[0]
        try:
            node_id = NodeId.parse(single_uri_san(leaf))
        except SpiffeIdError as exc:
            raise IdentityError(
                f"{origin}: not a node certificate: {exc}",
                hint="agents authenticate with 'nodeproxy ca issue-node' certificates",
            ) from None
        key = load_ec_private_key(key_pem, f"{origin}: node private key")
        if not same_public_key(key.public_key(), leaf.public_key()):
            raise IdentityError(
                f"{origin}: the private key does not belong to the node certificate",
                hint="pass the key written together with the certificate by 'ca issue-node'",
            )
        return cls(
            node_id=node_id,
            chain_pem=certs_to_pem(chain),
            key_pem=private_key_pem(key),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial_hex=format(leaf.serial_number, "x"),
        )

    def renew_at(self) -> float:
        """Epoch seconds of the half-life."""
        start, end = self.not_before.timestamp(), self.not_after.timestamp()
        return start + (end - start) / 2

    def expired(self, now: float) -> bool:
        return now >= self.not_after.timestamp()

    def __repr__(self) -> str:  # never the key
        return (f"NodeCredentials({self.node_id}, serial={self.serial_hex}, "
                f"not_after={self.not_after.isoformat()})")


def choose_credentials(
    bootstrap: NodeCredentials, stored: NodeCredentials | None, now: float
) -> tuple[NodeCredentials, str]:
    """The pair to start with, and why.  Pure: the caller loads both and logs the reason."""
    if stored is None:
        stored_state = "no stored renewal"
    elif stored.node_id != bootstrap.node_id:
        stored_state = f"stored certificate is for {stored.node_id}, not {bootstrap.node_id}"
        stored = None
    elif stored.expired(now):
        stored_state = f"stored renewal expired at {stored.not_after.isoformat()}"
        stored = None
    else:
        stored_state = "stored renewal"
    if bootstrap.expired(now) and stored is None:
        raise IdentityError(
            f"node certificate for {bootstrap.node_id} expired at "
            f"{bootstrap.not_after.isoformat()} ({stored_state})",
            hint="issue a new one with 'nodeproxy ca issue-node' and restart the agent",
        )
    if stored is not None and (bootstrap.expired(now) or stored.not_after > bootstrap.not_after):
        return stored, "stored renewal (expires after the bootstrap certificate)"
    if stored is not None:
        return bootstrap, "bootstrap certificate expires after the stored renewal"
    return bootstrap, stored_state


class NodeCredentialStore:
    """``node.pem`` in the state directory: one file, so key and chain change together."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / STATE_FILE

    def load(self) -> NodeCredentials | None:
        """The stored pair; None when absent or unusable (logged, never fatal: the bootstrap
        pair may still be valid)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read stored node certificate", extra={
                **_EXTRA, "path": str(self.path), "error": exc.strerror})
            return None
        key_end = data.find(b"-----END PRIVATE KEY-----")
        if not data.startswith(_KEY_MARKER) or key_end < 0:
            log.warning("stored node certificate is damaged (no leading private key); ignored",
                        extra={**_EXTRA, "path": str(self.path)})
            return None
        split = key_end + len(b"-----END PRIVATE KEY-----\n")
        try:
            return NodeCredentials.from_pem(data[split:], data[:split], str(self.path))
        except IdentityError as exc:
            log.warning("stored node certificate ignored", extra={
                **_EXTRA, "path": str(self.path), "error": exc.message})
            return None

    def save(self, creds: NodeCredentials) -> None:
        """Replace ``node.pem`` atomically (written 0600, fsynced, renamed over the old one)."""
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(creds.key_pem + creds.chain_pem)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise IdentityError(
                f"cannot store the renewed node certificate in {self.path}: {exc.strerror}",
                hint="the state directory (--state-dir) must be writable by the agent",
            ) from None


class NodeRenewalClient(Protocol):
    """What the renewer needs from the CA client (RemoteCaClient implements it)."""

    async def renew_node(self, csr_pem: bytes) -> tuple[bytes, bytes]: ...
    def use_credentials(self, chain_pem: bytes, key_pem: bytes) -> None: ...


class NodeCertRenewer:
    """Renews the node certificate at half-life; retries with the SVID back-off on failure.

    A failed store is logged and the renewed pair is used from memory (a restart then falls
    back to the bootstrap pair while it is valid)."""

    def __init__(
        self,
        client: NodeRenewalClient,
        creds: NodeCredentials,
        store: NodeCredentialStore | None,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._creds = creds
        self._store = store
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self.failures = 0
        self.last_error: str | None = None

    @property
    def current(self) -> NodeCredentials:
        return self._creds

    def next_delay(self) -> float:
        if self.failures:
            return backoff_delay(self.failures, self._rng)
        return max(MIN_REFRESH, self._creds.renew_at() - self._clock())

    async def run(self) -> None:
        while True:
            await self._sleep(self.next_delay())
            try:
                await self.renew_once()
            except Exception as exc:  # never let the loop die: the node would go dark later
                self.failures += 1
                self.last_error = exc.message if isinstance(exc, IdentityError) else str(exc)
                log.warning("node certificate renewal failed; retrying with back-off", extra={
                    **_EXTRA, "node": str(self._creds.node_id), "failures": self.failures,
                    "expires": self._creds.not_after.isoformat(), "error": self.last_error})

    async def renew_once(self) -> NodeCredentials:
        key, csr = new_key_and_csr(self._creds.node_id)
        try:
            chain_pem, _bundle = await self._client.renew_node(csr)
        except IdentityError:
            raise
        except Exception as exc:  # a transport surprise must not end the renewal loop
            raise IdentityError(f"node certificate renewal failed: {exc}") from exc
        renewed = NodeCredentials.from_pem(chain_pem, private_key_pem(key), "CA service reply")
        if renewed.node_id != self._creds.node_id:
            raise IdentityError(
                f"CA service renewed {renewed.node_id}, but this agent is {self._creds.node_id}")
        self._client.use_credentials(renewed.chain_pem, renewed.key_pem)
        self._creds, self.failures, self.last_error = renewed, 0, None
        log.info("node certificate renewed", extra={
            **_EXTRA, "node": str(renewed.node_id), "serial": renewed.serial_hex,
            "not_after": renewed.not_after.isoformat()})
        if self._store is not None:
            try:
                self._store.save(renewed)
            except IdentityError as exc:
                log.error("renewed node certificate kept in memory only", extra={
                    **_EXTRA, "error": exc.message, "hint": exc.hint})
        return renewed
