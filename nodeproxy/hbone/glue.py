"""Thin asyncio glue around :class:`HboneConnection`.

One :class:`HboneProtocol` per TLS connection (asyncio or uvloop SSL transport). It feeds
received bytes to the sans-I/O layer, dispatches events to :class:`HboneStream` objects and
writes what the layer produces.

Flow control, both directions:
* receive: bytes sit in the stream's buffer until ``read()`` returns them; only then are
  they acknowledged (WINDOW_UPDATE). Buffering is therefore bounded by the windows we
  advertise (4 MiB per stream, 16 MiB per connection); a peer exceeding them is a
  FLOW_CONTROL_ERROR. Reading from the transport is paused only while more than
  ``max_backlog`` bytes wait to be written to the peer: DATA never gets there (writes stop at
  the transport's high-water mark), only answers to the peer's own frames (PING/SETTINGS
  ACKs) from a peer that does not read. The keepalive then ends such a connection.
* the receive buffer is one per thread, reused by every connection: received bytes are
  consumed or copied before ``buffer_updated`` returns, and a per-connection 256 KiB buffer
  was ~85% of the memory of an idle or handshaking connection.
* send: ``write()`` hands the layer only what the HTTP/2 windows accept and waits for
  WindowOpened for the rest; it also waits while the transport asked us to pause writing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from nodeproxy.errors import ProxyError
from nodeproxy.hbone import events as ev
from nodeproxy.hbone import settings as cfg
from nodeproxy.hbone.flood import FloodLimits
from nodeproxy.hbone.frames import ErrorCodes
from nodeproxy.hbone.protocol import HboneConnection, HboneProtocolError, StreamLimitError

if TYPE_CHECKING:
    from nodeproxy.relay import Splice

log = logging.getLogger("nodeproxy.hbone")

RequestHandler = Callable[["HboneStream", ev.ConnectRequest], Awaitable[None]]
PeerVerifier = Callable[[asyncio.BaseTransport], None]
ConnectionErrorHook = Callable[["HboneProtocol", ev.ConnectionError], None]

#: A DATA write at least this large is flushed at once instead of at the end of the iteration.
FLUSH_NOW_BYTES = 64 * 1024

#: Stop reading a peer that has this many bytes of our answers unread (see module doc).
MAX_PEER_BACKLOG = 1024 * 1024

_buffers = threading.local()


def _shared_read_buffer() -> memoryview:
    """This thread's receive buffer (an event loop runs in one thread; see module doc)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(cfg.RELAY_READ_SIZE))
    return view


