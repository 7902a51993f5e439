"""The HTTP servers of the benchmark's L7 cases, run inside the server pod.

    python tests/bench/httpserver.py --http1-port 8081 --h2-port 8082 [--size 1024]

Answers every request with ``200`` and the same body of ``size`` bytes:

- ``--http1-port``: HTTP/1.1 keep-alive (httptools, llhttp), pipelining served in order.
- ``--h2-port``: HTTP/2 with prior knowledge (h2c, the ``h2`` library), any number of streams.

Prints one JSON line ``{"listening": ["host:http1", "host:h2"]}`` once both listen.
Standalone like tcpload.py (no project imports; uvloop when available): the server is a
constant shared by every case, so it should cost as little as a Python server can.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httptools


def http1_response(size: int, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n")
    if not keep_alive:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + b"x" * size


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Http1Server(asyncio.Protocol):
    """HTTP/1.1: one canned response per complete request; request bodies are read and
    dropped.  A malformed request gets 400 and the connection closes."""

    def __init__(self, size: int) -> None:
        self.keep = http1_response(size, keep_alive=True)
        self.close = http1_response(size, keep_alive=False)
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; only write/close are used.
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.transport.write(self.keep)
        else:
            self.transport.write(self.close)
            self.transport.close()


class H2Server(asyncio.Protocol):
    """HTTP/2 with prior knowledge: each stream gets its response once the request ended.
    Bodies wait for flow-control window (never the case for 1 KB against default windows,
    but a slow reader must not make ``send_data`` raise)."""

    def __init__(self, size: int) -> None:
        self.body = b"x" * size
        self.headers = [(b":status", b"200"), (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(size).encode())]
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.waiting: list[int] = []  # streams whose body waits for window

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            # h2 reports END_STREAM as its own event, also on a request without a body.
            if isinstance(event, h2.events.StreamEnded):
                self._respond(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._flush_waiting()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def _respond(self, stream_id: int) -> None:
        self.conn.send_headers(stream_id, self.headers)
        self.waiting.append(stream_id)
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        while self.waiting:
            stream_id = self.waiting[0]
            try:
                if self.conn.local_flow_control_window(stream_id) < len(self.body):
                    return
                self.conn.send_data(stream_id, self.body, end_stream=True)
            except h2.exceptions.StreamClosedError:
                pass  # the client reset it meanwhile
            self.waiting.pop(0)


async def serve(http1_port: int, h2_port: int, size: int, host: str = "0.0.0.0") -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: Http1Server(size), host, http1_port,
                                 reuse_address=True, backlog=1024),
        await loop.create_server(lambda: H2Server(size), host, h2_port,
                                 reuse_address=True, backlog=1024),
    ]
    # The bound ports (port 0 picks free ones: the tests do).
    print(json.dumps({"listening": [f"{host}:{s.sockets[0].getsockname()[1]}"
                                    for s in servers]}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="httpserver")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--http1-port", type=int, required=True)
    ap.add_argument("--h2-port", type=int, required=True)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        _loop_runner()(serve(args.http1_port, args.h2_port, args.size, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
