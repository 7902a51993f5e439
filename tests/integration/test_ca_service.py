"""`nodeproxy ca serve` as a real subprocess on 127.0.0.1: node-restricted issuance over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from nodeproxy.identity.ca_client import IssuanceRefused, RemoteCaClient
from nodeproxy.identity.manager import CertificateManager
from nodeproxy.identity.node_credentials import (
    NodeCertRenewer,
    NodeCredentials,
    NodeCredentialStore,
    choose_credentials,
)
from nodeproxy.identity.svid import load_pem_chain, private_key_pem, uri_sans
from nodeproxy.tls import context_from_pem
from tests.helpers.waiting import eventually, wait_until
from ztunnel_cfg.spiffe import NodeId, SpiffeId

NODEPROXY = str(Path(sys.executable).with_name("nodeproxy"))
CLIENT = SpiffeId.of("default", "client")  # scheduled on node1
CART = SpiffeId.of("shop", "cart")  # scheduled on node2
LATER = SpiffeId.of("default", "later")  # added to the config while the service runs

WORKLOAD = """\
- uid: c1//v1/Pod/{ns}/{name}
  name: {name}
  namespace: {ns}
  serviceAccount: {sa}
  workloadIps: ["{ip}"]
  node: {node}
  protocol: HBONE
"""


def _config(*extra: str) -> str:
    rows = [
        WORKLOAD.format(ns="default", name="client-0", sa="client", ip="10.10.1.2", node="node1"),
        WORKLOAD.format(ns="shop", name="cart-0", sa="cart", ip="10.10.2.2", node="node2"),
        *extra,
    ]
    return "workloads:\n" + "".join(rows)


def _run(*args: str) -> None:
    res = subprocess.run([NODEPROXY, *args], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    url: str
    port: int
    dir: Path
    config: Path
    proc: subprocess.Popen[str]
    log: Path

    def node_files(self, node: str) -> tuple[bytes, bytes, bytes]:
        d = self.dir.parent
        return (
            (d / f"{node}-cert.pem").read_bytes(),
            (d / f"{node}-key.pem").read_bytes(),
            (d / "bundle.pem").read_bytes(),
        )

    def client(self, node: str) -> RemoteCaClient:
        cert, key, bundle = self.node_files(node)
        return RemoteCaClient(self.url, cert, key, bundle)

    def ssl_as(self, node: str) -> ssl.SSLContext:
        cert, key, bundle = self.node_files(node)
        return context_from_pem(
            server=False, chain_pem=cert, key_pem=key, bundle_pem=bundle, alpn=["http/1.1"]
        )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("casvc")
    ca_dir = base / "ca"
    _run("ca", "init", "--dir", str(ca_dir), "--intermediate")
    for node in ("node1", "node2"):
        _run(
            "ca", "issue-node", "--dir", str(ca_dir), "--node", node,
            "--out-cert", str(base / f"{node}-cert.pem"),
            "--out-key", str(base / f"{node}-key.pem"),
            "--out-bundle", str(base / "bundle.pem"), "--force",
        )  # fmt: skip
    config = base / "cluster.yaml"
    config.write_text(_config())
    port = _free_port()
    log = base / "ca.log"
    with log.open("w") as logf:
        proc = subprocess.Popen(
            [NODEPROXY, "--log-format", "json", "ca", "serve", "--dir", str(ca_dir),
             "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdout=logf, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        return "CA service listening" in log.read_text()

    try:
        wait_until(listening, 20, lambda: f"CA service did not start:\n{log.read_text()}")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    svc = Service(f"https://127.0.0.1:{port}", port, ca_dir, config, proc, log)
    try:
        yield svc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_node1_gets_a_certificate_for_its_workload(service: Service) -> None:
    key, csr = new_key_and_csr(CLIENT)
    chain, bundle = await service.client("node1").sign(CLIENT, csr)
    certs = load_pem_chain(chain)
    assert len(certs) == 2  # leaf + intermediate
    assert uri_sans(certs[0]) == [CLIENT.uri]
    assert certs[0].public_key() == key.public_key()
    assert bundle == service.node_files("node1")[2]
    leaf, inter = service.dir.parent / "leaf.pem", service.dir.parent / "inter.pem"
    leaf.write_bytes(certs[0].public_bytes(Encoding.PEM))
    inter.write_bytes(certs[1].public_bytes(Encoding.PEM))
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(service.dir / "root-cert.pem"), "-untrusted",
         str(inter), str(leaf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    serial = format(certs[0].serial_number, "x")

    def issued_lines() -> list[str]:
        return [line for line in service.log.read_text().splitlines()
                if '"msg": "issued"' in line and serial in line]

    issued = await eventually(issued_lines, 5, f"no 'issued' log line for serial {serial}")
    assert len(issued) == 1
    logs = service.log.read_text()
    assert CLIENT.uri in issued[0]
    assert '"node": "node1"' in issued[0]
    assert "PRIVATE KEY" not in logs
    assert "BEGIN CERTIFICATE REQUEST" not in logs


async def test_node1_is_refused_a_workload_of_node2(service: Service) -> None:
    _, csr = new_key_and_csr(CART)
    with pytest.raises(IssuanceRefused) as info:
        await service.client("node1").sign(CART, csr)
    assert "(403)" in str(info.value)
    assert "it runs on node2" in str(info.value)
    # ... while node2 may have it.
    chain, _ = await service.client("node2").sign(CART, csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [CART.uri]


async def test_client_without_node_certificate_is_refused_at_tls(service: Service) -> None:
    bundle = service.node_files("node1")[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle.decode())
    _, csr = new_key_and_csr(CLIENT)
    body = {"identity": CLIENT.uri, "csr": csr.decode()}
    async with aiohttp.ClientSession() as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)) as info:
            async with session.post(f"{service.url}/v1/sign", json=body, ssl=ctx) as resp:
                await resp.read()
    # TLS 1.3: the server's "certificate required" alert races with its close, so the client
    # sees the alert, a disconnect or a reset (ECONNRESET) depending on timing.
    reset = getattr(info.value, "errno", None) == errno.ECONNRESET
    assert reset or "certificate required" in str(info.value) or isinstance(
        info.value, (aiohttp.ServerDisconnectedError, ConnectionError)
    )


async def test_workload_certificate_cannot_act_as_a_node(service: Service) -> None:
    key, csr = new_key_and_csr(CLIENT)
    chain, bundle = await service.client("node1").sign(CLIENT, csr)
    ctx = context_from_pem(
        server=False, chain_pem=chain, key_pem=private_key_pem(key), bundle_pem=bundle,
        alpn=["http/1.1"],
    )  # fmt: skip
    status, doc = await _post(service, ctx, {"identity": CLIENT.uri, "csr": csr.decode()})
    assert status == 403
    assert "not a node certificate" in doc["reason"]


async def _post(
    service: Service, ctx: ssl.SSLContext, body: object, path: str = "/v1/sign"
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.url}{path}", json=body, ssl=ctx) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"identity": "spiffe://cluster.local/ns/default", "csr": "x"}, "is not of the form"),
        ({"identity": CLIENT.uri}, "expected"),
        ("just a string", "expected"),
        ({"identity": CLIENT.uri, "csr": "garbage"}, "not a valid PEM"),
        (
            {
                "identity": CLIENT.uri,
                "csr": new_key_and_csr(SpiffeId.of("default", "x"))[1].decode(),
            },
            "requested identity is",
        ),
        (
            {"identity": "spiffe://other.td/ns/default/sa/client", "csr": "x"},
            "not in trust domain",
        ),
    ],
    ids=["malformed-id", "no-csr", "not-object", "garbage-csr", "csr-other-id", "other-td"],
)
async def test_bad_requests_get_400(service: Service, body: object, reason: str) -> None:
    status, doc = await _post(service, service.ssl_as("node1"), body)
    assert status == 400
    assert reason in doc["reason"]


@pytest.mark.parametrize("path", ["/v1/sign", "/v1/renew-node"])
async def test_deeply_nested_or_oversized_bodies_are_refused(service: Service, path: str) -> None:
    """Nesting that exhausts the JSON parser's recursion is a 400 (not a 500); a body over
    the 64 KiB bound is a 413 before it is parsed; the service keeps serving."""
    url = f"{service.url}{path}"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        deep = b"[" * 30_000 + b"]" * 30_000
        async with session.post(url, data=deep, headers=headers,
                                ssl=service.ssl_as("node1")) as resp:
            assert resp.status == 400
            assert "nested too deeply" in (await resp.json())["reason"]
        huge = b"[" * 100_000 + b"]" * 100_000
        with contextlib.suppress(aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            async with session.post(url, data=huge, headers=headers,
                                    ssl=service.ssl_as("node1")) as resp:
                assert resp.status == 413
    _, csr = new_key_and_csr(CLIENT)
    chain, _ = await service.client("node1").sign(CLIENT, csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [CLIENT.uri]


async def test_config_changes_are_picked_up(service: Service) -> None:
    _, csr = new_key_and_csr(LATER)
    with pytest.raises(IssuanceRefused, match="no workload in the config has identity"):
        await service.client("node1").sign(LATER, csr)
    later = WORKLOAD.format(ns="default", name="later-0", sa="later", ip="10.10.1.9", node="node1")
    tmp = service.config.with_suffix(".new")
    tmp.write_text(_config(later))
    os.replace(tmp, service.config)
    chain, _ = await service.client("node1").sign(LATER, csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [LATER.uri]
    # A broken file keeps the last good snapshot.
    service.config.write_text("workloads: [{bogus: 1}]\n")
    try:
        chain, _ = await service.client("node1").sign(LATER, csr)
        assert uri_sans(load_pem_chain(chain)[0]) == [LATER.uri]
        assert "config rejected" in service.log.read_text()
    finally:
        service.config.write_text(_config())  # as the other tests (and a rerun) expect it


async def test_certificate_manager_over_the_service(service: Service) -> None:
    manager = CertificateManager(service.client("node1"))
    try:
        svid = await manager.get(CLIENT)
        assert svid.identity == CLIENT
        assert manager.bundle is not None
        assert manager.bundle.roots[0] == x509.load_pem_x509_certificate(
            (service.dir / "root-cert.pem").read_bytes()
        )
        with pytest.raises(IdentityError, match="403"):
            await manager.get(CART)
    finally:
        await manager.aclose()


# -- node certificate renewal -----------------------------------------------------------------


async def test_node_renews_only_its_own_certificate(service: Service) -> None:
    node1 = NodeId.of("node1")
    key, csr = new_key_and_csr(node1)
    chain, bundle = await service.client("node1").renew_node(csr)
    renewed = NodeCredentials.from_pem(chain, private_key_pem(key), "reply")
    bootstrap = NodeCredentials.from_pem(*service.node_files("node1")[:2], "bootstrap")
    assert renewed.node_id == node1
    assert renewed.serial_hex != bootstrap.serial_hex
    assert bundle == service.node_files("node1")[2]
    logs = await eventually(
        lambda: [line for line in service.log.read_text().splitlines()
                 if "renewed node certificate" in line and renewed.serial_hex in line],
        5, "no 'renewed node certificate' log line")
    assert len(logs) == 1, logs
    assert '"node": "node1"' in logs[0], logs
    # The name comes from the caller's certificate: node1 cannot renew into node2.
    _, other = new_key_and_csr(NodeId.of("node2"))
    status, doc = await _post(service, service.ssl_as("node1"), {"csr": other.decode()},
                              "/v1/renew-node")
    assert status == 400, doc
    assert "requested identity is spiffe://cluster.local/node/node1" in doc["reason"], doc
    status, doc = await _post(service, service.ssl_as("node1"), {"nope": 1}, "/v1/renew-node")
    assert status == 400, doc
    assert "expected" in doc["reason"], doc


async def test_workload_certificate_cannot_renew_a_node(service: Service) -> None:
    key, csr = new_key_and_csr(CLIENT)
    chain, bundle = await service.client("node1").sign(CLIENT, csr)
    ctx = context_from_pem(server=False, chain_pem=chain, key_pem=private_key_pem(key),
                           bundle_pem=bundle, alpn=["http/1.1"])
    _, node_csr = new_key_and_csr(NodeId.of("node1"))
    status, doc = await _post(service, ctx, {"csr": node_csr.decode()}, "/v1/renew-node")
    assert status == 403, doc
    assert "not a node certificate" in doc["reason"], doc


async def test_renewer_keeps_the_node_enrolled_past_its_bootstrap_expiry(
    service: Service, tmp_path: Path
) -> None:
    lifetime = 4.0
    issued, key = CertificateAuthority.load(service.dir).issue_node_cert(
        "node1", lifetime=timedelta(seconds=lifetime))
    assert key is not None
    bootstrap = NodeCredentials.from_pem(issued.chain_pem, private_key_pem(key), "bootstrap")
    bundle = service.node_files("node1")[2]
    client = RemoteCaClient(service.url, bootstrap.chain_pem, bootstrap.key_pem, bundle)
    store = NodeCredentialStore(tmp_path / "state")
    renewer = NodeCertRenewer(client, bootstrap, store)
    task = asyncio.create_task(renewer.run())
    try:
        def renewed_yet() -> bool:
            assert not task.done(), task
            return renewer.current.serial_hex != bootstrap.serial_hex

        await eventually(renewed_yet, 15, lambda: f"no renewal: {renewer.last_error}",
                         interval=0.1)
        renewed = renewer.current
        assert renewed.not_after > bootstrap.not_after
        # The service checks certificates against its own clock (another process): wait for
        # it to refuse the bootstrap credentials, which happens once they expired...
        stale = RemoteCaClient(service.url, bootstrap.chain_pem, bootstrap.key_pem, bundle)
        _, csr = new_key_and_csr(CLIENT)

        async def stale_refused() -> bool:
            try:
                await stale.sign(CLIENT, csr)
            except IdentityError:
                return True
            return False

        await eventually(stale_refused, lifetime + 10, "bootstrap credentials still accepted",
                         interval=0.2)
        assert time.time() >= bootstrap.not_after.timestamp() - 1  # not refused for another reason
        # ... while the renewing client keeps getting workload certificates.
        chain, _ = await client.sign(CLIENT, csr)
        assert uri_sans(load_pem_chain(chain)[0]) == [CLIENT.uri]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Persisted for the next start, readable only by the agent, and chosen over the expired
    # bootstrap pair.
    assert (store.path.stat().st_mode & 0o777) == 0o600
    stored = store.load()
    assert stored is not None
    assert stored.serial_hex == renewed.serial_hex
    chosen, why = choose_credentials(bootstrap, stored, time.time())
    assert chosen.serial_hex == renewed.serial_hex
    assert "stored renewal" in why
