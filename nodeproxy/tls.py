"""TLS contexts for HBONE and the identity check that follows every handshake.

- TLS 1.3 only, ALPN ``h2``, certificates required both ways, no SNI, no hostname check: the
  peer is identified by its single SPIFFE URI SAN, checked by :func:`verify_peer` right after
  the handshake and before any application byte is sent or accepted.
- Cipher suites: Python 3.11's ssl module has no ``set_ciphersuites`` (``set_ciphers`` only
  affects TLS <= 1.2), so OpenSSL's TLS 1.3 defaults stay (AES-256-GCM, ChaCha20-Poly1305,
  AES-128-GCM; with AES-NI both peers pick AES-GCM first).  To restrict them to AES-GCM
  process-wide, start the agent with an ``OPENSSL_CONF`` whose ``system_default`` section
  sets ``Ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384``.  The negotiated
  suite is reported by :func:`verify_peer`'s caller via ``ssl_object.cipher()``.
- ssl can load keys only from files: we write the chain and key into an anonymous memfd and
  load ``/proc/self/fd/N``, so private keys never touch a filesystem.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.errors import IdentityError
from nodeproxy.identity.svid import Svid, TrustBundle, peer_identity_from_der
from ztunnel_cfg.spiffe import SpiffeId

ALPN_H2 = "h2"
TLS_FAILURE = "TLS_FAILURE"
IDENTITY_ERROR = "IDENTITY_ERROR"


class PeerIdentityError(IdentityError):
    """The peer failed TLS or identity verification.  ``flags`` is the metrics
    ``response_flags`` value (``TLS_FAILURE`` or ``IDENTITY_ERROR``)."""

    def __init__(self, message: str, *, flags: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.flags = flags


@contextlib.contextmanager
def _memfd_pem(data: bytes) -> Iterator[str]:
    """A /proc path to an anonymous in-memory file holding ``data``; closed on exit."""
    fd = os.memfd_create("nodeproxy-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _base_context(
    purpose: int,
    chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes,
    alpn: list[str] | None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # no SNI/hostname: identity is the URI SAN (verify_peer)
    # No session tickets: HBONE connections are pooled and long-lived, resumption buys little.
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    if alpn:
        ctx.set_alpn_protocols(alpn)
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise IdentityError(f"cannot load trust bundle: {exc}") from None
    with _memfd_pem(chain_pem + b"\n" + key_pem) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise IdentityError(f"cannot load certificate and key into TLS: {exc}") from None
    return ctx


def server_context(
    svid: Svid, bundle: TrustBundle, *, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """Server side of an HBONE connection: presents ``svid``, requires a client SVID."""
    return _base_context(
        ssl.PROTOCOL_TLS_SERVER,
        svid.cert_chain_pem,
        svid.key_pem(),
        bundle.pem,
        alpn if alpn is not None else [ALPN_H2],
    )


def client_context(
    svid: Svid, bundle: TrustBundle, *, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """Client side: presents ``svid``, verifies the server chain against ``bundle``.
    Use ``server_hostname=""`` (or an IP) when connecting so no SNI is sent."""
    return _base_context(
        ssl.PROTOCOL_TLS_CLIENT,
        svid.cert_chain_pem,
        svid.key_pem(),
        bundle.pem,
        alpn if alpn is not None else [ALPN_H2],
    )


def context_from_pem(
    *, server: bool, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, alpn: list[str] | None
) -> ssl.SSLContext:
    """Same policy for non-workload certificates (node certificates, the CA service)."""
    purpose = ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT
    return _base_context(purpose, chain_pem, key_pem, bundle_pem, alpn)


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    trust_domain: str,
    expected: Collection[SpiffeId] | None = None,
    *,
    require_alpn: str | None = ALPN_H2,
) -> SpiffeId:
    """Check the peer right after the handshake; return its SPIFFE ID.

    The chain was verified by OpenSSL against the bundle.  Here: TLS 1.3, ALPN, exactly one URI
    SAN that is a valid workload SPIFFE ID in ``trust_domain``, and (client side) one of
    ``expected``.  Raises :class:`PeerIdentityError`; the caller closes the connection."""
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise PeerIdentityError(
            f"peer negotiated {version}, TLS 1.3 is required", flags=TLS_FAILURE
        )
    if require_alpn is not None and ssl_object.selected_alpn_protocol() != require_alpn:
        raise PeerIdentityError(
            f"peer did not negotiate ALPN {require_alpn!r}",
            flags=TLS_FAILURE,
            hint="is the peer an HBONE endpoint (port 15008)?",
        )
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate", flags=TLS_FAILURE)
    try:
        peer = peer_identity_from_der(der)
    except IdentityError as exc:
        raise PeerIdentityError(exc.message, flags=IDENTITY_ERROR, hint=exc.hint) from None
    if peer.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"peer identity {peer} is not in trust domain {trust_domain!r}",
            flags=IDENTITY_ERROR,
            hint="do both nodes use the same CA and trust domain?",
        )
    if expected is not None and peer not in expected:
        want = ", ".join(sorted(str(e) for e in expected)) or "(none)"
        raise PeerIdentityError(
            f"peer identity {peer} is not the expected {want}",
            flags=IDENTITY_ERROR,
            hint="is the destination address served by the workload the config says?",
        )
    return peer


# ---- context cache (rotation) -----------------------------------------------------------


class SvidSource(Protocol):
    """What the cache needs from the certificate manager."""

    async def get(self, identity: SpiffeId) -> Svid: ...

    def current(self, identity: SpiffeId) -> Svid | None: ...

    @property
    def bundle(self) -> TrustBundle | None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    serial: int
    bundle: str
    context: ssl.SSLContext


ContextFactory = Callable[[Svid, TrustBundle], ssl.SSLContext]


class ContextCache:
    """ssl contexts per (role, identity), rebuilt when the certificate or bundle changes.

    A context is immutable once handed out, so existing connections keep their certificate;
    new connections get a context built for the current one.  For listeners that keep a
    single context, :meth:`rotating_server_context` swaps the current context in per
    handshake (OpenSSL calls the servername callback even without SNI)."""

    def __init__(
        self,
        source: SvidSource,
        *,
        server_factory: ContextFactory = server_context,
        client_factory: ContextFactory = client_context,
    ) -> None:
        self._source = source
        self._factories = {"server": server_factory, "client": client_factory}
        self._entries: dict[tuple[str, SpiffeId], _Entry] = {}

    async def server(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._context("server", await self._source.get(identity))

    async def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._context("client", await self._source.get(identity))

    def current_server(self, identity: SpiffeId) -> ssl.SSLContext | None:
        svid = self._source.current(identity)
        return self._context("server", svid) if svid is not None else None

    def _context(self, role: str, svid: Svid) -> ssl.SSLContext:
        bundle = self._source.bundle
        if bundle is None:
            raise IdentityError("no trust bundle yet", hint="has the CA answered at least once?")
        key = (role, svid.identity)
        entry = self._entries.get(key)
        if entry is None or entry.serial != svid.serial or entry.bundle != bundle.fingerprint:
            entry = _Entry(svid.serial, bundle.fingerprint, self._factories[role](svid, bundle))
            self._entries[key] = entry
        return entry.context

    def forget(self, identity: SpiffeId) -> None:
        for role in self._factories:
            self._entries.pop((role, identity), None)

    def on_rotate(self, identity: SpiffeId, svid: Svid) -> None:
        """Hook for ``CertificateManager.on_rotate``: drop the stale context eagerly."""
        self.forget(identity)

    async def rotating_server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """A stable server context for a listener whose handshakes always use the latest
        certificate of ``identity`` (existing connections are unaffected)."""

        def pick(
            ssl_obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            current = self.current_server(identity)
            if current is not None and current is not ssl_obj.context:
                ssl_obj.context = current
            return None

        # A dedicated front context so replacing entries never mutates one in use elsewhere.
        svid = await self._source.get(identity)
        bundle = self._source.bundle
        if bundle is None:
            raise IdentityError("no trust bundle yet", hint="has the CA answered at least once?")
        front = self._factories["server"](svid, bundle)
        front.sni_callback = pick
        return front