class StreamResetError(ProxyError):
    """The HBONE stream was reset (by the peer, or because the connection died)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, status=503, flags="CONNECT")
        self.code = code


def status_error(status: int, authority: str) -> ProxyError:
    """Map a non-200 CONNECT answer to a ProxyError: 401/403 -> DENY, others -> CONNECT."""
    if status in (401, 403):
        return ProxyError(f"HBONE CONNECT {authority} denied ({status})", status=status,
                          flags="DENY", hint="check the authorization policies of the target")
    if status == 400:
        return ProxyError(f"HBONE CONNECT {authority} rejected as bad request (400)",
                          status=400, flags="CONNECT",
                          hint="is the authority a workload IP:port local to that node?")
    return ProxyError(f"HBONE CONNECT {authority} failed ({status})", status=status,
                      flags="CONNECT", hint="is the destination workload listening on that port?")


class HboneStream:
    """One CONNECT tunnel. Async byte-stream API used by the relay."""

    # Slotted: one per open tunnel (a __dict__ cost ~300 bytes more each).
    __slots__ = ("_blocked", "_buf", "_buffered", "_eof", "_eof_pending", "_held", "_holding",
                 "_pending", "_pending_bytes", "_proto", "_read_waiter", "_reset_code", "_response",
                 "_side", "_splice",
                 "_write_closed", "_write_waiter", "authority", "bytes_received", "bytes_sent",
                 "responded", "stream_id")

    def __init__(self, proto: HboneProtocol, stream_id: int, authority: str) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self.authority = authority
        self.bytes_sent = 0
        self.bytes_received = 0
        # A list, not a deque: an empty deque is ~600 bytes, held by every idle tunnel.
        self._buf: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._reset_code: int | None = None
        self._write_closed = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[ev.ConnectResponse] | None = None
        self.responded = False
        # Splice mode (relay): received bytes go straight to the splice; bytes the windows do
        # not take yet wait in _pending; while the other side cannot write, received bytes
        # are not acknowledged (_held): the peer's window is the back-pressure.
        self._splice: Splice | None = None
        self._side = 0
        self._pending: list[memoryview] | None = None
        self._pending_bytes = 0
        self._blocked = False  # send() said "stop": writable() is owed
        self._eof_pending = False
        self._holding = False
        self._held = 0

    @property
    def protocol(self) -> HboneProtocol:
        """The connection carrying this stream (peer identity, addresses)."""
        return self._proto

    # ----------------------------------------------------------- server side

    def accept(self) -> None:
        """Server: answer 200; the tunnel is open."""
        self._respond(200)

    def refuse(self, status: int) -> None:
        """Server: answer ``status`` (400 / 401 / 503 ...) and end the stream."""
        self._respond(status)

    def _respond(self, status: int) -> None:
        if self.responded or self._reset_code is not None:
            return
        self.responded = True
        if self._proto.conn.dead:
            return  # the connection failed meanwhile: there is nobody to answer
        self._proto.conn.respond(self.stream_id, status)
        if status != 200:
            self._write_closed = True
        self._proto.flush()

    # ----------------------------------------------------------- data

    async def read(self, max_bytes: int = cfg.RELAY_READ_SIZE) -> bytes:
        """Up to ``max_bytes``; b"" once the peer half-closed. Raises StreamResetError."""
        while not self._buf:
            if self._reset_code is not None:
                raise StreamResetError(f"HBONE stream to {self.authority} was reset",
                                       self._reset_code)
            if self._eof:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = self._buf.pop(0)
        if len(data) > max_bytes:
            self._buf.insert(0, data[max_bytes:])
            data = data[:max_bytes]
        n = len(data)
        self._buffered -= n
        self.bytes_received += n
        proto = self._proto
        if not proto.conn.dead:
            proto.conn.acknowledge(self.stream_id, n)
            proto.schedule_flush()  # a WINDOW_UPDATE, if any, rides with the next write
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for flow-control window and transport drain."""
        mv = memoryview(data)
        proto = self._proto
        conn = proto.conn
        while True:
            if self._reset_code is not None:
                raise StreamResetError(f"HBONE stream to {self.authority} was reset",
                                       self._reset_code)
            if self._write_closed:
                raise StreamResetError(f"HBONE stream to {self.authority} is closed for "
                                       "writing", ErrorCodes.STREAM_CLOSED)
            if proto.write_paused:
                await proto.wait_writable()
                continue
            if not mv:
                return
            try:
                n = conn.send_data(self.stream_id, mv)
            except HboneProtocolError as exc:
                raise StreamResetError(str(exc), ErrorCodes.STREAM_CLOSED) from exc
            if n:
                self.bytes_sent += n
                mv = mv[n:]
                if type(data) is bytes:  # immutable: may leave at the end of the iteration
                    proto.flush_soon(n)
                else:  # the caller may reuse its buffer once we return
                    proto.flush()
                continue
            self._write_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None

    def write_eof(self) -> None:
        """Half-close (END_STREAM)."""
        if self._write_closed or self._reset_code is not None or self._proto.conn.dead:
            return
        self._write_closed = True
        try:
            self._proto.conn.end_stream(self.stream_id)
        except HboneProtocolError:
            return
        self._proto.flush()

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM (default CANCEL); pending readers/writers get StreamResetError."""
        if self._reset_code is None:
            self._on_reset(code)
            if not self._proto.conn.dead:
                self._proto.conn.reset_stream(self.stream_id, code)
                self._proto.flush()

    def close(self) -> None:
        """Release the stream: RST_STREAM CANCEL unless both directions already ended."""
        if not (self._eof and self._write_closed):
            self.reset()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def is_reset(self) -> bool:
        return self._reset_code is not None

    # ----------------------------------------------------------- splice (relay) API

    def attach(self, splice: Splice, side: int) -> None:
        """Hand every byte received from now on (and what is buffered) to ``splice``."""
        self._splice, self._side = splice, side
        buffered, self._buf, self._buffered = self._buf, [], 0
        for chunk in buffered:
            self._deliver(chunk)
        if buffered:
            self._proto.schedule_flush()
        if self._reset_code is not None:
            splice.fail(side, f"HBONE stream to {self.authority} was reset")
        elif self._eof:
            splice.eof(side)

    def detach(self) -> None:
        self._splice = None
        if self._held:
            self._release_held()

    def send(self, data: bytes) -> bool:
        """Queue ``data`` for the peer; False while it waits for window or for the transport
        (the splice hears ``writable`` once it is all out)."""
        if self._reset_code is not None:
            raise StreamResetError(f"HBONE stream to {self.authority} was reset",
                                   self._reset_code)
        if self._write_closed:
            raise StreamResetError(f"HBONE stream to {self.authority} is closed for writing",
                                   ErrorCodes.STREAM_CLOSED)
        pending = self._pending
        proto = self._proto
        if pending or proto.write_paused:
            if pending is None:
                pending = self._pending = []
            pending.append(memoryview(data))
            self._pending_bytes += len(data)
        else:
            try:
                n = proto.conn.send_data(self.stream_id, data)
            except HboneProtocolError as exc:
                raise StreamResetError(str(exc), ErrorCodes.STREAM_CLOSED) from exc
            self.bytes_sent += n
            proto.flush_soon(n)
            if n == len(data):
                return True
            self._pending = [memoryview(data)[n:]]
            self._pending_bytes = len(data) - n
        if self._pending_bytes < cfg.SPLICE_PENDING_HIGH_WATER:
            return True  # a pause/resume cycle per chunk costs more than holding one more
        self._blocked = True
        return False

    def send_eof(self) -> None:
        if self._pending:
            self._eof_pending = True  # after the pending bytes
        else:
            self.write_eof()

    def pause_reading(self) -> None:
        self._holding = True

    def resume_reading(self) -> None:
        self._holding = False
        if self._held:
            self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, 0
        proto = self._proto
        if not proto.conn.dead:
            proto.conn.acknowledge(self.stream_id, held)
            proto.schedule_flush()

    def _deliver(self, data: bytes) -> None:
        n = len(data)
        self.bytes_received += n
        assert self._splice is not None
        self._splice.data(self._side, data)
        if self._holding:
            self._held += n
        elif not self._proto.conn.dead:
            self._proto.conn.acknowledge(self.stream_id, n)  # flushed after the dispatch

    def _drain_pending(self) -> None:
        pending = self._pending
        proto = self._proto
        conn = proto.conn
        while pending and not proto.write_paused:
            if self._reset_code is not None or self._write_closed or conn.dead:
                return
            chunk = pending[0]
            try:
                n = conn.send_data(self.stream_id, chunk)
            except HboneProtocolError:
                return
            if not n:
                break
            self.bytes_sent += n
            self._pending_bytes -= n
            proto.flush_soon(n)
            if n < len(chunk):
                pending[0] = chunk[n:]
                break
            pending.pop(0)
        if pending:
            return
        self._pending = None
        if self._eof_pending:
            self._eof_pending = False
            self.write_eof()
        if self._blocked:
            self._blocked = False
            if self._splice is not None:
                self._splice.writable(self._side)

    # ----------------------------------------------------------- from the protocol

    def _on_data(self, data: bytes) -> None:
        if self._splice is not None:
            self._deliver(data)
            return
        self._buf.append(data)
        self._buffered += len(data)
        self._wake_reader()

    def _on_end(self) -> None:
        self._eof = True
        if self._splice is not None:
            self._splice.eof(self._side)
        self._wake_reader()

    def _on_reset(self, code: int) -> None:
        if self._reset_code is None:
            self._reset_code = code
        if self._buffered:
            # Nobody will read these bytes: hand their window back to the connection.
            if not self._proto.conn.dead:
                self._proto.conn.acknowledge(self.stream_id, self._buffered)
            self._buffered = 0
        self._buf.clear()
        self._pending = None
        self._pending_bytes = 0
        if self._held:  # held back from the peer: hand the window back to the connection
            held, self._held = self._held, 0
            if not self._proto.conn.dead:
                self._proto.conn.acknowledge(self.stream_id, held)
        self._wake_reader()
        self._wake_writer()
        if self._splice is not None:
            self._splice.fail(self._side, f"HBONE stream to {self.authority} was reset")
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                StreamResetError(f"HBONE stream to {self.authority} was reset", code))

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        if self._pending:
            self._drain_pending()
        w = self._write_waiter
        if w is not None and not w.done():
            w.set_result(None)


class HboneProtocol(asyncio.BufferedProtocol):
    """asyncio protocol for one HBONE connection (client or server side)."""

    def __init__(self, client_side: bool, *, on_request: RequestHandler | None = None,
                 verify_peer: PeerVerifier | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, fast_path: bool = True,
                 flood_limits: FloodLimits | None = None,
                 on_connection_error: ConnectionErrorHook | None = None,
                 max_backlog: int = MAX_PEER_BACKLOG) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.conn = HboneConnection(client_side, self.loop.time, fast_path=fast_path,
                                    flood_limits=flood_limits)
        self._on_request = on_request
        self._verify_peer = verify_peer
        self._on_connection_error = on_connection_error
        self._max_backlog = max_backlog
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStream] = {}
        self.write_paused = False
        self.reading_paused = False  # by us: the peer does not read our answers
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Request handlers by stream: a stream reset before its answer cancels its handler
        # (and so its upstream dial): the rapid-reset class.
        self._handlers: dict[int, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self.ready: asyncio.Future[None] = self.loop.create_future()
        # Nobody may await ``ready`` (server side): mark its exception as retrieved.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.close_reason: str | None = None
        # Filled by the caller's verify_peer hook (e.g. the peer's SPIFFE ID); opaque here.
        self.peer_identity: Any = None
        self.peer_ip: str = ""

    # ----------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._verify_peer is not None:
            try:
                self._verify_peer(transport)  # before any application byte goes out
            except Exception as exc:
                self.close_reason = str(exc)
                if not self.ready.done():
                    self.ready.set_exception(exc)
                transport.abort()  # type: ignore[attr-defined]
                return
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.flush()
        self._timer = self.loop.call_later(cfg.TICK_INTERVAL, self._tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _shared_read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._dispatch(self.conn.receive_data(_shared_read_buffer()[:nbytes]))
        self.flush()
        if not self.ready.done() and self.conn.settings_received:
            self.ready.set_result(None)  # peer's limits (max streams, windows) now known

    def eof_received(self) -> bool:
        self._fail_all("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self._fail_all(self.close_reason or reason)
        self.conn.dead = True
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ProxyError(f"HBONE connection failed: {reason}",
                                                flags="CONNECT"))
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        for task in list(self._tasks):
            task.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        for st in list(self.streams.values()):
            if st._pending:  # spliced streams that waited for the transport
                st._drain_pending()
                if self.write_paused:
                    break

    async def wait_writable(self) -> None:
        if not self.write_paused or self.transport is None:
            if self.transport is None:
                self.write_paused = False
            return
        fut = self.loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    # ----------------------------------------------------------- plumbing

    def schedule_flush(self) -> None:
        """Flush once at the end of this loop iteration: every stream's writes and
        WINDOW_UPDATEs of the iteration leave in one transport write (one TLS write)."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._scheduled_flush)

    def flush_soon(self, queued: int) -> None:
        """After queueing ``queued`` bytes of DATA: small writes wait for the end of the
        iteration (coalesced); a large one leaves now. Joining several 256 KiB reads into one
        TLS write was measured slower per byte (the joined buffer no longer fits the cache:
        client agent 2.0 -> 2.5 CPU s/GiB)."""
        if queued >= FLUSH_NOW_BYTES:
            self.flush()
        else:
            self.schedule_flush()

    def _scheduled_flush(self) -> None:
        self._flush_handle = None
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if (not self.reading_paused and self.write_paused
                    and transport.get_write_buffer_size() > self._max_backlog):
                self.reading_paused = True
                transport.pause_reading()

    def _tick(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        self._dispatch(self.conn.tick(self.loop.time()))
        self.flush()
        if self.transport is not None:
            self._timer = self.loop.call_later(cfg.TICK_INTERVAL, self._tick)

    def _dispatch(self, events: list[ev.Event]) -> None:
        streams = self.streams
        for e in events:
            if type(e) is ev.StreamData:
                st = streams.get(e.stream_id)
                if st is not None:
                    st._on_data(e.data)
                else:  # nobody will read it: give the window back
                    self.conn.acknowledge(e.stream_id, len(e.data))
            elif type(e) is ev.WindowOpened:
                if e.stream_id is None:
                    for st in streams.values():
                        st._wake_writer()
                elif (st := streams.get(e.stream_id)) is not None:
                    st._wake_writer()
            elif type(e) is ev.StreamEnded:
                if (st := streams.get(e.stream_id)) is not None:
                    st._on_end()
            elif type(e) is ev.StreamReset:
                if (st := streams.get(e.stream_id)) is not None:
                    st._on_reset(e.error_code)
                    handler = self._handlers.get(e.stream_id)
                    if handler is not None and not st.responded:
                        handler.cancel()  # nobody waits for the answer: stop dialling
            elif type(e) is ev.StreamClosed:
                streams.pop(e.stream_id, None)
                self._maybe_finish_drain()
            elif type(e) is ev.ConnectResponse:
                st = streams.get(e.stream_id)
                if st is not None and st._response is not None and not st._response.done():
                    st._response.set_result(e)
            elif type(e) is ev.ConnectRequest:
                self._start_request(e)
            elif type(e) is ev.BadRequest:
                log.info("component=hbone rejected request stream=%d: %s (400)",
                         e.stream_id, e.reason)
            elif type(e) is ev.GoAway:
                log.info("component=hbone peer sent GOAWAY last_stream=%d code=%d",
                         e.last_stream_id, e.error_code)
                self._maybe_finish_drain()
            elif type(e) is ev.ConnectionError:
                self.close_reason = e.reason
                log.warning("component=hbone connection error: %s", e.reason)
                self._fail_all(e.reason)
                for task in list(self._tasks):
                    task.cancel()  # their streams are gone; close their upstreams now
                self.flush()
                if self._on_connection_error is not None:
                    self._on_connection_error(self, e)
                if self.transport is not None:
                    if e.kind in ("reset_flood", "control_flood"):
                        # GOAWAY is queued; do not wait for a hostile peer to read it.
                        self.transport.abort()
                    else:
                        self.transport.close()

    def _start_request(self, req: ev.ConnectRequest) -> None:
        stream = HboneStream(self, req.stream_id, req.authority)
        self.streams[req.stream_id] = stream
        if self._on_request is None:
            stream.refuse(503)
            return
        task = self.loop.create_task(self._run_handler(stream, req))
        self._tasks.add(task)
        self._handlers[req.stream_id] = task  # removed by _run_handler when it ends
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, stream: HboneStream, req: ev.ConnectRequest) -> None:
        assert self._on_request is not None
        try:
            await self._on_request(stream, req)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except Exception as exc:
            # A handler that raises is a bug: refuse the stream, and report it where the
            # loop reports other lost exceptions (the default handler logs it with its
            # traceback; tests install a handler that fails the test).
            log.error("component=hbone request handler failed for %s: %r", req.authority, exc)
            self.loop.call_exception_handler({
                "message": f"HBONE request handler failed for {req.authority}",
                "exception": exc,
                "protocol": self,
            })
            if not stream.responded:
                stream.refuse(503)
        finally:
            self._handlers.pop(stream.stream_id, None)
            if self.conn.dead:
                pass  # nothing can be sent any more
            elif not stream.responded:
                stream.refuse(503)
            elif not (stream.at_eof and stream._write_closed):
                stream.reset()  # handler is done with a stream that is still open

    def _fail_all(self, reason: str) -> None:
        for st in list(self.streams.values()):
            st._on_reset(ErrorCodes.CANCEL)
        self.streams.clear()

    def _maybe_finish_drain(self) -> None:
        draining = self.conn.goaway_sent_last_id is not None or self.conn.goaway_received
        if draining and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    # ----------------------------------------------------------- API

    def new_stream(self, authority: str, headers: Sequence[tuple[str, str]]) -> HboneStream:
        sid = self.conn.open_stream(authority, headers)
        stream = HboneStream(self, sid, authority)
        stream._response = self.loop.create_future()
        self.streams[sid] = stream
        self.flush()
        return stream

    def goaway(self) -> None:
        """Graceful: no new streams; close once in-flight streams are done."""
        if self.transport is None:
            return
        self.conn.goaway()
        self.flush()
        self._maybe_finish_drain()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HboneClientConnection:
    """Client side of one HBONE connection."""

    def __init__(self, proto: HboneProtocol) -> None:
        self._proto = proto

    @property
    def protocol(self) -> HboneProtocol:
        return self._proto

    @property
    def is_usable(self) -> bool:
        return self._proto.transport is not None and self.streams_available() > 0

    def streams_available(self) -> int:
        return self._proto.conn.streams_available()

    @property
    def active_streams(self) -> int:
        return len(self._proto.streams)

    async def open_stream(self, authority: str,
                          headers: Sequence[tuple[str, str]] = ()) -> HboneStream:
        """CONNECT; return the tunnel on 200, else raise ProxyError (see status_error)."""
        if self._proto.transport is None:
            raise ProxyError(f"HBONE connection is closed ({self._proto.close_reason})",
                             flags="CONNECT")
        stream = self._proto.new_stream(authority, headers)
        assert stream._response is not None
        try:
            resp = await stream._response
        except BaseException:
            stream.reset()  # cancelled while waiting: the peer must drop its upstream too
            raise
        stream._response = None
        if resp.status != 200:
            stream.reset()
            raise status_error(resp.status, authority)
        return stream

    def goaway(self) -> None:
        self._proto.goaway()

    def close(self) -> None:
        """Graceful close: GOAWAY, then the transport closes when streams are done."""
        self._proto.goaway()

    def abort(self) -> None:
        self._proto.abort()

    async def wait_closed(self) -> None:
        await self._proto.closed


