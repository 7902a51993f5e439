"""`nodeproxy ca serve --config etcd://...`: node-restricted issuance from the store's placement."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from nodeproxy.identity.ca import new_key_and_csr
from nodeproxy.identity.ca_client import IssuanceRefused, RemoteCaClient
from nodeproxy.identity.svid import load_pem_chain, uri_sans
from tests.helpers.etcd import EtcdCluster, free_port
from tests.helpers.waiting import eventually, wait_until
from ztunnel_cfg.spiffe import SpiffeId

pytestmark = pytest.mark.uvloop

CLIENT = SpiffeId.of("default", "client")
CART = SpiffeId.of("shop", "cart")
ROW = ("- {{uid: c1//v1/Pod/{ns}/{name}, name: {name}, namespace: {ns}, serviceAccount: {sa},"
       " workloadIps: [\"{ip}\"], node: {node}, protocol: HBONE}}\n")


def config(cart_node: str) -> str:
    return ("workloads:\n"
            + ROW.format(ns="default", name="client-0", sa="client", ip="10.10.1.2", node="node1")
            + ROW.format(ns="shop", name="cart-0", sa="cart", ip="10.10.2.2", node=cart_node))


def cli_ok(*args: str) -> None:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output


class CaService:
    def __init__(self, base: Path, url: str) -> None:
        self.base, self.url = base, url

    def client(self, node: str) -> RemoteCaClient:
        b = self.base
        return RemoteCaClient(self.url, (b / f"{node}-cert.pem").read_bytes(),
                              (b / f"{node}-key.pem").read_bytes(),
                              (b / "bundle.pem").read_bytes())


@pytest.fixture
def ca(store: EtcdCluster, tmp_path: Path) -> Iterator[CaService]:
    desired = tmp_path / "placement.yaml"
    desired.write_text(config("node2"))
    cli_ok("config", "apply", str(desired), "--store", store.url("admin"))
    ca_dir = tmp_path / "ca"
    cli_ok("ca", "init", "--dir", str(ca_dir))
    for node in ("node1", "node2"):
        cli_ok("ca", "issue-node", "--dir", str(ca_dir), "--node", node,
               "--out-cert", str(tmp_path / f"{node}-cert.pem"),
               "--out-key", str(tmp_path / f"{node}-key.pem"),
               "--out-bundle", str(tmp_path / "bundle.pem"), "--force")
    port = free_port()
    log = tmp_path / "ca.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "ca", "serve", "--dir", str(ca_dir),
             "--config", store.url("ca"), "--listen", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is None and "CA service listening" in log.read_text(),
                   30, lambda: f"CA service did not start: {log.read_text()}")
        yield CaService(tmp_path, f"https://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


async def test_issuance_follows_the_placement_in_the_store(
        ca: CaService, store: EtcdCluster, tmp_path: Path) -> None:
    _, csr = new_key_and_csr(CLIENT)
    chain, _ = await ca.client("node1").sign(CLIENT, csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [CLIENT.uri]
    _, cart_csr = new_key_and_csr(CART)
    with pytest.raises(IssuanceRefused, match="it runs on node2"):
        await ca.client("node1").sign(CART, cart_csr)
    # Move cart to node1 in the store: node1 may now have its certificate, node2 may not.
    moved = tmp_path / "moved.yaml"
    moved.write_text(config("node1"))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "config", "apply", str(moved),
                           "--store", store.url("admin")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr

    async def node1_gets_cart() -> bool:
        try:
            await ca.client("node1").sign(CART, cart_csr)
        except IssuanceRefused:
            return False
        return True

    await eventually(node1_gets_cart, 15, "the CA did not follow the store")
    with pytest.raises(IssuanceRefused, match=r"node 'node2' has no workloads"):
        await ca.client("node2").sign(CART, cart_csr)
