"""A file-backed certificate authority issuing X.509-SVIDs (DESIGN §5).

Directory layout (``nodeproxy ca init --dir DIR``)::

    ca.json                 {"trustDomain": ..., "intermediate": bool}       0644
    root-cert.pem           self-signed root, ECDSA P-256, 10 years          0644
    root-key.pem            root private key (PKCS#8, unencrypted)           0600
    intermediate-cert.pem   optional intermediate signed by the root (5 y)   0644
    intermediate-key.pem    its key                                          0600
    extra-roots.pem         optional, operator-managed: more trusted roots    (rotation)

Leaves are signed by the intermediate when there is one, else by the root.  The trust bundle
is ``root-cert.pem`` plus every certificate in ``extra-roots.pem``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeproxy.errors import IdentityError
from nodeproxy.identity.svid import (
    TrustBundle,
    certs_to_pem,
    load_pem_chain,
    private_key_pem,
    same_public_key,
)
from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, NodeId, SpiffeId, check_trust_domain

Clock = Callable[[], datetime]

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=1825)
DEFAULT_SVID_LIFETIME = timedelta(hours=24)
DEFAULT_NODE_LIFETIME = timedelta(days=30)
# Tolerate small clock differences between the CA and the agents verifying fresh certificates.
BACKDATE = timedelta(minutes=1)

META_FILE = "ca.json"
ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
INTER_CERT = "intermediate-cert.pem"
INTER_KEY = "intermediate-key.pem"
EXTRA_ROOTS = "extra-roots.pem"


def utc_now() -> datetime:
    return datetime.now(UTC)


def ca_service_uri(trust_domain: str) -> str:
    """URI SAN of the CA service's own server certificate.  It has neither the workload nor the
    node shape, so no CSR can ever obtain it."""
    return f"spiffe://{trust_domain}/ca"


@dataclass(frozen=True, slots=True)
class IssuedCert:
    chain_pem: bytes  # leaf first, then the intermediate (if any); never the root
    not_before: datetime
    not_after: datetime
    serial: int

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_key_and_csr(
    identity: SpiffeId | NodeId, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR for ``identity`` (one URI SAN), both in memory."""
    key = key or new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite; the mode is applied at creation so a key is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # umask may have removed bits we want (0644 for certs)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """digitalSignature always (SVIDs: TLS handshake signatures); keyCertSign + cRLSign only
    for CA certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_cert(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    issuer_public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
    trust_domain: str,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
        # SPIFFE: a signing certificate may carry the trust domain's own SPIFFE ID.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(signing_key, hashes.SHA256())
    )


