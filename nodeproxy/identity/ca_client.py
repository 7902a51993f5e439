"""How the certificate manager gets certificates signed: a local CA directory (single machine)
or the remote CA service (multi-node).  Both take a CSR; private keys never leave the agent."""

from __future__ import annotations

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
        import aiohttp

        url = self._base + path
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        connector = _verifying_connector(self._check_server)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.post(url, json=body, ssl=self._ssl, server_hostname="") as resp,
            ):
                text = await resp.text()
                status = resp.status
        except IdentityError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise IdentityError(
                f"CA service {url} failed: {exc.__class__.__name__}: {exc}",
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


def _verifying_connector(check: Callable[[Any], None]) -> Any:
    """A TCPConnector that checks the server's identity right after the TLS handshake, before
    the request is sent (ssl has no verify callback; hostname checks do not apply)."""
    import aiohttp

    class _Connector(aiohttp.TCPConnector):
        async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
            transport, proto = await super()._wrap_create_connection(*args, **kwargs)
            try:
                check(transport.get_extra_info("ssl_object"))
            except IdentityError:
                transport.close()
                raise
            return transport, proto

    return _Connector()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