async def open_connection(host: str | None, port: int | None, ssl_context: ssl.SSLContext, *,
                          sock: object | None = None, verify_peer: PeerVerifier | None = None,
                          timeout: float = 10.0) -> HboneClientConnection:
    """Open a TLS (ALPN h2, no SNI) HBONE connection; ``sock`` (an already connected socket
    from the injected factory) replaces host/port."""
    loop = asyncio.get_running_loop()
    proto: HboneProtocol | None = None

    def factory() -> HboneProtocol:
        nonlocal proto
        proto = HboneProtocol(True, verify_peer=verify_peer, loop=loop)
        return proto

    target = f"{host}:{port}" if sock is None else "socket"
    try:
        async with asyncio.timeout(timeout):
            if sock is not None:
                await loop.create_connection(factory, sock=sock,  # type: ignore[call-overload]
                                             ssl=ssl_context, server_hostname="")
            else:
                await loop.create_connection(factory, host, port,  # type: ignore[arg-type]
                                             ssl=ssl_context, server_hostname="")
            assert proto is not None
            await proto.ready
    except TimeoutError as exc:
        if proto is not None:
            proto.abort()
        hint = f"is {target} reachable, and is port 15008 open between nodes?"
        raise ProxyError(f"HBONE connection to {target} timed out", hint=hint) from exc
    except ssl.SSLError as exc:
        raise ProxyError(f"TLS handshake with {target} failed: {exc.reason or exc}",
                         flags="TLS_FAILURE",
                         hint="check certificates and the trust bundle") from exc
    except OSError as exc:
        from nodeproxy.errors import from_os_error

        raise from_os_error(exc, "HBONE connection to", target) from exc
    return HboneClientConnection(proto)


