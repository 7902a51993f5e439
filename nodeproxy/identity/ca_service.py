"""The CA service: ``nodeproxy ca serve --dir DIR --config FILE --listen ADDR:PORT``.

HTTPS (TLS 1.3) with mutual TLS.  Agents authenticate with a node certificate issued by this
CA (URI SAN ``spiffe://<td>/node/<name>``); the caller's node name comes from that SAN.

``POST /v1/sign`` ``{"identity": "spiffe://...", "csr": "<PEM>"}`` ->
``200 {"chain": "<PEM leaf+intermediates>", "bundle": "<PEM roots>", "serial", "notAfter"}``;
``400 {"reason"}`` for a malformed body, identity or CSR; ``403 {"reason"}`` when the identity is
not scheduled on the caller's node (or the client is not a node).

``POST /v1/renew-node`` ``{"csr": "<PEM>"}`` -> the same 200 document with a new node
certificate for the CALLER's node (the name comes from the certificate it authenticated with;
a CSR naming another node is a 400).  Agents call it at half-life of their node certificate.

The service's own certificate (URI SAN ``spiffe://<td>/ca``) is issued in memory at start and
renewed at half-life; its key is never written anywhere.  The config file is re-read when its
mtime/size changes (checked on each request), so newly scheduled workloads get certificates;
a broken file keeps the last good snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import (
    DEFAULT_NODE_LIFETIME,
    DEFAULT_SVID_LIFETIME,
    CertificateAuthority,
    IssuedCert,
    new_private_key,
)
from nodeproxy.identity.svid import node_identity_from_der, private_key_pem
from nodeproxy.tls import context_from_pem
from ztunnel_cfg.errors import NodeproxyError, SpiffeIdError
from ztunnel_cfg.hostport import HostPortError, parse_host_port
from ztunnel_cfg.spiffe import NodeId, SpiffeId

if TYPE_CHECKING:
    from ztunnel_cfg.snapshot import Snapshot

log = logging.getLogger("nodeproxy.ca")
_LOG = {"component": "ca"}
SERVICE_CERT_LIFETIME = timedelta(days=7)
MAX_BODY = 64 * 1024


def _default_loader(path: Path) -> Snapshot:
    from ztunnel_cfg.snapshot import load_snapshot

    return load_snapshot(path)


class SnapshotFile:
    """The latest good snapshot of a config file, reloaded when its mtime or size changes."""

    def __init__(
        self, path: str | os.PathLike[str], loader: Callable[[Path], Snapshot] | None = None
    ):
        self.path = Path(path)
        self._loader = loader or _default_loader
        self._stamp: tuple[int, int] | None = None
        self._snapshot: Snapshot | None = None
        self.last_error: str | None = None

    def get(self) -> Snapshot:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            stamp = None
            error = f"cannot stat {self.path}: {exc.strerror or exc}"
        if stamp is not None and stamp != self._stamp:
            try:
                self._snapshot = self._loader(self.path)
                self._stamp, self.last_error = stamp, None
                log.info("config loaded", extra={**_LOG, "file": str(self.path)})
            except NodeproxyError as exc:
                error = str(exc)
                self._stamp = stamp  # do not re-parse the same broken file on every request
                self.last_error = error
                kept = "; keeping the last good one" if self._snapshot is not None else ""
                log.error(
                    f"config rejected{kept}",
                    extra={**_LOG, "file": str(self.path), "error": error},
                )
        elif stamp is None:
            self.last_error = error
        if self._snapshot is None:
            raise IdentityError(
                f"no valid config: {self.last_error}",
                hint=f"fix {self.path} ('nodeproxy config validate')",
            )
        return self._snapshot


class _ServiceContexts:
    """Server ssl context whose certificate is re-issued at half-life (swapped per handshake)."""

    def __init__(self, ca: CertificateAuthority, clock: Callable[[], float]) -> None:
        self._ca = ca
        self._clock = clock
        self._renew_at = 0.0
        self._current = self._build()
        self.front = self._build()
        self.front.sni_callback = self._pick  # called for every handshake, SNI or not

    def _build(self) -> ssl.SSLContext:
        key = new_private_key()
        issued = self._ca.issue_service_cert(key.public_key(), SERVICE_CERT_LIFETIME)
        start, end = issued.not_before.timestamp(), issued.not_after.timestamp()
        self._renew_at = start + (end - start) / 2
        return context_from_pem(
            server=True,
            chain_pem=issued.chain_pem,
            key_pem=private_key_pem(key),
            bundle_pem=self._ca.trust_bundle_pem,
            alpn=["http/1.1"],
        )

    def _pick(self, ssl_obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._clock() >= self._renew_at:
            self._current = self._build()
        ssl_obj.context = self._current


def _reply(status: int, **doc: Any) -> web.Response:
    return web.json_response(doc, status=status)


def _issued_reply(ca: CertificateAuthority, issued: IssuedCert) -> web.Response:
    return _reply(
        200,
        chain=issued.chain_pem.decode(),
        bundle=ca.trust_bundle_pem.decode(),
        serial=issued.serial_hex,
        notAfter=issued.not_after.isoformat(),
    )


def _caller_node(request: web.Request, ca: CertificateAuthority) -> NodeId | web.Response:
    """The node identity of the mTLS client certificate, or the 403 reply refusing it."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    try:
        node_id = node_identity_from_der(der)
    except IdentityError as exc:
        log.warning("refused: caller is not a node", extra={**_LOG, "reason": exc.message})
        return _reply(403, reason=exc.message)
    if node_id.trust_domain != ca.trust_domain:
        return _reply(403, reason=f"node {node_id} is not in trust domain {ca.trust_domain}")
    return node_id


