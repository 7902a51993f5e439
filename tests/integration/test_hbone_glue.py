"""HBONE glue and relay over real TLS 1.3 on loopback, under uvloop and asyncio.

Like every async test (tests/conftest.py), each fails if the loop's exception handler fired
(a server handler that raised included), a task is still pending, or a transport or socket
was left open.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest

from nodeproxy.errors import ProxyError
from nodeproxy.hbone import (
    HboneProtocol,
    HboneServer,
    HboneStream,
    StreamLimitError,
    StreamResetError,
    open_connection,
    start_server,
)
from nodeproxy.hbone import events as ev
from nodeproxy.relay import open_tcp, relay, wrap_socket
from tests.helpers.hygiene import LoopErrors
from tests.helpers.waiting import eventually
from tests.integration._certs import TestPki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (AF_UNIX pairs cannot carry an RST)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def echo_handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
    stream.accept()
    while data := await stream.read():
        await stream.write(data)
    stream.write_eof()


async def read_all(stream: HboneStream) -> bytes:
    parts = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


async def serve(pki: TestPki, handler: Any = echo_handler) -> HboneServer:
    return await start_server(handler, "127.0.0.1", 0, pki.server_context())


async def test_round_trip(pki: TestPki) -> None:
    seen: list[ev.ConnectRequest] = []

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        seen.append(req)
        await echo_handler(stream, req)

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("10.0.0.7:8080", [("baggage", "k8s.pod.name=a")])
    await stream.write(b"hello hbone")
    stream.write_eof()
    assert await read_all(stream) == b"hello hbone"
    assert (stream.bytes_sent, stream.bytes_received) == (11, 11)
    assert seen[0].authority == "10.0.0.7:8080"
    assert (seen[0].host, seen[0].port) == ("10.0.0.7", 8080)
    assert ("baggage", "k8s.pod.name=a") in seen[0].headers
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_large_transfer_integrity(pki: TestPki) -> None:
    total = 256 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)  # 1 MiB

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        digest = hashlib.sha256()
        n = 0
        while data := await stream.read():
            digest.update(data)
            n += len(data)
        await stream.write(f"{n} {digest.hexdigest()}".encode())
        stream.write_eof()

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("10.0.0.7:8080")
    sent = hashlib.sha256()
    for i in range(total // len(block)):
        chunk = i.to_bytes(8, "big") + block[8:]
        sent.update(chunk)
        await stream.write(chunk)
    stream.write_eof()
    answer = await read_all(stream)
    assert answer.decode() == f"{total} {sent.hexdigest()}"
    assert stream.bytes_sent == total
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_200_concurrent_streams_then_limit(pki: TestPki) -> None:
    release = asyncio.Event()

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        data = await read_all(stream)
        await release.wait()
        await stream.write(data[::-1])
        stream.write_eof()

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    streams = await asyncio.gather(
        *(conn.open_stream(f"10.0.0.7:{1000 + i}") for i in range(200)))
    assert conn.streams_available() == 0
    with pytest.raises(StreamLimitError):
        await conn.open_stream("10.0.0.7:9999")
    for i, st in enumerate(streams):
        await st.write(f"stream-{i}".encode())
        st.write_eof()
    release.set()
    answers = await asyncio.gather(*(read_all(st) for st in streams))
    assert answers == [f"stream-{i}".encode()[::-1] for i in range(200)]
    await eventually(lambda: conn.streams_available() == 200, 5,
                     lambda: f"{conn.streams_available()} streams available, not 200")
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_half_close_each_side(pki: TestPki) -> None:
    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        got = await read_all(stream)  # client half-closed first
        await stream.write(b"after your FIN: " + got)
        stream.write_eof()

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("10.0.0.7:80")
    await stream.write(b"ping")
    stream.write_eof()
    with pytest.raises(StreamResetError):
        await stream.write(b"late")  # our side is closed for writing
    assert await read_all(stream) == b"after your FIN: ping"
    assert await stream.read() == b""
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_server_half_close_first(pki: TestPki) -> None:
    finished = asyncio.Event()

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        try:
            stream.accept()
            await stream.write(b"banner")
            stream.write_eof()
            got = await read_all(stream)
            assert got == b"still talking"  # a failure reaches the loop's exception handler
        finally:
            finished.set()

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("10.0.0.7:80")
    assert await read_all(stream) == b"banner"
    await stream.write(b"still talking")
    stream.write_eof()
    await asyncio.wait_for(finished.wait(), 5)
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_failing_handler_is_refused_and_reported_to_the_loop(
    pki: TestPki, loop_hygiene: LoopErrors,
) -> None:
    """A handler that raises (an assertion in a test's server, a bug in the agent) gets its
    stream refused with 503 and is reported to the loop's exception handler, which fails the
    test (tests/conftest.py) instead of only logging."""

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        assert req.port == 81, "handler saw the wrong port"

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    with pytest.raises(ProxyError) as info:
        await conn.open_stream("10.0.0.7:80")
    assert info.value.status == 503
    call = await loop_hygiene.wait(lambda c: isinstance(c.get("exception"), AssertionError))
    assert "handler saw the wrong port" in str(call["exception"])
    assert call["message"] == "HBONE request handler failed for 10.0.0.7:80"
    assert isinstance(call.get("protocol"), HboneProtocol)
    assert len(loop_hygiene.take()) == 1  # expected: it must not fail this test
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_reset_propagates_both_ways(pki: TestPki) -> None:
    server_saw: asyncio.Queue[str] = asyncio.Queue()

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        if req.port == 1:  # client will reset
            try:
                await read_all(stream)
                await server_saw.put("eof")
            except StreamResetError as exc:
                await server_saw.put(f"reset {exc.code}")
        else:  # server resets
            await stream.read()
            stream.reset()

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    a = await conn.open_stream("10.0.0.7:1")
    await a.write(b"x")
    a.reset()
    assert await asyncio.wait_for(server_saw.get(), 5) == "reset 8"  # CANCEL
    b = await conn.open_stream("10.0.0.7:2")
    await b.write(b"y")
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(b.read(), 5)
    conn.close()
    await conn.wait_closed()
    await server.close()


@pytest.mark.parametrize(("status", "flags"), [(401, "DENY"), (503, "CONNECT"), (400, "CONNECT")])
async def test_non_200_is_proxy_error(pki: TestPki, status: int, flags: str) -> None:
    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.refuse(status)

    server = await serve(pki, handler)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    with pytest.raises(ProxyError) as info:
        await conn.open_stream("10.0.0.7:80")
    assert (info.value.status, info.value.flags) == (status, flags)
    conn.close()
    await conn.wait_closed()
    await server.close()


async def test_graceful_goaway_lets_streams_finish(pki: TestPki) -> None:
    server = await serve(pki)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    stream = await conn.open_stream("10.0.0.7:80")
    await stream.write(b"before")
    closing = asyncio.ensure_future(server.close(graceful=True))
    # GOAWAY received: no new streams
    await eventually(lambda: conn.streams_available() == 0, 5, "no GOAWAY seen")
    with pytest.raises(StreamLimitError):
        await conn.open_stream("10.0.0.7:81")
    await stream.write(b" and after GOAWAY")
    stream.write_eof()
    assert await read_all(stream) == b"before and after GOAWAY"
    await closing
    await conn.wait_closed()


async def test_tcp_relay_through_hbone(pki: TestPki) -> None:
    """app -> [TCP] -> outbound relay -> HBONE -> inbound relay -> [TCP] -> echo server."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    results: list[Any] = []

    async def inbound(stream: HboneStream, req: ev.ConnectRequest) -> None:
        tcp = await open_tcp("127.0.0.1", req.port)
        stream.accept()
        results.append(await relay(stream, tcp))

    server = await serve(pki, inbound)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())

    async def outbound(sock: socket.socket) -> None:
        tcp = await wrap_socket(sock)
        stream = await conn.open_stream(f"127.0.0.1:{up_port}")
        results.append(await relay(tcp, stream))

    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
    accepted, _ = await loop.sock_accept(lsock)
    lsock.close()
    task = asyncio.ensure_future(outbound(accepted))
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    echoed = await reader.read(-1)
    assert echoed == payload
    writer.close()
    await writer.wait_closed()
    await task
    await eventually(lambda: len(results) == 2, 5, lambda: f"relay results: {results}")
    out_res, in_res = results[1], results[0]
    assert (out_res.bytes_up, out_res.bytes_down) == (len(payload), len(payload))
    assert not out_res.reset
    assert (in_res.bytes_up, in_res.bytes_down) == (len(payload), len(payload))
    conn.close()
    await conn.wait_closed()
    await server.close()
    upstream.close()
    await upstream.wait_closed()


