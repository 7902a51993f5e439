"""The relay as a splice of protocol callbacks: back-pressure by pausing the source (TCP
reading, or the HBONE peer's window), bytes buffered before the splice, FIN after the bytes
still waiting for window, and no task per direction."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from nodeproxy.hbone import HboneStream, open_connection, start_server
from nodeproxy.hbone import events as ev
from nodeproxy.hbone import settings as cfg
from nodeproxy.relay import relay, wrap_socket
from tests.helpers.waiting import eventually
from tests.integration._certs import TestPki, make_pki
from tests.integration.test_hbone_glue import tcp_pair

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB: under one stream window, over the high water


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    parts, got = [], 0
    while got < n:
        data = await loop.sock_recv(sock, 1 << 20)
        assert data, f"EOF after {got} of {n} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def test_slow_tcp_reader_holds_back_the_peers_window(pki: TestPki) -> None:
    """HBONE -> TCP with a TCP reader that does not read: the agent stops acknowledging, so
    the sender runs out of window instead of the agent buffering without bound."""
    app, agent_side = tcp_pair()
    # Small kernel buffers (still above the loopback MSS) so that the agent's side fills.
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    agent_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    results = []

    async def inbound(stream: HboneStream, req: ev.ConnectRequest) -> None:
        tcp = await wrap_socket(agent_side)
        stream.accept()
        results.append(await relay(stream, tcp))

    server = await start_server(inbound, "127.0.0.1", 0, pki.server_context())
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("127.0.0.1:1")
    big = PAYLOAD * 4  # 12 MiB: more than a stream window (4 MiB)
    writer = asyncio.ensure_future(stream.write(big))
    hbone = conn.protocol.conn
    await eventually(lambda: hbone.send_window(stream.stream_id) == 0, 10,
                     lambda: f"send window {hbone.send_window(stream.stream_id)}")
    assert not writer.done()
    # What the agent holds is bounded by the window it advertised, not by what was sent.
    sent_so_far = stream.bytes_sent
    assert sent_so_far <= cfg.STREAM_WINDOW + cfg.RELAY_READ_SIZE
    received = await recv_exactly(app, len(big))
    assert received == big
    await writer
    stream.write_eof()
    assert await asyncio.get_running_loop().sock_recv(app, 10) == b""
    app.close()
    await eventually(lambda: len(results) == 1, 5, lambda: "relay did not end")
    assert results[0].bytes_up == len(big)
    assert not results[0].reset
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_bytes_and_fin_received_before_the_splice_are_relayed(pki: TestPki) -> None:
    """A client may send its request and FIN while the agent still dials: nothing is lost."""
    app, agent_side = tcp_pair()
    loop = asyncio.get_running_loop()
    tcp = await wrap_socket(agent_side)
    await loop.sock_sendall(app, b"early request")
    app.shutdown(socket.SHUT_WR)
    await eventually(lambda: tcp._eof, 5, lambda: "FIN not seen")
    got: list[bytes] = []

    async def inbound(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        while data := await stream.read():
            got.append(data)
        await stream.write(b"answer")
        stream.write_eof()

    server = await start_server(inbound, "127.0.0.1", 0, pki.server_context())
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("127.0.0.1:1")
    result = await relay(tcp, stream)
    assert b"".join(got) == b"early request"
    assert await recv_exactly(app, 6) == b"answer"
    assert (result.bytes_up, result.bytes_down, result.reset) == (13, 6, False)
    app.close()
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_fin_follows_bytes_that_waited_for_window(pki: TestPki) -> None:
    """TCP -> HBONE: the client sends more than the peer's window, then FIN at once; the
    END_STREAM leaves only after every byte, and the relay runs in the caller's task alone."""
    app, agent_side = tcp_pair()
    loop = asyncio.get_running_loop()
    received = bytearray()
    release = asyncio.Event()

    async def inbound(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        await release.wait()
        while data := await stream.read():
            received.extend(data)
        stream.write_eof()

    server = await start_server(inbound, "127.0.0.1", 0, pki.server_context())
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("127.0.0.1:1")
    tcp = await wrap_socket(agent_side)
    big = PAYLOAD * 3  # 9 MiB > the 4 MiB stream window
    tasks_before = len(asyncio.all_tasks())
    relaying = asyncio.ensure_future(relay(tcp, stream))

    async def send_all() -> None:
        await loop.sock_sendall(app, big)
        app.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send_all())
    hbone = conn.protocol.conn
    await eventually(lambda: hbone.send_window(stream.stream_id) == 0, 10,
                     lambda: f"send window {hbone.send_window(stream.stream_id)}")
    # one task for the relay, one for the sender: no pump task per direction
    assert len(asyncio.all_tasks()) <= tasks_before + 2
    release.set()
    result = await relaying
    await sender
    assert bytes(received) == big
    assert (result.bytes_up, result.reset) == (len(big), False)
    app.close()
    conn.close()
    await conn.wait_closed()
    await server.close()
