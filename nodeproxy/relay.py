"""Byte relay between two byte streams (plain TCP <-> HBONE stream, or TCP <-> TCP).

* Reads are up to 256 KiB: large reads took C proxies from ~4 to ~6.5 Gbit/s on this
  machine kind (issue 3); asyncio and uvloop both read 256 KiB per ``data_received``.
* FIN <-> END_STREAM: EOF read on one side becomes ``write_eof()`` on the other; the relay
  ends when both directions have ended.
* Resets: a reset (TCP RST / RST_STREAM) or error on either side resets both: an HBONE
  stream gets RST_STREAM CANCEL, a TCP socket is aborted with SO_LINGER 0 (RST).
* Idle timeout: no byte in either direction for ``idle_timeout`` seconds resets both.
* Byte counters are exact: bytes fully handed to the other side's write path.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.hbone.settings import RELAY_READ_SIZE
from nodeproxy.sockets import linger_zero

#: Pause reading a TCP socket when this much is buffered and not yet relayed.
TCP_READ_HIGH_WATER = 4 * RELAY_READ_SIZE


class ByteStream(Protocol):
    """What the relay needs from each side (TcpStream and HboneStream implement it)."""

    async def read(self, max_bytes: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class PeerResetError(ConnectionResetError):
    """The TCP peer reset the connection (or it was aborted locally)."""


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_up: int  # downstream -> upstream
    bytes_down: int  # upstream -> downstream
    reset: bool
    error: str | None


class TcpStream(asyncio.Protocol):
    """Plain TCP side of a relay, with bounded read buffering and write back-pressure."""

    # Slotted: one per open tunnel side (a __dict__ cost ~300 bytes more each).
    __slots__ = ("_buf", "_buffered", "_closed", "_drain_waiter", "_eof", "_lost",
                 "_read_paused", "_read_waiter", "_write_paused", "closed", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # A list, not a deque: an empty deque is ~600 bytes, held by every idle tunnel.
        self._buf: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = False
        self._read_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > TCP_READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(self._read_waiter)
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None or not self._eof:
            self._lost = exc or PeerResetError("connection closed")
        self._closed = True
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._drain_waiter)

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    # stream API
    async def read(self, max_bytes: int = RELAY_READ_SIZE) -> bytes:
        while not self._buf:
            if self._eof:
                return b""
            if self._lost is not None or self._closed:
                raise PeerResetError(f"TCP peer reset: {self._lost}")
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = self._buf.pop(0)
        if len(data) > max_bytes:
            self._buf.insert(0, data[max_bytes:])
            data = data[:max_bytes]
        self._buffered -= len(data)
        if self._read_paused and self._buffered <= TCP_READ_HIGH_WATER // 2:
            self._read_paused = False
            if self.transport is not None and not self._closed:
                self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            raise PeerResetError("TCP connection is closed")
        transport.write(data)
        while self._write_paused and not self._closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closed and self._lost is not None:
            raise PeerResetError(f"TCP peer reset: {self._lost}")

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def reset(self) -> None:
        """Abort with SO_LINGER 0 so the peer sees RST, not FIN."""
        t = self.transport
        if t is None or self._closed:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            linger_zero(sock)
        t.abort()

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()


async def wrap_socket(sock: socket.socket) -> TcpStream:
    """Attach a connected (or accepted) socket to the running loop as a TcpStream."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.connect_accepted_socket(TcpStream, sock=sock)
    return proto


async def open_tcp(host: str, port: int) -> TcpStream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(TcpStream, host, port)
    return proto


class _Relay:
    """State of one relay: one slotted object instead of closures, cell lists, an idle task
    and an ``asyncio.wait`` per wake-up (a relay is held by every open tunnel; these cost
    ~2 KB per tunnel, measured with tracemalloc)."""

    __slots__ = ("counts", "error", "idle", "idle_timeout", "last", "loop", "timer", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float | None) -> None:
        self.loop = loop
        self.counts = [0, 0]
        self.last = loop.time()
        self.error: str | None = None
        self.idle = False
        self.idle_timeout = idle_timeout
        self.timer: asyncio.TimerHandle | None = None
        self.wake: asyncio.Future[None] = loop.create_future()
        if idle_timeout is not None:
            self.timer = loop.call_later(idle_timeout, self.check_idle)

    async def pump(self, src: ByteStream, dst: ByteStream, idx: int) -> None:
        while True:
            data = await src.read(RELAY_READ_SIZE)
            if not data:
                dst.write_eof()
                return
            await dst.write(data)
            self.counts[idx] += len(data)
            self.last = self.loop.time()

    def wake_up(self, _task: object = None) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def check_idle(self) -> None:
        assert self.idle_timeout is not None
        remaining = self.last + self.idle_timeout - self.loop.time()
        if remaining <= 0:
            self.timer = None
            self.idle = True
            self.wake_up()
        else:
            self.timer = self.loop.call_later(remaining, self.check_idle)


async def relay(downstream: ByteStream, upstream: ByteStream, *,
                idle_timeout: float | None = None) -> RelayResult:
    """Copy bytes both ways until both directions ended, a side reset, or idle timeout."""
    loop = asyncio.get_running_loop()
    state = _Relay(loop, idle_timeout)
    up = loop.create_task(state.pump(downstream, upstream, 0))
    down = loop.create_task(state.pump(upstream, downstream, 1))
    up.add_done_callback(state.wake_up)
    down.add_done_callback(state.wake_up)
    reset = False
    try:
        while True:
            await state.wake
            if state.idle:
                state.error = f"idle for {idle_timeout}s"
                reset = True
                break
            for task in (up, down):
                if task.done() and (exc := task.exception()) is not None:
                    state.error = state.error or str(exc) or type(exc).__name__
                    reset = True
            if reset or (up.done() and down.done()):
                break
            state.wake = loop.create_future()
    except asyncio.CancelledError:
        reset = True
        state.error = state.error or "relay cancelled"
        raise
    finally:
        if state.timer is not None:
            state.timer.cancel()
        # Close both sides before the first await: this task may be cancelled again while it
        # waits for the pumps (the HBONE connection died), and the sockets must not depend on
        # getting past that await (it leaked one upstream socket per stream).
        if reset:
            downstream.reset()
            upstream.reset()
        else:
            downstream.close()
            upstream.close()
        up.cancel()
        down.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    return RelayResult(state.counts[0], state.counts[1], reset, state.error)