class CertificateAuthority:
    """Signs CSRs into X.509-SVIDs.  Create with :meth:`init`, open with :meth:`load`."""

    def __init__(
        self,
        *,
        trust_domain: str,
        root_cert: x509.Certificate,
        signing_cert: x509.Certificate,
        signing_key: ec.EllipticCurvePrivateKey,
        intermediates: tuple[x509.Certificate, ...] = (),
        extra_roots: tuple[x509.Certificate, ...] = (),
        clock: Clock = utc_now,
        directory: Path | None = None,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.root_cert = root_cert
        self._signing_cert = signing_cert
        self._signing_key = signing_key
        self._intermediates = intermediates
        self._extra_roots = extra_roots
        self._clock = clock
        self.directory = directory

    def __repr__(self) -> str:
        return f"CertificateAuthority(trust_domain={self.trust_domain!r}, dir={self.directory})"

    # ---- creation / loading -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        intermediate: bool = False,
        clock: Clock = utc_now,
    ) -> CertificateAuthority:
        """Create a new root (and optionally an intermediate) in ``directory``.

        Refuses to overwrite: if any CA file already exists, nothing is written."""
        try:
            check_trust_domain(trust_domain)
        except SpiffeIdError as exc:
            raise IdentityError(exc.message) from None
        root_dir = Path(directory)
        names = [META_FILE, ROOT_CERT, ROOT_KEY] + ([INTER_CERT, INTER_KEY] if intermediate else [])
        existing = [n for n in names if (root_dir / n).exists()]
        if existing:
            raise IdentityError(
                f"refusing to overwrite existing CA files in {root_dir}: {', '.join(existing)}",
                hint="choose another --dir, or move the old CA away first",
            )
        root_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

        now = clock()
        root_key = new_private_key()
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "nodeproxy root CA"),
            ]
        )
        root = _ca_cert(
            subject=root_name,
            issuer=root_name,
            public_key=root_key.public_key(),
            signing_key=root_key,
            issuer_public_key=root_key.public_key(),
            not_before=now - BACKDATE,
            not_after=now + ROOT_LIFETIME,
            path_length=1 if intermediate else 0,
            trust_domain=trust_domain,
        )
        files: list[tuple[str, bytes, int]] = [
            (ROOT_CERT, certs_to_pem([root]), 0o644),
            (ROOT_KEY, private_key_pem(root_key), 0o600),
        ]
        signing_cert, signing_key = root, root_key
        intermediates: tuple[x509.Certificate, ...] = ()
        if intermediate:
            inter_key = new_private_key()
            inter = _ca_cert(
                subject=x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                        x509.NameAttribute(NameOID.COMMON_NAME, "nodeproxy intermediate CA"),
                    ]
                ),
                issuer=root_name,
                public_key=inter_key.public_key(),
                signing_key=root_key,
                issuer_public_key=root_key.public_key(),
                not_before=now - BACKDATE,
                not_after=now + INTERMEDIATE_LIFETIME,
                path_length=0,
                trust_domain=trust_domain,
            )
            files += [
                (INTER_CERT, certs_to_pem([inter]), 0o644),
                (INTER_KEY, private_key_pem(inter_key), 0o600),
            ]
            signing_cert, signing_key, intermediates = inter, inter_key, (inter,)
        meta = json.dumps({"trustDomain": trust_domain, "intermediate": intermediate}, indent=2)
        files.append((META_FILE, meta.encode() + b"\n", 0o644))
        for name, data, mode in files:
            _write_new(root_dir / name, data, mode)
        return cls(
            trust_domain=trust_domain,
            root_cert=root,
            signing_cert=signing_cert,
            signing_key=signing_key,
            intermediates=intermediates,
            clock=clock,
            directory=root_dir,
        )

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, clock: Clock = utc_now
    ) -> CertificateAuthority:
        root_dir = Path(directory)
        meta_path = root_dir / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            trust_domain = str(meta["trustDomain"])
            has_inter = bool(meta.get("intermediate", False))
        except FileNotFoundError:
            raise IdentityError(
                f"{root_dir} is not a CA directory ({META_FILE} is missing)",
                hint="create one with 'nodeproxy ca init --dir DIR'",
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"cannot read {meta_path}: {exc}") from None

        root = load_pem_chain(_read(root_dir / ROOT_CERT), str(root_dir / ROOT_CERT))[0]
        if has_inter:
            signing_cert = load_pem_chain(_read(root_dir / INTER_CERT), str(root_dir / INTER_CERT))[
                0
            ]
            key_path = root_dir / INTER_KEY
            intermediates: tuple[x509.Certificate, ...] = (signing_cert,)
        else:
            signing_cert, key_path, intermediates = root, root_dir / ROOT_KEY, ()
        key = _load_key(key_path)
        if not same_public_key(key.public_key(), signing_cert.public_key()):
            raise IdentityError(f"{key_path} does not match its certificate")
        extra: tuple[x509.Certificate, ...] = ()
        extra_path = root_dir / EXTRA_ROOTS
        if extra_path.exists():
            extra = tuple(load_pem_chain(_read(extra_path), str(extra_path)))
        return cls(
            trust_domain=trust_domain,
            root_cert=root,
            signing_cert=signing_cert,
            signing_key=key,
            intermediates=intermediates,
            extra_roots=extra,
            clock=clock,
            directory=root_dir,
        )

    # ---- bundle ------------------------------------------------------------------------

    @property
    def trust_bundle(self) -> TrustBundle:
        roots = [self.root_cert] + [c for c in self._extra_roots if c != self.root_cert]
        return TrustBundle.of(roots)

    @property
    def trust_bundle_pem(self) -> bytes:
        return self.trust_bundle.pem

    @property
    def intermediates_pem(self) -> bytes:
        return certs_to_pem(self._intermediates)

    # ---- issuance ----------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        lifetime: timedelta = DEFAULT_SVID_LIFETIME,
    ) -> IssuedCert:
        """Sign a workload CSR into an X.509-SVID for ``identity``.

        The CSR must carry an EC P-256 key with a valid self-signature; if it names any SAN it
        must be exactly ``identity``'s URI; it must not ask to be a CA."""
        if not isinstance(identity, SpiffeId):
            raise IdentityError(f"{identity!r} is not a workload identity")
        self._check_trust_domain(identity.uri, identity.trust_domain)
        public_key = self._check_csr(csr_pem, identity.uri)
        return self._issue(public_key, identity.uri, lifetime)

    def issue_node_cert(
        self,
        node: str,
        csr_pem: bytes | None = None,
        lifetime: timedelta = DEFAULT_NODE_LIFETIME,
    ) -> tuple[IssuedCert, ec.EllipticCurvePrivateKey | None]:
        """A certificate for ``spiffe://<td>/node/<node>``, used by that node's agent to
        authenticate to the CA service.  Without a CSR a key is generated and returned."""
        try:
            node_id = NodeId.of(node, self.trust_domain)
        except SpiffeIdError as exc:
            raise IdentityError(exc.message) from None
        key: ec.EllipticCurvePrivateKey | None = None
        if csr_pem is None:
            key, csr_pem = new_key_and_csr(node_id)
        public_key = self._check_csr(csr_pem, node_id.uri)
        return self._issue(public_key, node_id.uri, lifetime), key

    def issue_service_cert(
        self, public_key: ec.EllipticCurvePublicKey, lifetime: timedelta = DEFAULT_NODE_LIFETIME
    ) -> IssuedCert:
        """The CA service's own server certificate (URI ``spiffe://<td>/ca``)."""
        return self._issue(public_key, ca_service_uri(self.trust_domain), lifetime)

    def _check_trust_domain(self, uri: str, trust_domain: str) -> None:
        if trust_domain != self.trust_domain:
            raise IdentityError(
                f"{uri} is not in this CA's trust domain {self.trust_domain!r}",
                hint="check the trust domain of the agent and of 'nodeproxy ca init'",
            )

    def _check_csr(self, csr_pem: bytes, uri: str) -> ec.EllipticCurvePublicKey:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"CSR is not a valid PEM certificate request: {exc}") from None
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"CSR public key cannot be read: {exc}") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise IdentityError(
                "CSR key is not ECDSA P-256", hint="X.509-SVIDs use ECDSA P-256 keys"
            )
        if not csr.is_signature_valid:
            raise IdentityError("CSR signature is invalid")
        names: list[x509.GeneralName] = []
        for ext in csr.extensions:
            if isinstance(ext.value, x509.SubjectAlternativeName):
                names = list(ext.value)
            elif isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
                raise IdentityError("CSR asks for a CA certificate; only SVIDs are issued")
        if names and names != [x509.UniformResourceIdentifier(uri)]:
            shown = ", ".join(str(getattr(n, "value", n)) for n in names)
            raise IdentityError(
                f"CSR names [{shown}], but the requested identity is {uri}",
                hint="an SVID CSR carries at most one SAN: the requested SPIFFE ID",
            )
        return public_key

    def _issue(
        self, public_key: ec.EllipticCurvePublicKey, uri: str, lifetime: timedelta
    ) -> IssuedCert:
        if lifetime <= timedelta(0):
            raise IdentityError(f"certificate lifetime must be positive, got {lifetime}")
        now = self._clock()
        not_before = now - BACKDATE
        # Never outlive the signing certificate: verification would fail after it expires.
        not_after = min(now + lifetime, self._signing_cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        signing_public = self._signing_key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # minimal subject; the identity is the URI SAN
            .issuer_name(self._signing_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(signs_certificates=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_public), critical=False
            )
            .sign(self._signing_key, hashes.SHA256())
        )
        return IssuedCert(
            chain_pem=certs_to_pem([cert, *self._intermediates]),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=serial,
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return load_ec_private_key(_read(path), f"private key {path}")


def load_ec_private_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key; IdentityError naming ``what`` otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{what} cannot be loaded: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what} is not an EC private key")
    return key


def write_new_file(
    path: str | os.PathLike[str], data: bytes, mode: int, *, force: bool = False
) -> None:
    """Write ``data`` to a new file created with ``mode`` (0600 for keys).  With ``force`` an
    existing file is replaced atomically (still never readable with a wider mode)."""
    target = Path(path)
    if not force:
        if target.exists():
            raise IdentityError(
                f"refusing to overwrite {target}", hint="pass --force to replace it"
            )
        _write_new(target, data, mode)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, data, mode)
    os.replace(tmp, target)
