"""One client must not be able to tie up the waypoint: slow heads, oversized heads, HTTP/2
rapid reset and control-frame floods are answered and cut off (loopback lab)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from tests.integration.test_waypoint_loopback import VIP, Lab, _sample, running_lab


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with running_lab(tmp_path) as lab:
        yield lab


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_slow_request_head_gets_408(lab: Lab) -> None:
    reader, writer = await lab.open_raw((VIP, 80))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\n")  # ... and never the blank line
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed
    finally:
        await _close(writer)
    assert _sample(lab.waypoint.metrics.registry, "nodeproxy_waypoint_connections_rejected_total",
                   reason="request_header_timeout") == 1
    assert not lab.hits


async def test_oversized_head_gets_431_and_nothing_upstream(lab: Lab) -> None:
    reader, writer = await lab.open_raw((VIP, 80))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    finally:
        await _close(writer)
    assert not lab.hits


async def test_http2_rapid_reset_ends_the_connection(lab: Lab) -> None:
    # Every connection of the grpc-client pod goes to the gRPC service (HTTP/2).
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.1.3", 15001))
    reader, writer = await asyncio.open_connection(sock=sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "grpc"),
               (":path", "/echo.Echo/Slow"), ("content-type", "application/grpc")]
    goaway: h2.events.ConnectionTerminated | None = None
    try:
        for _ in range(400):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers)
            conn.reset_stream(sid, ErrorCodes.CANCEL)
        writer.write(conn.data_to_send())
        await writer.drain()
        async with asyncio.timeout(10):
            while goaway is None:
                data = await reader.read(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        goaway = event
                writer.write(conn.data_to_send())
    finally:
        await _close(writer)
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