async def _json_body(request: web.Request) -> Any:
    """The parsed JSON body, or the 400 reply when it is not JSON.  The body is at most
    MAX_BODY (the app's client_max_size answers 413 beyond)."""
    try:
        return await request.json()
    except ValueError:
        return _reply(400, reason="body is not JSON")
    except RecursionError:
        # json's parser recurses per nesting level; a 64 KiB body can exceed the stack limit.
        return _reply(400, reason="body is not a JSON object: arrays/objects nested too deeply")


def build_app(
    ca: CertificateAuthority,
    snapshots: Callable[[], Snapshot],
    *,
    lifetime: timedelta = DEFAULT_SVID_LIFETIME,
    node_lifetime: timedelta = DEFAULT_NODE_LIFETIME,
) -> web.Application:
    from ztunnel_cfg.issuance import may_issue

    async def sign(request: web.Request) -> web.Response:
        node_id = _caller_node(request, ca)
        if isinstance(node_id, web.Response):
            return node_id
        node = node_id.node
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if not (
            isinstance(body, dict)
            and isinstance(body.get("identity"), str)
            and isinstance(body.get("csr"), str)
        ):
            return _reply(400, reason='expected {"identity": "spiffe://...", "csr": "<PEM>"}')
        try:
            identity = SpiffeId.parse(body["identity"])
        except SpiffeIdError as exc:
            return _reply(400, reason=exc.message)
        if identity.trust_domain != ca.trust_domain:
            return _reply(400, reason=f"{identity} is not in trust domain {ca.trust_domain}")
        try:
            snapshot = snapshots()
        except IdentityError as exc:
            log.error("cannot decide issuance", extra={**_LOG, "error": str(exc)})
            return _reply(503, reason=str(exc))
        decision = may_issue(snapshot, node, identity)
        if not decision.allowed:
            log.warning(
                "refused issuance",
                extra={**_LOG, "identity": identity.uri, "node": node, "reason": decision.reason},
            )
            return _reply(403, reason=decision.reason)
        try:
            issued = ca.sign_csr(body["csr"].encode("ascii", "replace"), identity, lifetime)
        except IdentityError as exc:
            log.warning(
                "refused CSR",
                extra={**_LOG, "identity": identity.uri, "node": node, "reason": exc.message},
            )
            return _reply(400, reason=exc.message)
        log.info(
            "issued",
            extra={
                **_LOG,
                "identity": identity.uri,
                "node": node,
                "serial": issued.serial_hex,
                "not_after": issued.not_after.isoformat(),
            },
        )
        return _issued_reply(ca, issued)

    async def renew_node(request: web.Request) -> web.Response:
        # A node renews only its own identity: the name comes from the certificate it
        # authenticated with, never from the request.
        node_id = _caller_node(request, ca)
        if isinstance(node_id, web.Response):
            return node_id
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if not (isinstance(body, dict) and isinstance(body.get("csr"), str)):
            return _reply(400, reason='expected {"csr": "<PEM>"}')
        try:
            issued, _ = ca.issue_node_cert(
                node_id.node, body["csr"].encode("ascii", "replace"), lifetime=node_lifetime)
        except IdentityError as exc:
            log.warning("refused node renewal",
                        extra={**_LOG, "node": node_id.node, "reason": exc.message})
            return _reply(400, reason=exc.message)
        log.info(
            "renewed node certificate",
            extra={**_LOG, "identity": node_id.uri, "node": node_id.node,
                   "serial": issued.serial_hex, "not_after": issued.not_after.isoformat()},
        )
        return _issued_reply(ca, issued)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/sign", sign)
    app.router.add_post("/v1/renew-node", renew_node)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    try:
        return parse_host_port(listen, "--listen", default_host="0.0.0.0")
    except HostPortError as exc:
        raise IdentityError(f"--listen {listen!r} is not ADDR:PORT: {exc.reason}",
                            hint="e.g. 0.0.0.0:15012 or [::]:15012") from None


class Placement(Protocol):
    """Where workloads run: :class:`SnapshotFile`, or the store (controlplane.wiring)."""

    path: Any

    def get(self) -> Snapshot: ...


async def serve(
    ca: CertificateAuthority,
    snapshots: Placement,
    host: str,
    port: int,
    *,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] | None = None,
    lifetime: timedelta = DEFAULT_SVID_LIFETIME,
    node_lifetime: timedelta = DEFAULT_NODE_LIFETIME,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT)."""
    import time

    snapshots.get()  # fail at start-up on a missing/broken config, not on the first request
    contexts = _ServiceContexts(ca, clock or time.time)
    runner = web.AppRunner(build_app(ca, snapshots.get, lifetime=lifetime,
                                         node_lifetime=node_lifetime), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=contexts.front)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise IdentityError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "CA service listening",
        extra={
            **_LOG,
            "listen": f"{host}:{port}",
            "trust_domain": ca.trust_domain,
            "config": str(snapshots.path),
        },
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
