"""The two traffic programs of ``python -m tests.bench.soak --lab``, run inside lab pods.

They stand for user apps: standard library and uvloop only, no nodeproxy imports, started as a
script (``python tests/bench/soak_apps.py ...``) through ``Cluster.popen`` in a pod netns.
Both raise their RLIMIT_NOFILE soft limit to the hard limit (10,000 held connections need
~10,000 descriptors) and are driven by one command per line on stdin; every answer is one JSON
line on stdout.

``soak_apps.py server --port P``
    Accepts and holds connections; answers the first bytes of each (the hello) with ``ok\\n``.
    Prints ``{"listening": [ip, port], "nofile": n}`` once bound.  Commands: ``stats`` ->
    ``{"open": n, "accepted": n}``; ``exit`` (or EOF) -> closes everything and exits.

``soak_apps.py client --connect IP:PORT``
    Commands: ``open N BATCH DEADLINE`` opens N more connections, BATCH at a time, each sends
    ``hello-<i>\\n`` and waits for ``ok\\n``; prints ``{"progress": k, "s": t}`` every few
    batches, then ``{"opened": k, "held": n, "s": t}`` or ``{"error": ..., "held": n}`` (a
    failed or overrun batch stops the phase; what opened stays held).  ``close`` closes every
    held connection (FIN) and prints ``{"closed": n, "s": t, "lost": n}`` once the kernel
    reported them all closed or 60 s passed.  ``stats`` -> ``{"held": n, "lost": n}``;
    ``exit`` (or EOF) -> exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import uvloop

HELLO_REPLY = b"ok\n"


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (no privilege needed); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# -- server ------------------------------------------------------------------------------------


class _ServerState:
    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0
        self.transports: set[asyncio.Transport] = set()


class _Held(asyncio.Protocol):
    __slots__ = ("replied", "state", "transport")

    def __init__(self, state: _ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.replied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.state.open += 1
        self.state.accepted += 1
        self.state.transports.add(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if not self.replied and self.transport is not None:
            self.replied = True
            self.transport.write(HELLO_REPLY)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.open -= 1
        if self.transport is not None:
            self.state.transports.discard(self.transport)
        self.transport = None


async def serve(host: str, port: int) -> int:
    nofile = raise_nofile()
    state = _ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Held(state), host, port, backlog=4096,
                                      reuse_address=True)
    sock = server.sockets[0].getsockname()
    say({"listening": [sock[0], sock[1]], "nofile": nofile})
    commands = await stdin_lines()
    try:
        while True:
            line = (await commands.readline()).decode().strip()
            if line == "stats":
                say({"open": state.open, "accepted": state.accepted})
            elif line in ("exit", ""):
                break
            else:
                say({"error": f"unknown command {line!r}"})
    finally:
        server.close()
        for t in list(state.transports):
            t.abort()
    return 0


# -- client ------------------------------------------------------------------------------------


class _ClientState:
    def __init__(self) -> None:
        self.held: list[asyncio.Transport] = []
        self.lost = 0
        self.all_lost: asyncio.Event | None = None
        self.expect_lost = 0

    def on_lost(self) -> None:
        self.lost += 1
        if self.all_lost is not None and self.lost >= self.expect_lost:
            self.all_lost.set()


class _Tunnel(asyncio.Protocol):
    __slots__ = ("buf", "hello", "reply", "state")

    def __init__(self, state: _ClientState, hello: bytes, reply: asyncio.Future[bytes]) -> None:
        self.state = state
        self.hello = hello
        self.reply: asyncio.Future[bytes] | None = reply
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.hello)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.reply is None:
            return
        self.buf += data
        if b"\n" in self.buf:
            if not self.reply.done():
                self.reply.set_result(self.buf)
            self.reply, self.buf = None, b""

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError(f"closed before the reply ({exc!r})"))
        self.reply = None
        self.state.on_lost()


async def _open_one(state: _ClientState, host: str, port: int, i: int) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: _Tunnel(state, f"hello-{i:06d}\n".encode(), reply), host, port)
    try:
        got = await reply
    except BaseException:
        transport.abort()
        raise
    if got != HELLO_REPLY:
        transport.abort()
        raise ConnectionError(f"connection {i}: reply {got!r}")
    return transport


async def open_phase(state: _ClientState, host: str, port: int, count: int, batch: int,
                     deadline: float) -> None:
    start = time.monotonic()
    opened = 0
    first_index = len(state.held)
    try:
        async with asyncio.timeout(deadline):
            for first in range(0, count, batch):
                size = min(batch, count - first)
                results = await asyncio.gather(
                    *(_open_one(state, host, port, first_index + first + k) for k in range(size)),
                    return_exceptions=True)
                ok = [r for r in results if not isinstance(r, BaseException)]
                state.held.extend(ok)
                opened += len(ok)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    say({"error": f"{len(errors)} of the batch at {first} failed, first: "
                                  f"{errors[0]!r}", "opened": opened, "held": len(state.held)})
                    return
                if (first // batch) % 4 == 3:
                    say({"progress": opened, "s": round(time.monotonic() - start, 2)})
    except TimeoutError:
        say({"error": f"only {opened} of {count} open after {deadline} s", "opened": opened,
             "held": len(state.held)})
        return
    say({"opened": opened, "held": len(state.held), "s": round(time.monotonic() - start, 3)})


async def close_phase(state: _ClientState) -> None:
    start = time.monotonic()
    held, state.held = state.held, []
    state.all_lost = asyncio.Event()
    state.expect_lost = state.lost + len(held)
    if state.lost >= state.expect_lost:
        state.all_lost.set()
    for t in held:
        t.close()
    try:
        async with asyncio.timeout(60):
            await state.all_lost.wait()
    except TimeoutError:
        pass
    state.all_lost = None
    say({"closed": len(held), "lost": state.lost, "s": round(time.monotonic() - start, 3)})


async def client(target: str) -> int:
    nofile = raise_nofile()
    host, _, port_s = target.rpartition(":")
    port = int(port_s)
    state = _ClientState()
    say({"ready": True, "nofile": nofile})
    commands = await stdin_lines()
    try:
        while True:
            words = (await commands.readline()).decode().split()
            if not words or words[0] == "exit":
                break
            if words[0] == "open" and len(words) == 4:
                await open_phase(state, host, port, int(words[1]), int(words[2]),
                                 float(words[3]))
            elif words[0] == "close":
                await close_phase(state)
            elif words[0] == "stats":
                say({"held": len(state.held), "lost": state.lost})
            else:
                say({"error": f"unknown command {' '.join(words)!r}"})
    finally:
        for t in state.held:
            t.abort()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak_apps.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="accept and hold connections, answer each hello")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client", help="open, hold and close connections on command")
    c.add_argument("--connect", required=True, metavar="IP:PORT")
    args = ap.parse_args(argv)
    if args.cmd == "server":
        return uvloop.run(serve(args.host, args.port))
    return uvloop.run(client(args.connect))


if __name__ == "__main__":
    sys.exit(main())
