"""X.509-SVIDs held in memory, trust bundles, and reading a peer's SPIFFE ID off a certificate.

Private keys live only in these objects (and, briefly, in a memfd when loaded into ssl); they
are never part of ``repr()`` or a log line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeproxy.errors import IdentityError
from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.spiffe import NodeId, SpiffeId


def load_pem_chain(pem: bytes | str, what: str = "certificate chain") -> list[x509.Certificate]:
    """Parse one or more PEM certificates; IdentityError when there are none or they are bad."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"{what} is not valid PEM: {exc}", hint="expected '-----BEGIN CERTIFICATE-----' blocks"
        ) from None
    if not certs:
        raise IdentityError(f"{what} holds no certificate")
    return certs


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def single_uri_san(cert: x509.Certificate) -> str:
    """The certificate's only URI SAN; IdentityError when it has none or several."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise IdentityError(
            f"peer certificate has {len(uris)} URI SANs, an X.509-SVID has exactly one",
            hint="was this certificate issued by a nodeproxy/Istio CA?",
        )
    return uris[0]


def _uri_san_of_der(der_cert: bytes | None) -> str:
    """The single URI SAN of a peer's DER certificate."""
    if not der_cert:
        raise IdentityError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except ValueError as exc:
        raise IdentityError(f"peer certificate cannot be parsed: {exc}") from None
    return single_uri_san(cert)


def peer_identity_from_der(der_cert: bytes | None) -> SpiffeId:
    """The workload SPIFFE ID of a DER certificate (exactly one URI SAN of the ns/sa shape)."""
    uri = _uri_san_of_der(der_cert)
    try:
        return SpiffeId.parse(uri)
    except SpiffeIdError as exc:
        raise IdentityError(f"peer certificate URI SAN is not a workload identity: {exc}") from None


def node_identity_from_der(der_cert: bytes | None) -> NodeId:
    """The node identity (``spiffe://<td>/node/<name>``) of a DER certificate."""
    uri = _uri_san_of_der(der_cert)
    try:
        return NodeId.parse(uri)
    except SpiffeIdError as exc:
        raise IdentityError(
            f"client certificate is not a node certificate: {exc}",
            hint="agents authenticate with 'nodeproxy ca issue-node' certificates",
        ) from None


def same_public_key(a: object, b: object) -> bool:
    def der(k: object) -> bytes:
        to_bytes = getattr(k, "public_bytes", None)
        if to_bytes is None:
            return b""
        return bytes(
            to_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    return der(a) == der(b) != b""


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class Svid:
    """A workload's X.509-SVID: the chain (leaf first) and its private key, in memory only."""

    identity: SpiffeId
    cert_chain_pem: bytes
    private_key: ec.EllipticCurvePrivateKey = field(compare=False)
    not_before: datetime
    not_after: datetime
    serial: int

    @classmethod
    def from_chain(
        cls, identity: SpiffeId, chain_pem: bytes, key: ec.EllipticCurvePrivateKey
    ) -> Svid:
        """Build from an issued chain, checking that the leaf matches the key and identity."""
        certs = load_pem_chain(chain_pem, f"certificate chain for {identity}")
        leaf = certs[0]
        if not same_public_key(leaf.public_key(), key.public_key()):
            raise IdentityError(f"issued certificate for {identity} does not match our key")
        uri = single_uri_san(leaf)
        if uri != identity.uri:
            raise IdentityError(f"issued certificate carries {uri}, we asked for {identity}")
        return cls(
            identity=identity,
            cert_chain_pem=certs_to_pem(certs),
            private_key=key,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
        )

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def key_pem(self) -> bytes:
        """PKCS#8 PEM of the key, for loading into ssl through a memfd (never a file)."""
        return private_key_pem(self.private_key)

    def __repr__(self) -> str:
        return (
            f"Svid(identity={self.identity.uri!r}, serial={self.serial_hex}, "
            f"not_before={self.not_before.isoformat()}, not_after={self.not_after.isoformat()})"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The root certificates we trust; several during a root rotation."""

    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(cls, pem: bytes | str) -> TrustBundle:
        certs = load_pem_chain(pem, "trust bundle")
        for cert in certs:
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise IdentityError(
                    f"trust bundle entry {cert.subject.rfc4514_string()!r} is not a CA certificate"
                )
        return cls(tuple(certs))

    @classmethod
    def of(cls, roots: Sequence[x509.Certificate]) -> TrustBundle:
        return cls(tuple(roots))

    @property
    def pem(self) -> bytes:
        return certs_to_pem(self.roots)

    @property
    def fingerprint(self) -> str:
        """Stable digest of the bundle contents (used to key cached ssl contexts)."""
        return hashlib.sha256(self.pem).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.roots)