class HboneServer:
    """HBONE server connections: accepted one by one (:meth:`accept`, the agent's own accept
    loop decides admission) or from an asyncio server (:func:`start_server`)."""

    def __init__(self, on_request: RequestHandler, *, verify_peer: PeerVerifier | None = None,
                 flood_limits: FloodLimits | None = None,
                 on_connection_error: ConnectionErrorHook | None = None,
                 max_backlog: int = MAX_PEER_BACKLOG) -> None:
        self.server: asyncio.Server | None = None
        self.protocols: set[HboneProtocol] = set()
        self._on_request = on_request
        self._verify_peer = verify_peer
        self._flood_limits = flood_limits
        self._on_connection_error = on_connection_error
        self._max_backlog = max_backlog

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def protocol_factory(self) -> HboneProtocol:
        proto = HboneProtocol(False, on_request=self._on_request, verify_peer=self._verify_peer,
                              flood_limits=self._flood_limits,
                              on_connection_error=self._on_connection_error,
                              max_backlog=self._max_backlog)
        self.protocols.add(proto)
        proto.closed.add_done_callback(lambda _f: self.protocols.discard(proto))
        return proto

    async def accept(self, sock: socket.socket, ssl_context: ssl.SSLContext, *,
                     handshake_timeout: float) -> HboneProtocol:
        """Serve HBONE on an accepted socket; returns once TLS is up and the peer verified.
        Raises (and the socket is closed) if the handshake fails or takes too long."""
        loop = asyncio.get_running_loop()
        created: list[HboneProtocol] = []

        def factory() -> HboneProtocol:
            created.append(self.protocol_factory())
            return created[0]

        # uvloop returns its SSL wrapper protocol here, asyncio ours: keep our own reference.
        await loop.connect_accepted_socket(factory, sock=sock, ssl=ssl_context,
                                           ssl_handshake_timeout=handshake_timeout)
        proto = created[0]
        if proto.transport is None:  # the peer check refused it (connection_made aborted)
            raise ProxyError(f"HBONE peer refused: {proto.close_reason}", flags="TLS_FAILURE")
        return proto

    async def close(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop accepting; GOAWAY every connection (graceful) or abort them; wait."""
        if self.server is not None:
            self.server.close()
        protos = list(self.protocols)
        for proto in protos:
            proto.goaway() if graceful else proto.abort()
        if protos:
            _done, pending = await asyncio.wait([p.closed for p in protos], timeout=timeout)
            for proto in protos:
                if not proto.closed.done():
                    proto.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self.server is not None:
            await self.server.wait_closed()


async def start_server(on_request: RequestHandler, host: str | None, port: int | None,
                       ssl_context: ssl.SSLContext, *, sock: object | None = None,
                       verify_peer: PeerVerifier | None = None,
                       flood_limits: FloodLimits | None = None) -> HboneServer:
    """Serve HBONE; ``on_request(stream, req)`` decides and calls accept()/refuse()."""
    loop = asyncio.get_running_loop()
    hbone = HboneServer(on_request, verify_peer=verify_peer, flood_limits=flood_limits)
    if sock is not None:
        hbone.server = await loop.create_server(  # type: ignore[call-overload]
            hbone.protocol_factory, sock=sock, ssl=ssl_context)
    else:
        hbone.server = await loop.create_server(hbone.protocol_factory, host, port or 0,
                                                ssl=ssl_context)
    return hbone


__all__ = [
    "HboneClientConnection",
    "HboneProtocol",
    "HboneServer",
    "HboneStream",
    "StreamLimitError",
    "StreamResetError",
    "open_connection",
    "start_server",
    "status_error",
]
