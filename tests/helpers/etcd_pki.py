"""A throwaway PKI for etcd: one CA, a server/peer certificate per member, a client
certificate per user (etcd maps the client certificate's CN to its user when
``--client-cert-auth`` is on).  The openssl equivalent is in docs/control-plane.md.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@dataclass
class EtcdPki:
    root: Path
    ips: Sequence[str] = ("127.0.0.1",)
    ca: Path = field(init=False)
    _ca_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _ca_cert: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        self._ca_key = _key()
        self._ca_cert = (
            x509.CertificateBuilder().subject_name(_name("nodeproxy etcd CA"))
            .issuer_name(_name("nodeproxy etcd CA")).public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._ca_key, hashes.SHA256()))
        self.ca = self.root / "ca.pem"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, stem: str, cn: str, server: bool) -> tuple[Path, Path]:
        cert_path, key_path = self.root / f"{stem}.pem", self.root / f"{stem}-key.pem"
        if cert_path.exists():
            return cert_path, key_path
        now = dt.datetime.now(dt.UTC)
        key = _key()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self._ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)))
        if server:  # members: serving and peer (client) use
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            sans: list[x509.GeneralName] = [x509.DNSName("etcd"), x509.DNSName("localhost")]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in self.ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = (builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self._ca_key, hashes.SHA256()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    def server(self, member: str) -> tuple[Path, Path]:
        return self._issue(f"member-{member}", member, server=True)

    def client(self, user: str) -> tuple[Path, Path]:
        return self._issue(f"user-{user}", user, server=False)