async def test_upstream_reset_resets_downstream_socket(pki: TestPki) -> None:
    async def rst_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.transport.abort()

    upstream = await asyncio.start_server(rst_server, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    results: list[Any] = []

    async def inbound(stream: HboneStream, req: ev.ConnectRequest) -> None:
        tcp = await open_tcp("127.0.0.1", req.port)
        stream.accept()
        results.append(await relay(stream, tcp))

    server = await serve(pki, inbound)
    conn = await open_connection("127.0.0.1", server.port, pki.client_context())
    a, b = tcp_pair()
    tcp = await wrap_socket(b)
    stream = await conn.open_stream(f"127.0.0.1:{up_port}")
    task = asyncio.ensure_future(relay(tcp, stream))
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(a, b"x")
    res = await asyncio.wait_for(task, 5)
    assert res.reset
    assert res.bytes_up == 1
    async def drain() -> None:
        while await loop.sock_recv(a, 100):
            pass

    with pytest.raises(ConnectionResetError):
        await drain()
    a.close()
    assert results[0].reset
    conn.close()
    await conn.wait_closed()
    await server.close()
    upstream.close()
    await upstream.wait_closed()


async def test_relay_idle_timeout() -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    for s in (a1, a2):
        s.setblocking(False)
    left, right = await wrap_socket(b1), await wrap_socket(b2)
    res = await relay(left, right, idle_timeout=0.2)
    assert res.reset
    assert res.error is not None
    assert "idle" in res.error
    a1.close()
    a2.close()

