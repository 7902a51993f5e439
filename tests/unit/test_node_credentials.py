"""Node certificate handling: parsing and cross-checks, the start-up choice between bootstrap
and stored pair, the one-file store, and the renewer's decisions (fake client and clock)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr, new_private_key
from nodeproxy.identity.node_credentials import (
    NodeCertRenewer,
    NodeCredentials,
    NodeCredentialStore,
    choose_credentials,
)
from nodeproxy.identity.svid import private_key_pem
from ztunnel_cfg.spiffe import SpiffeId


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("nodeca") / "ca")


def node_creds(ca: CertificateAuthority, node: str = "node1", hours: float = 24) -> NodeCredentials:
    issued, key = ca.issue_node_cert(node, lifetime=timedelta(hours=hours))
    assert key is not None
    return NodeCredentials.from_pem(issued.chain_pem, private_key_pem(key), "test")


def test_from_pem_reads_node_identity_and_validity(ca: CertificateAuthority) -> None:
    creds = node_creds(ca)
    assert str(creds.node_id) == "spiffe://cluster.local/node/node1"
    assert creds.not_after > creds.not_before
    assert creds.not_before.timestamp() < creds.renew_at() < creds.not_after.timestamp()
    assert "PRIVATE" not in repr(creds)


def test_from_pem_refuses_a_key_of_another_certificate(ca: CertificateAuthority) -> None:
    creds = node_creds(ca)
    other_key = private_key_pem(new_private_key())
    with pytest.raises(IdentityError, match=r"^node.crt: the private key does not belong"):
        NodeCredentials.from_pem(creds.chain_pem, other_key, "node.crt")


def test_from_pem_refuses_a_workload_certificate(ca: CertificateAuthority) -> None:
    key, csr = new_key_and_csr(SpiffeId.of("default", "client"))
    issued = ca.sign_csr(csr, SpiffeId.of("default", "client"))
    with pytest.raises(IdentityError, match="not a node certificate"):
        NodeCredentials.from_pem(issued.chain_pem, private_key_pem(key), "f")


@pytest.mark.parametrize(
    ("key_pem", "message"),
    [(b"", "cannot be loaded"), (b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "cannot be loaded")],
    ids=["empty", "truncated"],
)
def test_from_pem_refuses_a_broken_key(
    ca: CertificateAuthority, key_pem: bytes, message: str
) -> None:
    with pytest.raises(IdentityError, match=message):
        NodeCredentials.from_pem(node_creds(ca).chain_pem, key_pem, "f")


# -- choose_credentials: table over (bootstrap, stored) validity -------------------------------

@pytest.mark.parametrize(
    ("stored_kind", "now_offset_h", "expect", "why"),
    [
        (None, 0, "bootstrap", "no stored renewal"),
        ("later", 0, "stored", "stored renewal"),
        ("earlier", 0, "bootstrap", "bootstrap certificate expires after"),
        ("other-node", 0, "bootstrap", "is for spiffe://cluster.local/node/node2"),
        ("later", 30, "stored", "stored renewal"),  # bootstrap (24 h) expired, stored (48 h) not
        ("earlier", 13, "bootstrap", "stored renewal expired"),
        (None, 30, "error", ""),
        ("later", 60, "error", ""),
    ],
)
def test_choose_credentials(
    ca: CertificateAuthority, stored_kind: str | None, now_offset_h: float, expect: str,
    why: str,
) -> None:
    bootstrap = node_creds(ca, hours=24)
    stored = {
        None: None,
        "later": node_creds(ca, hours=48),
        "earlier": node_creds(ca, hours=12),
        "other-node": node_creds(ca, node="node2", hours=48),
    }[stored_kind]
    now = bootstrap.not_before.timestamp() + 60 + now_offset_h * 3600  # BACKDATE is 60 s
    if expect == "error":
        with pytest.raises(IdentityError, match="expired") as info:
            choose_credentials(bootstrap, stored, now)
        assert info.value.hint is not None
        assert "ca issue-node" in info.value.hint
        return
    chosen, reason = choose_credentials(bootstrap, stored, now)
    assert chosen is (stored if expect == "stored" else bootstrap)
    assert why in reason


# -- the store ---------------------------------------------------------------------------------

def test_store_round_trip_is_one_private_file(ca: CertificateAuthority, tmp_path: Path) -> None:
    store = NodeCredentialStore(tmp_path / "state")
    assert store.load() is None
    creds = node_creds(ca)
    store.save(creds)
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["node.pem"]  # no temp left
    loaded = store.load()
    assert loaded == creds
    store.save(node_creds(ca, hours=48))  # replaced, not appended
    again = store.load()
    assert again is not None
    assert again.serial_hex != creds.serial_hex


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b""],
    ids=["garbage", "no-key", "empty"],
)
def test_damaged_store_is_ignored(tmp_path: Path, content: bytes) -> None:
    store = NodeCredentialStore(tmp_path)
    store.path.write_bytes(content)
    assert store.load() is None


def test_store_with_mismatched_pair_is_ignored(ca: CertificateAuthority, tmp_path: Path) -> None:
    store = NodeCredentialStore(tmp_path)
    store.path.write_bytes(private_key_pem(new_private_key()) + node_creds(ca).chain_pem)
    assert store.load() is None


def test_store_save_failure_names_the_path(ca: CertificateAuthority, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = NodeCredentialStore(blocker / "sub")  # a directory below a regular file
    with pytest.raises(IdentityError, match=r"cannot store the renewed node certificate in "):
        store.save(node_creds(ca))


# -- the renewer (fake CA client, fake clock) ----------------------------------------------------

class FakeClient:
    def __init__(self, ca: CertificateAuthority, node: str = "node1") -> None:
        self.ca, self.node = ca, node
        self.fail: Exception | None = None
        self.used: list[bytes] = []

    async def renew_node(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        if self.fail is not None:
            raise self.fail
        issued, _ = self.ca.issue_node_cert(self.node, csr_pem, lifetime=timedelta(hours=48))
        return issued.chain_pem, self.ca.trust_bundle_pem

    def use_credentials(self, chain_pem: bytes, key_pem: bytes) -> None:
        self.used.append(chain_pem)


async def test_renew_once_swaps_client_credentials_and_stores(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    client = FakeClient(ca)
    bootstrap = node_creds(ca)
    store = NodeCredentialStore(tmp_path)
    renewer = NodeCertRenewer(client, bootstrap, store, clock=lambda: 0.0)
    renewed = await renewer.renew_once()
    assert renewer.current is renewed
    assert renewed.serial_hex != bootstrap.serial_hex
    assert client.used == [renewed.chain_pem]
    stored = store.load()
    assert stored is not None
    assert stored.serial_hex == renewed.serial_hex


async def test_renew_once_rejects_a_certificate_for_another_node(
    ca: CertificateAuthority,
) -> None:
    client = FakeClient(ca)
    bootstrap = node_creds(ca)
    renewer = NodeCertRenewer(client, bootstrap, None)
    client.node = "node2"  # a CA answering with the wrong node must not be trusted blindly
    with pytest.raises(IdentityError):
        await renewer.renew_once()
    assert renewer.current is bootstrap
    assert client.used == []


async def test_failures_back_off_then_a_success_resets(ca: CertificateAuthority) -> None:
    client = FakeClient(ca)
    bootstrap = node_creds(ca)
    delays: list[float] = []
    stop_after = 3

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == stop_after:
            client.fail = None  # the CA comes back
        if len(delays) > stop_after:
            raise asyncio.CancelledError

    now = bootstrap.renew_at() - 100.0
    renewer = NodeCertRenewer(client, bootstrap, None, clock=lambda: now, rng=lambda: 1.0,
                              sleep=fake_sleep)
    client.fail = IdentityError("CA service down")
    with pytest.raises(asyncio.CancelledError):
        await renewer.run()
    assert delays[0] == pytest.approx(100.0)  # first wait: until half-life
    assert delays[1:3] == [1.0, 2.0]  # back-off after the 1st and 2nd failure (jitter x1.0)
    assert renewer.failures == 0  # the 3rd attempt succeeded
    assert renewer.current.serial_hex != bootstrap.serial_hex
    # Next wait: the renewed certificate's half-life (48 h certificate, clock frozen).
    assert delays[3] == pytest.approx(renewer.current.renew_at() - now)


def test_run_refuses_a_mismatched_node_pair_before_starting(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    own, other = node_creds(ca, "node1"), node_creds(ca, "node2")
    (tmp_path / "node.crt").write_bytes(own.chain_pem)
    (tmp_path / "node.key").write_bytes(other.key_pem)
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle_pem)
    (tmp_path / "c.yaml").write_text("workloads: []\n")
    result = CliRunner().invoke(cli, [
        "run", "--config", str(tmp_path / "c.yaml"), "--node", "node1", "--no-redirect",
        "--ca-address", "https://127.0.0.1:9", "--node-cert", str(tmp_path / "node.crt"),
        "--node-key", str(tmp_path / "node.key"), "--ca-bundle", str(tmp_path / "bundle.pem"),
    ])
    assert result.exit_code == 1, result.output
    assert "node.key: the private key does not belong to the node certificate" in result.output
