"""CA: creation, files and modes, the X.509-SVID profile (checked with the openssl binary),
CSR refusal cases, node certificates, and the `nodeproxy ca` CLI."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cli.main import cli
from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from nodeproxy.identity.svid import Svid, TrustBundle, load_pem_chain, peer_identity_from_der
from ztunnel_cfg.spiffe import NodeId, SpiffeId

CLIENT = SpiffeId.of("default", "client")


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def _csr(sans: list[x509.GeneralName] | None, key: object = None, ca: bool = False) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


@pytest.fixture(params=[False, True], ids=["root", "intermediate"])
def ca(request: pytest.FixtureRequest, tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", intermediate=request.param)


def test_init_writes_files_with_modes(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca", trust_domain="example.org", intermediate=True)
    d = tmp_path / "ca"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert modes == {
        "ca.json": 0o644,
        "root-cert.pem": 0o644,
        "root-key.pem": 0o600,
        "intermediate-cert.pem": 0o644,
        "intermediate-key.pem": 0o600,
    }
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    root = load_pem_chain((d / "root-cert.pem").read_bytes())[0]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    loaded = CertificateAuthority.load(d)
    assert loaded.trust_domain == "example.org"
    assert loaded.root_cert == root


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    before = (tmp_path / "ca" / "root-key.pem").read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite existing CA files"):
        CertificateAuthority.init(tmp_path / "ca")
    assert (tmp_path / "ca" / "root-key.pem").read_bytes() == before


def test_init_refuses_partial_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    (d / "intermediate-key.pem").write_text("old")
    with pytest.raises(IdentityError, match=r"intermediate-key\.pem"):
        CertificateAuthority.init(d, intermediate=True)
    assert sorted(p.name for p in d.iterdir()) == ["intermediate-key.pem"]


def test_load_of_non_ca_dir_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="nodeproxy ca init"):
        CertificateAuthority.load(tmp_path)


def test_bad_trust_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="trust domain"):
        CertificateAuthority.init(tmp_path / "ca", trust_domain="Bad Domain")


def test_svid_profile_checked_with_openssl(ca: CertificateAuthority, tmp_path: Path) -> None:
    key, csr = new_key_and_csr(CLIENT)
    issued = ca.sign_csr(csr, CLIENT)
    leaf_path = tmp_path / "leaf.pem"
    certs = load_pem_chain(issued.chain_pem)
    leaf_path.write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
    assert ca.directory is not None
    args = ["verify", "-CAfile", str(ca.directory / "root-cert.pem")]
    if len(certs) > 1:
        inter = tmp_path / "inter.pem"
        inter.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:]))
        args += ["-untrusted", str(inter)]
    verify = _openssl(*args, str(leaf_path))
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip().endswith(": OK")
    # Purpose checks: usable as both TLS server and client.
    for purpose in ("sslserver", "sslclient"):
        assert _openssl(*args, "-purpose", purpose, str(leaf_path)).returncode == 0

    text = _openssl("x509", "-in", str(leaf_path), "-text", "-noout").stdout
    assert len(re.findall(r"URI:", text)) == 1
    assert "URI:spiffe://cluster.local/ns/default/sa/client" in text
    assert "DNS:" not in text
    assert "IP Address:" not in text
    assert re.search(r"X509v3 Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"X509v3 Key Usage: critical\s+Digital Signature\s*\n", text)
    assert re.search(
        r"X509v3 Extended Key Usage:\s*\n\s+TLS Web Server Authentication, "
        r"TLS Web Client Authentication",
        text,
    )
    assert "X509v3 Subject Key Identifier" in text
    assert "X509v3 Authority Key Identifier" in text
    assert "ASN1 OID: prime256v1" in text
    assert "ecdsa-with-SHA256" in text

    life = issued.not_after - issued.not_before
    assert timedelta(hours=24) <= life <= timedelta(hours=24, minutes=2)
    svid = Svid.from_chain(CLIENT, issued.chain_pem, key)
    assert svid.serial == issued.serial == certs[0].serial_number
    der = certs[0].public_bytes(serialization.Encoding.DER)
    assert peer_identity_from_der(der) == CLIENT


def test_lifetime_is_configurable_and_capped_by_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    _, csr = new_key_and_csr(CLIENT)
    issued = ca.sign_csr(csr, CLIENT, lifetime=timedelta(hours=1))
    assert issued.not_after - issued.not_before <= timedelta(hours=1, minutes=1)
    issued = ca.sign_csr(csr, CLIENT, lifetime=timedelta(days=100 * 365))
    assert issued.not_after == ca.root_cert.not_valid_after_utc
    with pytest.raises(IdentityError, match="positive"):
        ca.sign_csr(csr, CLIENT, lifetime=timedelta(0))


def test_clock_is_injected(tmp_path: Path) -> None:
    past = datetime(2020, 1, 1, tzinfo=UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", clock=lambda: past)
    assert ca.root_cert.not_valid_before_utc < past


def test_svid_repr_never_shows_the_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    key, csr = new_key_and_csr(CLIENT)
    svid = Svid.from_chain(CLIENT, ca.sign_csr(csr, CLIENT).chain_pem, key)
    secret = svid.key_pem().decode()
    body = "".join(secret.splitlines()[1:-1])
    for text in (repr(svid), str(svid), f"{svid}", repr([svid])):
        assert "PRIVATE" not in text
        assert body[:20] not in text
        assert "spiffe://cluster.local/ns/default/sa/client" in text


OTHER = x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/other")
MINE = x509.UniformResourceIdentifier(CLIENT.uri)


@pytest.mark.parametrize(
    ("make_csr", "reason"),
    [
        (lambda: b"not a csr", "not a valid PEM"),
        (lambda: _csr([OTHER]), "requested identity is"),
        (lambda: _csr([MINE, OTHER]), "requested identity is"),
        (lambda: _csr([MINE, x509.DNSName("example.com")]), "requested identity is"),
        (lambda: _csr([x509.DNSName("example.com")]), "requested identity is"),
        (lambda: _csr([MINE], key=ec.generate_private_key(ec.SECP384R1())), "P-256"),
        (
            lambda: _csr(
                [MINE], key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
            ),
            "P-256",
        ),
        (lambda: _csr([MINE], ca=True), "CA certificate"),
    ],
    ids=["garbage", "other-id", "two-uris", "extra-dns", "dns-only", "p384", "rsa", "ca"],
)
def test_non_svid_csrs_are_refused(make_csr, reason: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(IdentityError, match=reason):
        ca.sign_csr(make_csr(), CLIENT)


def test_csr_without_san_is_accepted_and_gets_the_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    issued = ca.sign_csr(_csr(None), CLIENT)
    leaf = load_pem_chain(issued.chain_pem)[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName([MINE])
    )
    assert leaf.subject == x509.Name([])  # the CSR's CN is never copied


def test_tampered_csr_signature_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    _, csr = new_key_and_csr(CLIENT)
    obj = x509.load_pem_x509_csr(csr)
    der = bytearray(obj.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match=r"signature is invalid|not a valid PEM"):
        ca.sign_csr(tampered, CLIENT)


def test_foreign_trust_domain_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    other = SpiffeId.of("default", "client", "other.domain")
    _, csr = new_key_and_csr(other)
    with pytest.raises(IdentityError, match="trust domain"):
        ca.sign_csr(csr, other)


def test_node_cert(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    issued, key = ca.issue_node_cert("node1")
    assert key is not None
    leaf = load_pem_chain(issued.chain_pem)[0]
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [NodeId.of("node1").uri]
    with pytest.raises(IdentityError, match="not a workload identity"):
        peer_identity_from_der(leaf.public_bytes(serialization.Encoding.DER))
    with pytest.raises(IdentityError, match="node name"):
        ca.issue_node_cert("Bad_Node")
    # A CSR for another node is refused.
    _, csr = new_key_and_csr(NodeId.of("node2"))
    with pytest.raises(IdentityError, match="requested identity"):
        ca.issue_node_cert("node1", csr)


def test_trust_bundle_holds_extra_roots(tmp_path: Path) -> None:
    old = CertificateAuthority.init(tmp_path / "old")
    new = CertificateAuthority.init(tmp_path / "new")
    assert new.directory is not None
    (new.directory / "extra-roots.pem").write_bytes(old.trust_bundle_pem)
    loaded = CertificateAuthority.load(new.directory)
    bundle = TrustBundle.from_pem(loaded.trust_bundle_pem)
    assert len(bundle) == 2
    assert bundle.roots == (new.root_cert, old.root_cert)


def test_trust_bundle_rejects_leaf(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    _, csr = new_key_and_csr(CLIENT)
    with pytest.raises(IdentityError, match="not a CA certificate"):
        TrustBundle.from_pem(ca.sign_csr(csr, CLIENT).chain_pem)


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_init_issue_and_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "ca")
    res = runner.invoke(cli, ["ca", "init", "--dir", d, "--trust-domain", "example.org"])
    assert res.exit_code == 0, res.output
    assert "example.org" in res.output
    res = runner.invoke(cli, ["ca", "init", "--dir", d])
    assert res.exit_code == 1
    assert "error: refusing to overwrite" in res.output
    assert "Traceback" not in res.output

    cert, key = tmp_path / "w.pem", tmp_path / "w-key.pem"
    args = ["ca", "issue", "--dir", d, "--spiffe-id", "spiffe://example.org/ns/a/sa/b"]
    args += ["--out-cert", str(cert), "--out-key", str(key), "--lifetime", "2h"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _openssl("verify", "-CAfile", f"{d}/root-cert.pem", str(cert)).returncode == 0
    leaf = load_pem_chain(cert.read_bytes())[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=2, minutes=1)
    # The key matches the certificate.
    priv = serialization.load_pem_private_key(key.read_bytes(), None)
    assert priv.public_key() == leaf.public_key()

    res = runner.invoke(cli, args)  # outputs exist
    assert res.exit_code == 1
    assert "refusing to overwrite" in res.output
    res = runner.invoke(cli, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    bad = ["ca", "issue", "--dir", d, "--spiffe-id", "spiffe://example.org/ns/a"]
    res = runner.invoke(cli, [*bad, "--out-cert", str(tmp_path / "x"), "--out-key", "y"])
    assert res.exit_code == 1
    assert "--spiffe-id" in res.output
    res = runner.invoke(cli, [*args[:6], "--out-cert", "x", "--out-key", "y", "--lifetime", "2x"])
    assert res.exit_code == 2
    assert "duration" in res.output


def test_cli_issue_node(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "ca")
    assert runner.invoke(cli, ["ca", "init", "--dir", d, "--intermediate"]).exit_code == 0
    cert, key, bundle = tmp_path / "n.pem", tmp_path / "n-key.pem", tmp_path / "b.pem"
    res = runner.invoke(
        cli,
        [
            "ca",
            "issue-node",
            "--dir",
            d,
            "--node",
            "node1",
            "--out-cert",
            str(cert),
            "--out-key",
            str(key),
            "--out-bundle",
            str(bundle),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "spiffe://cluster.local/node/node1" in res.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    chain = load_pem_chain(cert.read_bytes())
    assert len(chain) == 2  # leaf + intermediate
    inter = tmp_path / "i.pem"
    inter.write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
    leaf = tmp_path / "l.pem"
    leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    ok = _openssl("verify", "-CAfile", str(bundle), "-untrusted", str(inter), str(leaf))
    assert ok.returncode == 0, ok.stderr
    assert os.stat(d).st_mode & 0o077 == 0
