"""CA clients: LocalCaClient's node restriction, RemoteCaClient's check of the server identity."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
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


# -- raw TLS servers: what reaches the wire ---------------------------------------------------

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _answering_server(server_ctx: ssl.SSLContext, answer: Answer) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)


async def _recording_server(
    server_ctx: ssl.SSLContext,
) -> tuple[asyncio.Server, list[bytes], asyncio.Event]:
    """A TLS server that records every decrypted byte it receives until the client goes away.
    TLS runs over memory BIOs so the recording does not depend on the server's handshake
    finishing (a client that hangs up at once may leave it unfinished)."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        handshaken = False
        try:
            while data := await reader.read(65536):
                incoming.write(data)
                try:
                    if not handshaken:
                        tls.do_handshake()
                        handshaken = True
                    while chunk := tls.read(65536):
                        received.append(chunk)
                except ssl.SSLWantReadError:
                    pass
                writer.write(outgoing.read())
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, received, done


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _tls_server(ca: CertificateAuthority, chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    return context_from_pem(server=True, chain_pem=chain_pem, key_pem=key_pem,
                            bundle_pem=ca.trust_bundle_pem, alpn=["http/1.1"])


def _client(ca: CertificateAuthority, port: int, timeout: float = 5.0) -> RemoteCaClient:
    node, node_key = ca.issue_node_cert("node1")
    assert node_key is not None
    return RemoteCaClient(f"https://127.0.0.1:{port}", node.chain_pem,
                          private_key_pem(node_key), ca.trust_bundle_pem, timeout=timeout)


async def test_wrong_uri_san_gets_no_request_bytes(tmp_path: Path) -> None:
    """A mesh certificate that chains to the bundle but is not spiffe://<td>/ca: the client
    hangs up after the handshake; not one byte of the request (the CSR) is sent."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    key, csr = new_key_and_csr(CLIENT)
    impostor = ca.sign_csr(csr, CLIENT)

    server, received, done = await _recording_server(
        _tls_server(ca, impostor.chain_pem, private_key_pem(key)))
    try:
        with pytest.raises(IdentityError, match=r"presented spiffe://cluster\.local/ns/"
                                                r"default/sa/client, expected"):
            await _client(ca, _port(server)).sign(CLIENT, new_key_and_csr(CLIENT)[1])
        await asyncio.wait_for(done.wait(), 5)
        assert received == []
    finally:
        server.close()
        await server.wait_closed()


async def _serve_ca(ca: CertificateAuthority) -> ssl.SSLContext:
    from nodeproxy.identity.ca import new_private_key

    key = new_private_key()
    issued = ca.issue_service_cert(key.public_key())
    return _tls_server(ca, issued.chain_pem, private_key_pem(key))


async def test_request_is_plain_http11_and_chunked_answer_is_read(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    seen: list[bytes] = []

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen.append(head + await reader.readexactly(length))
        doc = b'{"chain": "C", "bundle": "B"}'
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % 5 + doc[:5] + b"\r\n"
                     + b"%x\r\n" % (len(doc) - 5) + doc[5:] + b"\r\n0\r\n\r\n")
        await writer.drain()

    server = await _answering_server(await _serve_ca(ca), chunked)
    port = _port(server)
    try:
        assert await _client(ca, port).renew_node(b"CSR") == (b"C", b"B")
    finally:
        server.close()
        await server.wait_closed()
    [request] = seen
    head, body = request.split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/renew-node HTTP/1.1"
    assert set(lines[1:]) >= {f"Host: 127.0.0.1:{port}", "Connection: close",
                              "Content-Type: application/json"}
    assert body == b'{"csr": "CSR"}'


@pytest.mark.parametrize(("reply", "error"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1_100_000,
     "larger than 1048576 bytes"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.1 answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "closed before a complete answer"),
    (b"", "closed before a complete answer"),
    (None, "TimeoutError"),
])
async def test_bad_answers_are_identity_errors(
    tmp_path: Path, reply: bytes | None, error: str
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await reader.read()  # never answers: waits until the client's timeout hangs up
            return
        writer.write(reply or b"")
        await writer.drain()
        if reply == b"":
            writer.transport.abort()
        else:
            writer.close()
            await reader.read()  # until the client hangs up

    server = await _answering_server(await _serve_ca(ca), answer)
    try:
        client = _client(ca, _port(server), timeout=1.0)
        with pytest.raises(IdentityError, match=error) as info:
            await client.sign(CLIENT, new_key_and_csr(CLIENT)[1])
        assert info.value.hint is not None
        assert "is 'nodeproxy ca serve' running" in info.value.hint
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("url", ["http://127.0.0.1:15012", "127.0.0.1:15012",
                                 "https://127.0.0.1:99999", "https://:15012", "https://h:1/?q"])
def test_ca_address_must_be_an_https_url(tmp_path: Path, url: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    node, node_key = ca.issue_node_cert("node1")
    assert node_key is not None
    with pytest.raises(IdentityError, match="CA address"):
        RemoteCaClient(url, node.chain_pem, private_key_pem(node_key), ca.trust_bundle_pem)
