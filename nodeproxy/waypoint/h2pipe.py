"""An h2 connection driven over a byte stream (an HBONE tunnel), for the waypoint's HTTP/2
sides: the downstream server connection and the pooled upstream client connections.

One reader task per connection feeds h2 and routes its events to per-stream state; writers
wait on flow-control windows; one lock keeps frames of concurrent writers whole.  Received
DATA is acknowledged only when the consumer takes it, so a slow reader on one side slows the
sender on the other (end-to-end backpressure through both windows).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from nodeproxy.hbone.flood import FloodLimits, WindowCounter

Headers = list[tuple[str, str]]
STREAM_WINDOW = 1 << 20  # per stream: 1 MiB in flight before the consumer must read
CONNECTION_WINDOW = 16 << 20
MAX_CONCURRENT_STREAMS = 100


class ByteStream(Protocol):
    async def read(self, max_bytes: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self) -> None: ...


class StreamGone(Exception):
    """The peer reset the stream (``code``) or the connection ended."""

    def __init__(self, message: str, code: int = ErrorCodes.CANCEL) -> None:
        super().__init__(message)
        self.code = code


class H2Stream:
    """One HTTP/2 stream's receive side: headers, body pieces, trailers, end or reset."""

    __slots__ = ("_data", "_data_waiter", "ended", "headers", "headers_ready", "id", "pipe",
                 "reset_code", "trailers")

    def __init__(self, pipe: H2Pipe, stream_id: int) -> None:
        self.pipe = pipe
        self.id = stream_id
        self.headers: Headers = []
        self.headers_ready: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self.trailers: Headers = []
        self.ended = False
        self.reset_code: int | None = None
        self._data: list[bytes] = []
        self._data_waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The next body piece (acknowledged to the peer as taken); b"" at the end."""
        while not self._data:
            if self.reset_code is not None:
                raise StreamGone(f"stream {self.id} was reset", self.reset_code)
            if self.ended:
                return b""
            self._data_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        data = self._data.pop(0)
        await self.pipe.acknowledge(self.id, len(data))
        return data

    def take_buffered(self) -> list[bytes]:
        """Every body piece received and not read yet, taken at once; the caller
        acknowledges their size (:meth:`H2Pipe.acknowledge`)."""
        pieces, self._data = self._data, []
        return pieces

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    def _fail(self, code: int) -> None:
        if self.reset_code is None:
            self.reset_code = code
        if not self.headers_ready.done():
            self.headers_ready.set_exception(StreamGone(f"stream {self.id} was reset", code))
            self.headers_ready.exception()  # retrieved: nobody may be waiting
        self._wake()


class H2Pipe:
    def __init__(self, io: ByteStream, *, client_side: bool,
                 on_request: Callable[[H2Stream], Coroutine[Any, Any, None]] | None = None,
                 flood: FloodLimits | None = None) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8",
                                           validate_inbound_headers=True)
        self.io = io
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.streams: dict[int, H2Stream] = {}
        self.on_request = on_request
        self.handlers: set[asyncio.Task[None]] = set()
        self.handler_of: dict[int, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._batch: asyncio.Future[None] | None = None  # the flush that takes new frames
        self._window = asyncio.Event()
        self.closed = False
        self.goaway = False
        self.error: str | None = None
        limits = flood or FloodLimits()
        self._premature = WindowCounter(limits.max_premature_resets, limits.window)
        self._control = WindowCounter(limits.max_control_frames, limits.window)

    async def start(self, first: bytes = b"") -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        if first:
            self._dispatch(self._receive(first))
        await self.flush()

    # -- sending ------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Send what h2 has queued, batched: the first caller of a loop turn yields once so
        that the other ready tasks of this connection (its other streams, the reader) queue
        their frames too, then writes them all in one HBONE write; callers meanwhile wait for
        that write.  Measured: with one write per frame, HboneProtocol.flush (an HBONE DATA
        frame, a TLS record and a send each) was 28% of the waypoint's samples under
        h2load -m10 (issue 14)."""
        batch = self._batch
        if batch is not None:
            await asyncio.shield(batch)  # its error, if any, is ours too
            return
        batch = self._batch = asyncio.get_running_loop().create_future()
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._batch = None
            batch.set_result(None)
            self._spawn_flush()  # the frames queued so far still go out
            raise
        self._batch = None
        try:
            await self._write_queued()
        except Exception as exc:
            batch.set_exception(exc)
            batch.exception()  # retrieved: nobody else may be waiting
            raise
        except BaseException:
            batch.set_result(None)
            raise
        batch.set_result(None)

    async def _write_queued(self) -> None:
        async with self._lock:
            data = self.conn.data_to_send()
            if data:
                await self.io.write(data)

    async def send_headers(self, stream_id: int, headers: Headers, *,
                           end_stream: bool = False) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        await self.flush()

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """All of ``data``, waiting for window as needed."""
        view = memoryview(data)
        while view:
            self._check(stream_id)
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            chunk = view[:window]
            view = view[window:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=end_stream and not view)
            await self.flush()
        if end_stream and not data:
            self.conn.end_stream(stream_id)
            await self.flush()

    def queue_response(self, stream_id: int, headers: Headers, body: bytes,
                       trailers: Headers) -> bool:
        """Queue a whole message (headers, body, trailers) for the next :meth:`flush` when
        the flow-control window takes the body at once; False (nothing queued) when not."""
        self._check(stream_id)
        if body and len(body) > min(self.conn.local_flow_control_window(stream_id),
                                    self.conn.max_outbound_frame_size):
            return False
        self.conn.send_headers(stream_id, headers, end_stream=not body and not trailers)
        if body:
            self.conn.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        return True

    async def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        self._check(stream_id)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)
        await self.flush()

    def reset_stream(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.reset_stream(stream_id, code)
        state = self.streams.pop(stream_id, None)
        if state is not None:
            state._fail(code)
        self._spawn_flush()

    async def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.acknowledge_received_data(size, stream_id)
            # Unbatched: h2 queues a WINDOW_UPDATE only now and then, mostly nothing to write.
            await self._write_queued()

    def _check(self, stream_id: int) -> None:
        if self.closed:
            raise StreamGone(f"HTTP/2 connection closed ({self.error or 'peer went away'})")
        state = self.streams.get(stream_id)
        if state is not None and state.reset_code is not None:
            raise StreamGone(f"stream {stream_id} was reset", state.reset_code)

    def _spawn_flush(self) -> None:
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._quiet_flush())
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _quiet_flush(self) -> None:
        with contextlib.suppress(Exception):
            await self._write_queued()

    async def flush_final(self) -> None:
        final = self.conn.data_to_send()
        if final:
            with contextlib.suppress(Exception):
                await self.io.write(final)

    # -- client side --------------------------------------------------------------------------
    def open_stream(self) -> H2Stream:
        stream_id = self.conn.get_next_available_stream_id()
        state = self.streams[stream_id] = H2Stream(self, stream_id)
        return state

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    @property
    def capacity(self) -> int:
        limit = self.conn.remote_settings.max_concurrent_streams
        return min(limit, MAX_CONCURRENT_STREAMS) - len(self.streams)

    # -- receiving ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Read until the peer or the byte stream ends; then fail every open stream."""
        try:
            while not self.closed:
                data = await self.io.read()
                if not data:
                    break
                events = self._receive(data)
                self._dispatch(events)
                await self.flush()
        except (OSError, StreamGone) as exc:
            self.error = str(exc)
        except Exception as exc:  # a stream reset of the tunnel surfaces as NodeproxyError
            self.error = str(exc)
        finally:
            self.closed = True
            for state in list(self.streams.values()):
                state._fail(ErrorCodes.CONNECT_ERROR)
            self.streams.clear()
            self._window.set()
            # A GOAWAY h2 queued (protocol error, flood) goes out before the tunnel ends.
            await self.flush_final()

    def _receive(self, data: bytes) -> list[h2.events.Event]:
        try:
            return self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.error = f"HTTP/2 protocol error: {exc}"
            self.closed = True  # run() sends the GOAWAY h2 queued, then ends
            return []

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        state: H2Stream | None
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                new = self.streams[event.stream_id] = H2Stream(self, event.stream_id)
                new.headers = list(event.headers)  # type: ignore[arg-type]
                new.headers_ready.set_result(new.headers)
                if event.stream_ended is not None:
                    new.ended = True
                if self.on_request is not None:
                    task = asyncio.get_running_loop().create_task(self.on_request(new))
                    self.handlers.add(task)
                    self.handler_of[event.stream_id] = task
                    task.add_done_callback(self.handlers.discard)
                    task.add_done_callback(self._handler_done(event.stream_id))
            elif isinstance(event, h2.events.ResponseReceived):
                state = self.streams.get(event.stream_id)
                if state is not None and not state.headers_ready.done():
                    state.headers = list(event.headers)  # type: ignore[arg-type]
                    state.headers_ready.set_result(state.headers)
                    if event.stream_ended is not None:
                        state.ended = True
                        state._wake()
            elif isinstance(event, h2.events.InformationalResponseReceived):
                continue  # 1xx: not forwarded
            elif isinstance(event, h2.events.DataReceived):
                state = self.streams.get(event.stream_id)
                if state is None:
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                    continue
                # Padding is acknowledged at once; the data when the consumer takes it.
                padding = event.flow_controlled_length - len(event.data)
                if padding:
                    self.conn.acknowledge_received_data(padding, event.stream_id)
                if event.data:
                    state._data.append(event.data)
                if event.stream_ended is not None:
                    state.ended = True
                state._wake()
            elif isinstance(event, h2.events.TrailersReceived):
                state = self.streams.get(event.stream_id)
                if state is not None:
                    state.trailers = list(event.headers)  # type: ignore[arg-type]
                    state.ended = True
                    state._wake()
            elif isinstance(event, h2.events.StreamEnded):
                state = self.streams.get(event.stream_id)
                if state is not None:
                    state.ended = True
                    state._wake()
            elif isinstance(event, h2.events.StreamReset):
                assert event.stream_id is not None
                state = self.streams.pop(event.stream_id, None)
                if state is not None:
                    state._fail(event.error_code or ErrorCodes.CANCEL)
                handler = self.handler_of.pop(event.stream_id, None)
                if handler is not None:
                    handler.cancel()
                    # A reset before we answered costs us a request's work for free (rapid
                    # reset, CVE-2023-44487): past the limit, the connection ends.
                    if self._premature.hit(asyncio.get_running_loop().time()):
                        self._calm("rapid reset: too many streams reset before their answer")
                        return  # the client gave up: stop its work (and its upstream)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._window.set()
                if self._control.hit(asyncio.get_running_loop().time()):
                    self._calm("control frame flood")
                    return
            elif isinstance(event, h2.events.PingReceived | h2.events.PriorityUpdated):
                if self._control.hit(asyncio.get_running_loop().time()):
                    self._calm("control frame flood")
                    return
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
                if event.last_stream_id is not None:
                    for sid, state in list(self.streams.items()):
                        if sid > event.last_stream_id:
                            self.streams.pop(sid)
                            state._fail(ErrorCodes.REFUSED_STREAM)

    def _calm(self, reason: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and stop (as the HBONE layer answers the same floods)."""
        self.error = reason
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"calm")
        self.closed = True  # run() sends the GOAWAY, then ends
        for task in list(self.handlers):
            task.cancel()

    def _handler_done(self, stream_id: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self.handler_of.pop(stream_id, None)

        return done

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    async def aclose(self) -> None:
        self.closed = True
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
