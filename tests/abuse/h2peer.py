"""A hostile HBONE peer built on the independent ``h2`` package (not on our glue).

It holds a real workload certificate from the test CA, so it gets past TLS and authorization
and can then misbehave at the HTTP/2 layer: rapid reset, resets followed by GOAWAY, control
frame floods without reading, stalled handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from cryptography.hazmat.primitives import serialization

from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from ztunnel_cfg.spiffe import SpiffeId


def workload_tls(ca_dir: Path, identity: str, workdir: Path) -> ssl.SSLContext:
    """A TLS 1.3 / ALPN h2 client context holding a fresh SVID for ``identity``."""
    ca = CertificateAuthority.load(ca_dir)
    spiffe = SpiffeId.parse(identity)
    key, csr = new_key_and_csr(spiffe)
    issued = ca.sign_csr(csr, spiffe)
    name = identity.rsplit("/", 1)[-1]
    cert_path, key_path = workdir / f"peer-{name}.pem", workdir / f"peer-{name}-key.pem"
    cert_path.write_bytes(issued.chain_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cadata=ca.trust_bundle_pem.decode())
    return ctx


@dataclass
class Outcome:
    """What the server did to the connection."""

    goaway_code: int | None = None
    closed: bool = False
    statuses: dict[int, int] | None = None
    reset_streams: set[int] = field(default_factory=set)


class HostilePeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.outcome = Outcome(statuses={})

    @classmethod
    async def connect(cls, host: str, port: int, ctx: ssl.SSLContext, *,
                      receive_buffer: int | None = None) -> HostilePeer:
        """``receive_buffer``: a small SO_RCVBUF, so that not reading fills up quickly."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="")
        peer = cls(reader, writer)
        await peer.flush()
        return peer

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def _connect_headers(self, authority: str) -> list[tuple[str, str]]:
        return [(":method", "CONNECT"), (":authority", authority)]

    def open_stream(self, authority: str) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, self._connect_headers(authority))
        return sid

    async def rapid_reset(self, authority: str, pairs: int, batch: int = 200) -> None:
        """HEADERS immediately followed by RST_STREAM, ``pairs`` times, without reading."""
        with contextlib.suppress(ConnectionError):
            for i in range(pairs):
                sid = self.open_stream(authority)
                self.h2.reset_stream(sid)
                if i % batch == batch - 1:
                    await self.flush()
            await self.flush()

    async def read_events(self, timeout: float) -> bool:
        """Read and process frames until the connection ends or ``timeout``; True if ended."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        self.outcome.closed = True
                        return True
                    for event in self.h2.receive_data(data):
                        self._note(event)
                    with contextlib.suppress(ConnectionError):
                        await self.flush()
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            self.outcome.closed = True
            return True

    async def wait_statuses(self, count: int, timeout: float) -> dict[int, int]:
        """Read until ``count`` streams have their response status."""
        statuses = self.outcome.statuses
        assert statuses is not None
        async with asyncio.timeout(timeout):
            while len(statuses) < count:
                data = await self.reader.read(65536)
                assert data, f"connection closed after {len(statuses)} of {count} responses"
                for event in self.h2.receive_data(data):
                    self._note(event)
                await self.flush()
        return statuses

    def _note(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.StreamReset):
            self.outcome.reset_streams.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.outcome.goaway_code = int(event.error_code or 0)
        elif isinstance(event, h2.events.ResponseReceived):
            headers = {bytes(k): bytes(v) for k, v in event.headers or []}
            assert self.outcome.statuses is not None
            self.outcome.statuses[event.stream_id] = int(headers.get(b":status", b"0"))

    async def flood(self, frame: str, count: int, batch: int = 1000) -> int:
        """``count`` PING or SETTINGS frames, never reading what the server answers. Returns
        how many were written before the server stopped reading (or closed)."""
        i = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            for i in range(count):
                if frame == "ping":
                    self.h2.ping(i.to_bytes(8, "big"))
                else:
                    self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
                if i % batch == batch - 1:
                    self.writer.write(self.h2.data_to_send())
                    async with asyncio.timeout(2.0):
                        await self.writer.drain()  # blocks once the server stops reading
            return count
        return i

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def stalled_handshakes(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that never send a TLS ClientHello."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def is_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
