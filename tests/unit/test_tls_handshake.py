"""Real TLS handshakes over loopback: policy (TLS 1.3, ALPN h2, mutual certs, no SNI) and the
post-handshake SPIFFE identity check; certificate rotation through ContextCache."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from nodeproxy.identity.svid import Svid, TrustBundle, private_key_pem
from nodeproxy.tls import (
    IDENTITY_ERROR,
    TLS_FAILURE,
    ContextCache,
    PeerIdentityError,
    client_context,
    context_from_pem,
    server_context,
    verify_peer,
)
from tests.helpers.waiting import eventually
from ztunnel_cfg.spiffe import NodeId, SpiffeId

TD = "cluster.local"
SERVER = SpiffeId.of("echo", "server")
CLIENT = SpiffeId.of("default", "client")
OTHER = SpiffeId.of("default", "other")


def issue(
    ca: CertificateAuthority, identity: SpiffeId, lifetime: timedelta = timedelta(hours=1)
) -> Svid:
    key, csr = new_key_and_csr(identity)
    return Svid.from_chain(identity, ca.sign_csr(csr, identity, lifetime).chain_pem, key)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", intermediate=True)


@pytest.fixture
def bundle(ca: CertificateAuthority) -> TrustBundle:
    return ca.trust_bundle


@dataclass
class Server:
    port: int
    peers: list[SpiffeId] = field(default_factory=list)
    errors: list[PeerIdentityError] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    finished: int = 0  # connections whose handler is done


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[ssl.SSLContext], asyncio.Future[Server]]]:
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()

    async def start(ctx: ssl.SSLContext) -> Server:
        state = Server(port=0)
        if ctx.sni_callback is None:
            ctx.sni_callback = lambda _o, name, _c: state.sni.append(name)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                state.peers.append(verify_peer(writer.get_extra_info("ssl_object"), TD))
            except PeerIdentityError as exc:
                state.errors.append(exc)
                writer.close()
                return
            try:
                while data := await reader.read(1024):
                    state.received.append(data)
                    writer.write(b"echo:" + data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()
                state.finished += 1

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()
    for task in handlers:
        task.cancel()


async def connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=""), 5
    )


async def closes_without_data(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(100), 5)
    except (ssl.SSLError, ConnectionError):
        return True
    return data == b""


async def test_mutual_handshake_and_identities(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    reader, writer = await connect(srv.port, client_context(issue(ca, CLIENT), bundle))
    ssl_obj = writer.get_extra_info("ssl_object")
    assert verify_peer(ssl_obj, TD, {SERVER}) == SERVER
    assert ssl_obj.version() == "TLSv1.3"
    assert ssl_obj.selected_alpn_protocol() == "h2"
    assert ssl_obj.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.read(100), 5) == b"echo:hello"
    assert srv.peers == [CLIENT]
    assert srv.sni == [None]  # no SNI on the wire
    writer.close()


async def test_wrong_server_san_is_refused_before_sending(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    _reader, writer = await connect(srv.port, client_context(issue(ca, CLIENT), bundle))
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(writer.get_extra_info("ssl_object"), TD, {OTHER})
    assert info.value.flags == IDENTITY_ERROR
    assert "is not the expected spiffe://cluster.local/ns/default/sa/other" in str(info.value)
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: srv.finished == 1, 5, "the server saw the connection end")
    assert srv.received == []


async def test_foreign_ca_server_is_refused(serve, ca, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    foreign = CertificateAuthority.init(tmp_path / "foreign")
    srv = await serve(server_context(issue(foreign, SERVER), foreign.trust_bundle))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await connect(srv.port, client_context(issue(ca, CLIENT), bundle))


async def test_foreign_ca_client_is_refused(serve, ca, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    foreign = CertificateAuthority.init(tmp_path / "foreign")
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    # The client trusts our CA (so its side completes) but presents a foreign certificate.
    reader, writer = await connect(srv.port, client_context(issue(foreign, CLIENT), bundle))
    assert await closes_without_data(reader)
    assert srv.peers == []
    assert srv.errors == []
    writer.close()


async def test_expired_certificate_is_refused(serve, tmp_path) -> None:  # type: ignore[no-untyped-def]
    past = datetime.now(UTC) - timedelta(days=2)
    old_ca = CertificateAuthority.init(tmp_path / "ca", clock=lambda: past)
    bundle = old_ca.trust_bundle
    srv = await serve(server_context(issue(old_ca, SERVER), bundle))
    fresh = CertificateAuthority.load(tmp_path / "ca")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        await connect(srv.port, client_context(issue(fresh, CLIENT), bundle))


async def test_tls12_only_client_is_refused(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    # The server aborts the handshake (alert or reset, depending on timing).
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await connect(srv.port, ctx)
    assert srv.peers == []


async def test_client_without_certificate_is_refused(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle.pem.decode())
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await connect(srv.port, ctx)
    writer.write(b"x")
    assert await closes_without_data(reader)
    assert srv.peers == []
    assert srv.received == []
    writer.close()


async def test_node_certificate_is_not_a_workload_identity(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle))
    key, csr = new_key_and_csr(NodeId.of("node1"))
    issued, _ = ca.issue_node_cert("node1", csr)
    ctx = context_from_pem(
        server=False,
        chain_pem=issued.chain_pem,
        key_pem=private_key_pem(key),
        bundle_pem=bundle.pem,
        alpn=["h2"],
    )
    reader, writer = await connect(srv.port, ctx)
    assert await closes_without_data(reader)
    assert len(srv.errors) == 1
    assert srv.errors[0].flags == IDENTITY_ERROR
    assert "not a workload identity" in str(srv.errors[0])
    writer.close()


async def test_other_trust_domain_is_refused(serve, ca, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="other.td")
    both = TrustBundle.of([*bundle.roots, *other.trust_bundle.roots])
    srv = await serve(server_context(issue(ca, SERVER), both))
    peer = SpiffeId.of("default", "client", "other.td")
    reader, writer = await connect(srv.port, client_context(issue(other, peer), both))
    assert await closes_without_data(reader)
    assert srv.errors[0].flags == IDENTITY_ERROR
    assert "not in trust domain 'cluster.local'" in str(srv.errors[0])
    writer.close()


async def test_missing_alpn_is_a_tls_failure(serve, ca, bundle) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(server_context(issue(ca, SERVER), bundle, alpn=["http/1.1"]))
    _reader, writer = await connect(srv.port, client_context(issue(ca, CLIENT), bundle))
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(writer.get_extra_info("ssl_object"), TD, {SERVER})
    assert info.value.flags == TLS_FAILURE
    writer.close()


def test_bad_bundle_is_an_identity_error(ca: CertificateAuthority) -> None:
    svid = issue(ca, SERVER)
    junk = b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"
    with pytest.raises(IdentityError, match="cannot load trust bundle"):
        context_from_pem(
            server=True,
            chain_pem=svid.cert_chain_pem,
            key_pem=svid.key_pem(),
            bundle_pem=junk,
            alpn=None,
        )
    with pytest.raises(IdentityError, match="trust bundle"):
        TrustBundle.from_pem(junk)


# ---- rotation ----------------------------------------------------------------------------


class Source:
    """A minimal SvidSource whose certificate the test swaps."""

    def __init__(self, svid: Svid, bundle: TrustBundle) -> None:
        self.svid = svid
        self._bundle = bundle

    async def get(self, identity: SpiffeId) -> Svid:
        return self.svid

    def current(self, identity: SpiffeId) -> Svid | None:
        return self.svid

    @property
    def bundle(self) -> TrustBundle | None:
        return self._bundle


def peer_serial(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotation_new_connections_use_new_cert_old_ones_keep_working(
    serve: Callable[[ssl.SSLContext], asyncio.Future[Server]],
    ca: CertificateAuthority,
    bundle: TrustBundle,
) -> None:
    first = issue(ca, SERVER)
    source = Source(first, bundle)
    cache = ContextCache(source)
    srv = await serve(await cache.rotating_server_context(SERVER))
    client_ctx = client_context(issue(ca, CLIENT), bundle)

    r1, w1 = await connect(srv.port, client_ctx)
    assert peer_serial(w1) == first.serial
    ctx_before = await cache.server(SERVER)
    assert await cache.server(SERVER) is ctx_before  # cached while nothing changes

    second = issue(ca, SERVER)
    source.svid = second
    cache.on_rotate(SERVER, second)
    assert await cache.server(SERVER) is not ctx_before

    r2, w2 = await connect(srv.port, client_ctx)
    assert peer_serial(w2) == second.serial
    for reader, writer, msg in ((r1, w1, b"old"), (r2, w2, b"new")):
        writer.write(msg)
        assert await asyncio.wait_for(reader.read(100), 5) == b"echo:" + msg
    assert srv.peers == [CLIENT, CLIENT]
    w1.close()
    w2.close()


async def test_context_cache_client_side_and_forget(ca, bundle) -> None:  # type: ignore[no-untyped-def]
    source = Source(issue(ca, CLIENT), bundle)
    cache = ContextCache(source)
    ctx = await cache.client(CLIENT)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not ctx.check_hostname
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert await cache.client(CLIENT) is ctx
    cache.forget(CLIENT)
    assert await cache.client(CLIENT) is not ctx


async def test_handshake_rotation_and_refusal(tmp_path: Path) -> None:
    """Memfd-loaded keys, no SNI, identity check, per-handshake certificate swap (on both loops,
    like every async test: the agent runs on uvloop)."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    bundle = ca.trust_bundle

    source = Source(issue(ca, SERVER), bundle)
    cache = ContextCache(source)
    peers: list[SpiffeId] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(verify_peer(writer.get_extra_info("ssl_object"), TD))
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    ctx = await cache.rotating_server_context(SERVER)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = client_context(issue(ca, CLIENT), bundle)
    try:
        r1, w1 = await connect(port, client_ctx)
        assert verify_peer(w1.get_extra_info("ssl_object"), TD, {SERVER}) == SERVER
        with pytest.raises(PeerIdentityError):
            verify_peer(w1.get_extra_info("ssl_object"), TD, {OTHER})
        assert await r1.read() == b"hi"
        w1.close()
        source.svid = issue(ca, SERVER)
        r2, w2 = await connect(port, client_ctx)
        assert peer_serial(w2) == source.svid.serial
        assert await r2.read() == b"hi"
        w2.close()
        assert peers == [CLIENT, CLIENT]
    finally:
        server.close()
        await server.wait_closed()
