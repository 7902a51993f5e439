"""Byte relay between two byte streams (plain TCP <-> HBONE stream, or TCP <-> TCP).

The relay is a splice of protocol callbacks, not a pair of pump tasks: bytes received on one
side are handed to the other side's write path inside the receiving callback, and back-pressure
is pause/resume of the receiving side (``pause_reading`` on a TCP transport; on an HBONE stream,
holding back its WINDOW_UPDATEs). The task that called :func:`relay` sleeps on one future until
the relay ends: no task wake-up per message (issue 13 measured one wake-up per message per
direction as the largest single cost of the old pumps).

* Reads are up to 256 KiB: large reads took C proxies from ~4 to ~6.5 Gbit/s on this
  machine kind (issue 3); asyncio and uvloop both read 256 KiB per ``data_received``.
* FIN <-> END_STREAM: EOF read on one side becomes ``write_eof()`` on the other; the relay
  ends when both directions have ended.
* Resets: a reset (TCP RST / RST_STREAM) or error on either side resets both: an HBONE
  stream gets RST_STREAM CANCEL, a TCP socket is aborted with SO_LINGER 0 (RST).
* Idle timeout: no byte in either direction for ``idle_timeout`` seconds resets both. One
  shared sweep per loop checks every relay (a flag set per chunk, no clock read per chunk and
  no timer per relay).
* Byte counters are exact: bytes handed to the other side's write path.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol

from nodeproxy.hbone.settings import RELAY_READ_SIZE
from nodeproxy.sockets import linger_zero
from ztunnel_cfg.errors import NodeproxyError

#: Pause reading a TCP socket when this much is buffered and not yet relayed (before the
#: stream is spliced, e.g. while the agent dials the destination).
TCP_READ_HIGH_WATER = 4 * RELAY_READ_SIZE


class Splice(Protocol):
    """What a spliced side reports to the relay (see :class:`_Splice`)."""

    def data(self, side: int, data: bytes) -> None: ...
    def eof(self, side: int) -> None: ...
    def fail(self, side: int, error: str) -> None: ...
    def writable(self, side: int) -> None: ...


class ByteStream(Protocol):
    """What the relay needs from each side (TcpStream and HboneStream implement it)."""

    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...
    # splice API: deliver received bytes to ``splice`` as side ``side`` from now on
    def attach(self, splice: Splice, side: int) -> None: ...
    def detach(self) -> None: ...
    def send(self, data: bytes) -> bool: ...
    def send_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class PeerResetError(ConnectionResetError):
    """The TCP peer reset the connection (or it was aborted locally)."""


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_up: int  # downstream -> upstream
    bytes_down: int  # upstream -> downstream
    reset: bool
    error: str | None


class TcpStream(asyncio.Protocol):
    """Plain TCP side of a relay: an async stream API until spliced, then callbacks."""

    # Slotted: one per open tunnel side (a __dict__ cost ~300 bytes more each).
    __slots__ = ("_buf", "_buffered", "_closed", "_drain_waiter", "_eof", "_lost",
                 "_read_paused", "_read_waiter", "_side", "_splice", "_write_paused", "transport")

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
        self._splice: Splice | None = None
        self._side = 0

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    @property
    def socket(self) -> socket.socket:
        """The connection's socket, for socket options and addresses (reads only)."""
        assert self.transport is not None
        sock: socket.socket = self.transport.get_extra_info("socket")
        return sock

    def data_received(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.data(self._side, data)
            return
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > TCP_READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        if self._splice is not None:
            self._splice.eof(self._side)
        self._wake(self._read_waiter)
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None or not self._eof:
            self._lost = exc or PeerResetError("connection closed")
        self._closed = True
        if self._splice is not None and self._lost is not None:
            self._splice.fail(self._side, f"TCP peer reset: {self._lost}")
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._splice is not None:
            self._splice.writable(self._side)
        self._wake(self._drain_waiter)

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    # stream API (before a splice)
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
        self.send(data)
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

    # splice API
    def attach(self, splice: Splice, side: int) -> None:
        """Hand every byte received from now on (and what is buffered) to ``splice``."""
        self._splice, self._side = splice, side
        buffered, self._buf, self._buffered = self._buf, [], 0
        if self._read_paused:  # paused for buffering; the splice decides from now on
            self.resume_reading()
        for chunk in buffered:
            splice.data(side, chunk)
        if self._eof:
            splice.eof(side)
        elif self._lost is not None:
            splice.fail(side, f"TCP peer reset: {self._lost}")

    def detach(self) -> None:
        self._splice = None

    def send(self, data: bytes) -> bool:
        """Write ``data``; False when the transport asks to stop (resume: ``writable``)."""
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            raise PeerResetError("TCP connection is closed")
        transport.write(data)
        return not self._write_paused

    def send_eof(self) -> None:
        self.write_eof()

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self.transport is not None and not self._closed:
                self.transport.resume_reading()


async def wrap_socket(sock: socket.socket) -> TcpStream:
    """Attach a connected (or accepted) socket to the running loop as a TcpStream."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.connect_accepted_socket(TcpStream, sock=sock)
    return proto


async def open_tcp(host: str, port: int) -> TcpStream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(TcpStream, host, port)
    return proto


class _Splice:
    """One relay: the two sides' callbacks meet here. Slotted: held by every open tunnel."""

    __slots__ = ("active", "counts", "done", "eofs", "error", "idle_timeout", "quiet_since",
                 "reset", "sides")

    def __init__(self, loop: asyncio.AbstractEventLoop, down: ByteStream, up: ByteStream,
                 idle_timeout: float | None) -> None:
        self.sides = (down, up)
        self.counts = [0, 0]
        self.eofs = [False, False]
        self.error: str | None = None
        self.reset = False
        self.done: asyncio.Future[None] = loop.create_future()
        self.idle_timeout = idle_timeout
        self.active = False
        self.quiet_since = loop.time()

    def data(self, side: int, data: bytes) -> None:
        if self.done.done():
            return
        self.active = True
        try:
            more = self.sides[1 - side].send(data)
        except (OSError, NodeproxyError) as exc:
            self.finish(str(exc) or type(exc).__name__, reset=True)
            return
        self.counts[side] += len(data)
        if not more:
            self.sides[side].pause_reading()

    def writable(self, side: int) -> None:
        if not self.done.done():
            self.sides[1 - side].resume_reading()

    def eof(self, side: int) -> None:
        if self.done.done() or self.eofs[side]:
            return
        self.eofs[side] = True
        try:
            self.sides[1 - side].send_eof()
        except (OSError, NodeproxyError) as exc:
            self.finish(str(exc) or type(exc).__name__, reset=True)
            return
        if self.eofs[0] and self.eofs[1]:
            self.finish(None, reset=False)

    def fail(self, side: int, error: str) -> None:
        self.finish(error, reset=True)

    def finish(self, error: str | None, *, reset: bool) -> None:
        if not self.done.done():
            self.error, self.reset = error, reset
            self.done.set_result(None)


class _IdleSweep:
    """The idle check of every relay on one loop: one timer, one pass over the relays."""

    __slots__ = ("handle", "interval", "loop", "splices")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.splices: set[_Splice] = set()
        self.interval = 30.0
        self.handle: asyncio.TimerHandle | None = None

    def add(self, splice: _Splice, timeout: float) -> None:
        self.splices.add(splice)
        # Detection is late by at most one interval: a tenth of the timeout, 50 ms to 30 s.
        interval = min(max(timeout / 10, 0.05), 30.0)
        if self.handle is None or interval < self.interval:
            if self.handle is not None:
                self.handle.cancel()
            self.interval = interval
            self.handle = self.loop.call_later(interval, self.sweep)

    def remove(self, splice: _Splice) -> None:
        self.splices.discard(splice)
        if not self.splices:
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
            _sweeps.pop(id(self.loop), None)

    def sweep(self) -> None:
        now = self.loop.time()
        for splice in self.splices:
            if splice.active:
                splice.active = False
                splice.quiet_since = now
            elif now - splice.quiet_since >= splice.idle_timeout:  # type: ignore[operator]
                splice.finish(f"idle for {splice.idle_timeout}s", reset=True)
        self.handle = self.loop.call_later(self.interval, self.sweep)


_sweeps: dict[int, _IdleSweep] = {}  # by id(loop); an entry lives while its loop has relays


def _idle_sweep(loop: asyncio.AbstractEventLoop) -> _IdleSweep:
    sweep = _sweeps.get(id(loop))
    if sweep is None or sweep.loop is not loop:
        sweep = _sweeps[id(loop)] = _IdleSweep(loop)
    return sweep


async def relay(downstream: ByteStream, upstream: ByteStream, *,
                idle_timeout: float | None = None) -> RelayResult:
    """Copy bytes both ways until both directions ended, a side reset, or idle timeout."""
    loop = asyncio.get_running_loop()
    splice = _Splice(loop, downstream, upstream, idle_timeout)
    sweep = _idle_sweep(loop) if idle_timeout is not None else None
    if sweep is not None:
        assert idle_timeout is not None
        sweep.add(splice, idle_timeout)
    try:
        downstream.attach(splice, 0)
        upstream.attach(splice, 1)
        await splice.done
    except asyncio.CancelledError:
        splice.finish(splice.error or "relay cancelled", reset=True)
        raise
    finally:
        if sweep is not None:
            sweep.remove(splice)
        downstream.detach()
        upstream.detach()
        # Close both sides here, whatever ended the relay: the sockets must not outlive it.
        if splice.reset or not splice.done.done():
            downstream.reset()
            upstream.reset()
        else:
            downstream.close()
            upstream.close()
    return RelayResult(splice.counts[0], splice.counts[1], splice.reset, splice.error)
