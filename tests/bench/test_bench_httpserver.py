"""The bench's HTTP servers, driven in memory (no sockets): one canned 1 KB answer per
request, pipelining in order, close when asked, HTTP/2 streams each answered once."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import pytest

from tests.bench import httpserver


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None  # no socket: nothing to set TCP_NODELAY on


def _http1(size: int = 1024) -> tuple[httpserver.Http1Server, FakeTransport]:
    server, transport = httpserver.Http1Server(size), FakeTransport()
    server.connection_made(cast(asyncio.BaseTransport, transport))
    return server, transport


@pytest.mark.parametrize(("requests", "answers", "closed"), [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1, False, id="keep-alive"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3, 3, False, id="pipelined"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1, True,
                 id="connection-close"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 1, False,
                 id="body-read-and-dropped"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n", 0, False, id="head-incomplete"),
])
def test_http1_answers_each_complete_request(requests: bytes, answers: int,
                                             closed: bool) -> None:
    server, transport = _http1()
    server.data_received(requests)
    keep = httpserver.http1_response(1024, keep_alive=True)
    close = httpserver.http1_response(1024, keep_alive=False)
    expected = close if closed else keep * answers
    assert bytes(transport.data) == expected
    assert transport.closed is closed


def test_http1_response_is_the_body_size_with_its_length() -> None:
    response = httpserver.http1_response(1024, keep_alive=True)
    head, _, body = response.partition(b"\r\n\r\n")
    assert body == b"x" * 1024
    assert b"Content-Length: 1024" in head
    assert b"Connection: close" in httpserver.http1_response(10, keep_alive=False)


def test_http1_malformed_request_gets_400_and_close() -> None:
    server, transport = _http1()
    server.data_received(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    assert transport.data.startswith(b"HTTP/1.1 400 ")
    assert transport.closed


def test_h2c_answers_every_stream_once() -> None:
    server, transport = httpserver.H2Server(1024), FakeTransport()
    server.connection_made(cast(asyncio.BaseTransport, transport))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    request = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, request, end_stream=stream_id == 5)  # 5: no body
    client.send_data(1, b"", end_stream=True)
    client.send_data(3, b"body", end_stream=True)
    server.data_received(client.data_to_send())
    events = client.receive_data(bytes(transport.data))
    statuses = {e.stream_id: dict(e.headers)[b":status"] for e in events
                if isinstance(e, h2.events.ResponseReceived)}
    bodies: dict[int, int] = {}
    for e in events:
        if isinstance(e, h2.events.DataReceived):
            bodies[e.stream_id] = bodies.get(e.stream_id, 0) + len(e.data)
    ended = sorted(e.stream_id for e in events if isinstance(e, h2.events.StreamEnded))
    assert statuses == {1: b"200", 3: b"200", 5: b"200"}
    assert bodies == {1: 1024, 3: 1024, 5: 1024}
    assert ended == [1, 3, 5]
