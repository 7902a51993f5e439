"""How the certificate manager gets certificates signed: a local CA directory (single machine)
or the remote CA service (multi-node).  Both take a CSR; private keys never leave the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import DEFAULT_SVID_LIFETIME, CertificateAuthority, ca_service_uri
from nodeproxy.identity.svid import TrustBundle, load_pem_chain, single_uri_san
from ztunnel_cfg.spiffe import SpiffeId

if TYPE_CHECKING:
    from ztunnel_cfg.snapshot import Snapshot

MAX_RESPONSE = 1024 * 1024  # a chain and a bundle are a few KiB


class CaClient(Protocol):
    async def sign(self, identity: SpiffeId, csr_pem: bytes) -> tuple[bytes, bytes]:
        """Return (certificate chain PEM, leaf first; trust bundle PEM)."""
        ...


def check_issuance(snapshot: Snapshot, node: str, identity: SpiffeId) -> None:
    """Raise IdentityError (with the reason) when ``node`` may not obtain ``identity``."""
    from ztunnel_cfg.issuance import may_issue

    decision = may_issue(snapshot, node, identity)
    if not decision.allowed:
        raise IssuanceRefused(decision.reason)


class IssuanceRefused(IdentityError):
    """The CA refused to issue (identity not scheduled on the caller's node)."""


class LocalCaClient:
    """Signs with a CA directory in-process.  With a snapshot provider, applies the same
    node restriction as the CA service."""

    def __init__(
        self,
        ca: CertificateAuthority,
        node: str,
        snapshot_provider: Callable[[], Snapshot] | None = None,
        *,
        lifetime: timedelta = DEFAULT_SVID_LIFETIME,
    ) -> None:
        self._ca = ca
        self._node = node
        self._snapshot_provider = snapshot_provider
        self._lifetime = lifetime

    async def sign(self, identity: SpiffeId, csr_pem: bytes) -> tuple[bytes, bytes]:
        if self._snapshot_provider is not None:
            check_issuance(self._snapshot_provider(), self._node, identity)
        issued = self._ca.sign_csr(csr_pem, identity, self._lifetime)
        return issued.chain_pem, self._ca.trust_bundle_pem


class RemoteCaClient:
    """Talks to ``nodeproxy ca serve`` over mTLS, authenticating with the node certificate.

    The CA service's certificate must chain to ``bundle_pem`` and carry the URI SAN
    ``spiffe://<td>/ca`` (no CSR can obtain that name)."""

    def __init__(
        self,
        url: str,
        node_cert_pem: bytes,
        node_key_pem: bytes,
        bundle_pem: bytes,
        *,
        timeout: float = 10.0,
    ) -> None:
        self._base = url.rstrip("/")
        self._timeout = timeout
        self._host, self._port, self._prefix = _split_url(self._base)
        self._authority = (f"[{self._host}]" if ":" in self._host else self._host) + \
            f":{self._port}"
        self._bundle_pem = TrustBundle.from_pem(bundle_pem).pem
        leaf = load_pem_chain(node_cert_pem, "node certificate")[0]
        self.trust_domain = single_uri_san(leaf).removeprefix("spiffe://").split("/", 1)[0]
        self._expected_server = ca_service_uri(self.trust_domain)
        self._ssl = self._context(node_cert_pem, node_key_pem)

    def _context(self, node_cert_pem: bytes, node_key_pem: bytes) -> ssl.SSLContext:
        from nodeproxy.tls import context_from_pem

        return context_from_pem(
            server=False,
            chain_pem=node_cert_pem,
            key_pem=node_key_pem,
            bundle_pem=self._bundle_pem,
            alpn=["http/1.1"],
        )

    def __repr__(self) -> str:
        return f"RemoteCaClient(url={self._base!r})"

    def use_credentials(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Authenticate with a renewed node certificate from the next request on."""
        self._ssl = self._context(chain_pem, key_pem)

    async def sign(self, identity: SpiffeId, csr_pem: bytes) -> tuple[bytes, bytes]:
        body = {"identity": identity.uri, "csr": csr_pem.decode("ascii")}
        return await self._post("/v1/sign", body, str(identity))

    async def renew_node(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        """A new node certificate for this node's own identity (authenticated by the current
        one); returns (chain PEM, trust bundle PEM)."""
        return await self._post("/v1/renew-node", {"csr": csr_pem.decode("ascii")},
                                "the node certificate")

    async def _post(self, path: str, body: dict[str, str], what: str) -> tuple[bytes, bytes]:
        url = self._base + path
        try:
            async with asyncio.timeout(self._timeout):
                status, text = await self._exchange(self._prefix + path,
                                                    json.dumps(body).encode())
        except IdentityError:
            raise
        except (TimeoutError, OSError, ssl.SSLError, _BadAnswer) as exc:
            detail = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            raise IdentityError(
                f"CA service {url} failed: {detail}",
                hint="is 'nodeproxy ca serve' running, and is this node's certificate valid?",
            ) from None
        doc = _json(text)
        if status != 200:
            reason = doc.get("reason") if isinstance(doc, dict) else None
            err_cls = IssuanceRefused if status == 403 else IdentityError
            raise err_cls(f"CA service refused {what} ({status}): {reason or text[:200]}")
        if not (
            isinstance(doc, dict)
            and isinstance(doc.get("chain"), str)
            and isinstance(doc.get("bundle"), str)
        ):
            raise IdentityError(f"CA service answered without chain/bundle: {text[:200]!r}")
        return doc["chain"].encode(), doc["bundle"].encode()

    async def _exchange(self, target: str, body: bytes) -> tuple[int, str]:
        """One HTTP/1.1 POST on a fresh mTLS connection; (status, body text).

        The server's URI SAN is checked right after the handshake, before a byte of the
        request is written (ssl has no verify callback and hostname checks do not apply);
        an empty server_hostname sends no SNI, as the service expects."""
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._ssl, server_hostname="")
        try:
            self._check_server(writer.get_extra_info("ssl_object"))
            writer.write(
                f"POST {target} HTTP/1.1\r\nHost: {self._authority}\r\n"
                "Content-Type: application/json\r\nAccept: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + body)
            await writer.drain()
            answer = await _read_response(reader)
        except BaseException:
            # No TLS close_notify exchange with a wrong or stuck peer: it could outlive the
            # timeout that got us here.
            writer.transport.abort()
            raise
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return answer

    def _check_server(self, ssl_object: Any) -> None:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise IdentityError("CA service presented no certificate")
        from cryptography import x509

        uri = single_uri_san(x509.load_der_x509_certificate(der))
        if uri != self._expected_server:
            raise IdentityError(
                f"CA service presented {uri}, expected {self._expected_server}",
                hint="is the URL pointing at the nodeproxy CA service?",
            )


class _BadAnswer(Exception):
    """The CA service's answer is not a complete HTTP/1.1 response within the size bound."""


class _Response:
    """httptools callbacks: the status line and headers are read by the parser; we keep the
    body and whether the message is complete."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.headers_done = False
        self.complete = False
        self.delimited = False  # Content-Length or chunked: EOF before the end is an error

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    import httptools

    answer = _Response()
    parser = httptools.HttpResponseParser(answer)
    received = 0
    while not answer.complete:
        chunk = await reader.read(65536)
        if not chunk:
            # httptools cannot be told about EOF: a body without length ends here.
            if answer.delimited or not answer.headers_done:
                raise _BadAnswer("connection closed before a complete answer")
            break
        received += len(chunk)
        if received > MAX_RESPONSE:
            raise _BadAnswer(f"answer larger than {MAX_RESPONSE} bytes")
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserError as exc:
            raise _BadAnswer(f"not an HTTP/1.1 answer ({exc})") from None
    return parser.get_status_code(), answer.body.decode("utf-8", "replace")


def _split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an https:// URL; IdentityError when it is not one."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise IdentityError(f"CA address {url!r} is not a URL: {exc}",
                            hint="e.g. https://10.0.0.1:15012") from None
    if (not url.isascii() or parts.scheme != "https" or not parts.hostname or parts.query
            or parts.fragment):
        raise IdentityError(f"CA address {url!r} is not an https://HOST:PORT URL",
                            hint="e.g. https://10.0.0.1:15012")
    return parts.hostname, port, parts.path


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
