"""CA clients: LocalCaClient's node restriction, RemoteCaClient's check of the server identity."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aiohttp import web

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from nodeproxy.identity.ca_client import IssuanceRefused, LocalCaClient, RemoteCaClient
from nodeproxy.identity.svid import load_pem_chain, private_key_pem, uri_sans
from nodeproxy.tls import context_from_pem
from ztunnel_cfg.snapshot import load_snapshot
from ztunnel_cfg.spiffe import SpiffeId

CONFIG = """\
workloads:
- uid: c1//v1/Pod/default/client-0
  name: client-0
  namespace: default
  serviceAccount: client
  workloadIps: ["10.10.1.2"]
  node: node1
  protocol: HBONE
"""
CLIENT = SpiffeId.of("default", "client")
OTHER = SpiffeId.of("default", "other")


async def test_local_client_applies_node_restriction(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    snap = load_snapshot(cfg)
    on_node1 = LocalCaClient(ca, "node1", lambda: snap)
    _, csr = new_key_and_csr(CLIENT)
    chain, bundle = await on_node1.sign(CLIENT, csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [CLIENT.uri]
    assert bundle == ca.trust_bundle_pem
    with pytest.raises(IssuanceRefused, match="node2"):
        await LocalCaClient(ca, "node2", lambda: snap).sign(CLIENT, csr)
    _, other_csr = new_key_and_csr(OTHER)
    with pytest.raises(IssuanceRefused, match="no workload"):
        await on_node1.sign(OTHER, other_csr)
    # Without a snapshot provider (single machine, debugging) there is no node restriction.
    chain, _ = await LocalCaClient(ca, "any").sign(OTHER, other_csr)
    assert uri_sans(load_pem_chain(chain)[0]) == [OTHER.uri]


async def test_remote_client_refuses_a_server_that_is_not_the_ca_service(tmp_path: Path) -> None:
    """A server with a valid certificate of the mesh, but not spiffe://<td>/ca, is refused
    before the CSR is sent."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    requests: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.json_response({"chain": "", "bundle": ""})

    app = web.Application()
    app.router.add_post("/v1/sign", handler)
    key, csr = new_key_and_csr(CLIENT)
    impostor = ca.sign_csr(csr, CLIENT)
    server_ctx = context_from_pem(
        server=True,
        chain_pem=impostor.chain_pem,
        key_pem=private_key_pem(key),
        bundle_pem=ca.trust_bundle_pem,
        alpn=["http/1.1"],
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node, node_key = ca.issue_node_cert("node1")
        assert node_key is not None
        client = RemoteCaClient(
            f"https://127.0.0.1:{port}", node.chain_pem, private_key_pem(node_key),
            ca.trust_bundle_pem,
        )  # fmt: skip
        assert client.trust_domain == "cluster.local"
        _, csr2 = new_key_and_csr(CLIENT)
        with pytest.raises(IdentityError, match=r"expected spiffe://cluster\.local/ca"):
            await client.sign(CLIENT, csr2)
        assert requests == []
    finally:
        await runner.cleanup()


async def test_remote_client_unreachable_service(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    node, node_key = ca.issue_node_cert("node1")
    assert node_key is not None
    client = RemoteCaClient(
        "https://127.0.0.1:1", node.chain_pem, private_key_pem(node_key), ca.trust_bundle_pem
    )
    _, csr = new_key_and_csr(CLIENT)
    with pytest.raises(IdentityError, match="is 'nodeproxy ca serve' running"):
        await client.sign(CLIENT, csr)
    assert not isinstance(client._ssl, type(None))
    assert client._ssl.verify_mode == ssl.CERT_REQUIRED
