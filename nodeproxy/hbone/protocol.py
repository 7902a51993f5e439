"""Sans-I/O HBONE (HTTP/2 CONNECT) connection over the ``h2`` package.

Bytes in -> events out (:meth:`HboneConnection.receive_data`), commands in -> bytes out
(:meth:`HboneConnection.data_to_send`). No asyncio, sockets or ssl in here.

Fast path (see docs/hbone.md). h2 4.4.1 is correct but slow for bulk DATA: a pure-h2 tunnel
topped out at ~1.5 Gbit/s with the receiver at 99% CPU, a quarter of it in an eager
``repr()`` of every received frame (issue 3). So this layer frames the byte stream itself:

* receive: it parses the 9-byte frame headers; DATA frames on streams h2 has open (OPEN or
  HALF_CLOSED_LOCAL, unpadded) are consumed here: the frame's length is charged to h2's own
  inbound window managers (connection and stream, same objects h2 uses), and the payload is
  handed out *as it arrives*, without waiting for the whole (up to 1 MiB) frame and without
  hyperframe objects. END_STREAM on such a frame is replayed to h2 as an empty DATA frame
  with END_STREAM so h2's stream state machine stays authoritative. Every other frame
  (HEADERS, CONTINUATION, SETTINGS, WINDOW_UPDATE, RST_STREAM, PING, PRIORITY, padded DATA,
  DATA on unknown/closed streams...) is fed to h2 unchanged, in order, so h2 keeps raising
  the right stream/connection errors. GOAWAY is interpreted here (h2 refuses every frame
  after a GOAWAY, which would kill in-flight streams; ztunnel drains them gracefully).
* send: DATA frames are built here (9-byte header + payload slices, joined once in
  :meth:`data_to_send`), bounded by h2's outbound windows and max frame size, which are
  decremented exactly as ``H2Connection.send_data`` does.

Measured by tests/bench/hbone_micro.py (512 MiB, one stream, both ends in one process):
framing only (in memory) pure h2 2.2 Gbit/s vs fast path 28 Gbit/s (13x); end to end over
TLS 1.3 loopback with the asyncio glue 1.28 -> 2.18 Gbit/s (asyncio), 1.20 -> 2.22 (uvloop),
where TLS now dominates the profile. Details in docs/hbone.md.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.windows
from h2.errors import ErrorCodes
from h2.events import Event as H2Event
from h2.events import RequestReceived
from h2.stream import StreamState

from nodeproxy.errors import ProxyError
from nodeproxy.hbone import events as ev
from nodeproxy.hbone import settings as cfg
from nodeproxy.hbone.flood import FloodLimits, WindowCounter
from ztunnel_cfg.hostport import parse_host_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA = 0x0
_HEADERS = 0x1
_PRIORITY = 0x2
_SETTINGS = 0x4
_PING = 0x6
_PUSH_PROMISE = 0x5
_GOAWAY = 0x7
_CONTINUATION = 0x9
_FLAG_END_STREAM = 0x1
_FLAG_ACK = 0x1
_FLAG_END_HEADERS = 0x4
_FLAG_PADDED = 0x8

_HDR = struct.Struct(">I")  # length(24) | type(8) packed as one word, then flags, stream id
_RECV_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_SEND_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class HboneProtocolError(ProxyError):
    """A command that the HTTP/2 state does not allow (programming error or a race the
    caller must handle, e.g. writing to a stream the peer reset)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, status=503, flags="CONNECT", hint=hint)


class StreamLimitError(HboneProtocolError):
    """No stream can be opened: the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached or
    the connection is going away. Open another connection."""


def parse_authority(authority: str) -> tuple[str, int]:
    """Split ``ip:port`` / ``[v6]:port``; raise ValueError (:class:`HostPortError`) with the
    reason, which the server answers with 400."""
    return parse_host_port(authority, "authority")


class _H2Connection(h2.connection.H2Connection):
    # h2 remembers up to 2**16 closed stream ids per connection to classify late frames; a
    # pooled HBONE connection cycles through far more streams than that, so a busy one kept
    # megabytes of them. Late frames in flight concern the last few streams only.
    MAX_CLOSED_STREAMS = 1024


def _data_header(length: int, flags: int, stream_id: int) -> bytes:
    return _HDR.pack((length << 8) | _DATA) + bytes((flags,)) + _HDR.pack(stream_id)


class HboneConnection:
    """One HBONE HTTP/2 connection (client or server side), sans-I/O."""

    def __init__(self, client_side: bool, clock: Callable[[], float], *,
                 fast_path: bool = True, flood_limits: FloodLimits | None = None) -> None:
        # fast_path=False routes every frame through h2 (reference behaviour for tests and
        # tests/bench/hbone_micro.py); production always uses the fast path.
        self.fast_path = fast_path
        self.client_side = client_side
        self._clock = clock
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        conn = _H2Connection(config=config)
        max_streams = (
            cfg.CLIENT_MAX_CONCURRENT_STREAMS if client_side else cfg.SERVER_MAX_CONCURRENT_STREAMS
        )
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                codes.INITIAL_WINDOW_SIZE: cfg.STREAM_WINDOW,
                codes.MAX_FRAME_SIZE: cfg.MAX_FRAME_SIZE,
                codes.MAX_CONCURRENT_STREAMS: max_streams,
                codes.ENABLE_PUSH: cfg.ENABLE_PUSH,
                codes.MAX_HEADER_LIST_SIZE: cfg.MAX_HEADER_LIST_SIZE,
            },
        )
        conn.max_inbound_frame_size = cfg.MAX_FRAME_SIZE
        conn.initiate_connection()
        # The connection window starts at 65535 whatever SETTINGS say; raise it.
        conn.increment_flow_control_window(cfg.CONNECTION_WINDOW - 65535)
        self._h2 = conn
        self._conn_window = conn._inbound_flow_control_window_manager
        self._out: list[bytes | memoryview] = []
        self._h2_in = bytearray()  # complete non-fast-path frames queued for h2
        self._partial = bytearray()  # incomplete header or frame carried to the next call
        self._partial_need = 0
        self._preface_left = 0 if client_side else len(PREFACE)
        self._in_header_block = False
        # current fast-path DATA frame
        self._data_left = 0
        self._data_sid = 0
        self._data_stream: object | None = None
        self._data_end = False
        # StreamData coalescing inside one receive_data call
        self._acc_sid = 0
        self._acc: list[memoryview] = []
        self._events: list[ev.Event] = []
        self._padding_owed: dict[int, int] = {}
        self._live: set[int] = set()
        self._maybe_closed = False
        self._requests: dict[int, bool] = {}
        # lifecycle
        self.dead = False
        self.settings_received = False  # the peer's first SETTINGS arrived (limits known)
        self.goaway_received: ev.GoAway | None = None
        self.goaway_sent_last_id: int | None = None
        self._received_since_tick = True
        self._last_activity = clock()
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        # abuse accounting (see flood.py): requests not yet answered, and the two counters
        limits = flood_limits or FloodLimits()
        self.flood_limits = limits
        self._unanswered: set[int] = set()
        self._premature_resets = WindowCounter(limits.max_premature_resets, limits.window)
        self._control_frames = WindowCounter(limits.max_control_frames, limits.window)

    # ------------------------------------------------------------------ queries

    @property
    def h2(self) -> h2.connection.H2Connection:
        """The wrapped h2 connection (read-only use: settings, windows, stream states)."""
        return self._h2

    def streams_available(self) -> int:
        """How many more streams this side may open now (0 while going away)."""
        if self.dead or self.goaway_received is not None or self.goaway_sent_last_id is not None:
            return 0
        limit = self._h2.remote_settings.max_concurrent_streams
        return max(0, limit - self._h2.open_outbound_streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept now on this stream (0 if not writable)."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _SEND_STATES:
            return 0
        return max(0, min(self._h2.outbound_flow_control_window,
                          stream.outbound_flow_control_window))

    def open_streams(self) -> int:
        return len(self._live)

    # ----------------------------------------------------------------- commands

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: send ``CONNECT authority`` with extra headers; return the stream id."""
        if not self.client_side:
            raise HboneProtocolError("only the client side opens HBONE streams")
        if self.streams_available() <= 0:
            raise StreamLimitError(
                f"cannot open a stream: {self._h2.open_outbound_streams} open, peer allows "
                f"{self._h2.remote_settings.max_concurrent_streams}"
                + (", connection is going away" if self.goaway_received else ""),
                hint="open another HBONE connection (the pool does this)",
            )
        parse_authority(authority)
        sid = self._h2.get_next_available_stream_id()
        hdrs = [(":method", "CONNECT"), (":authority", authority), *headers]
        try:
            self._h2.send_headers(sid, hdrs)
        except h2.exceptions.ProtocolError as exc:
            raise HboneProtocolError(f"cannot send CONNECT: {exc}") from exc
        self._live.add(sid)
        return sid

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: answer a ConnectRequest. Non-200 also ends the stream."""
        end = status != 200
        self._unanswered.discard(stream_id)
        try:
            self._h2.send_headers(stream_id, [(":status", str(status)), *headers], end_stream=end)
            if end:
                self._close_refused(stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise HboneProtocolError(f"cannot respond on stream {stream_id}: {exc}") from exc
        self._maybe_closed = True

    def _close_refused(self, stream_id: int) -> None:
        """After a complete refusal, RST_STREAM NO_ERROR (RFC 9113 §8.1) closes our receive
        side too: a client that never ends refused streams would otherwise keep them counted
        against SETTINGS_MAX_CONCURRENT_STREAMS."""
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview,
                  end_stream: bool = False) -> int:
        """Queue DATA frames; return how many bytes the windows accepted (the caller keeps
        the rest and retries after WindowOpened). ``data`` must not be mutated before the
        next :meth:`data_to_send`. END_STREAM is sent only if everything was accepted."""
        conn = self._h2
        stream = conn.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _SEND_STATES:
            raise HboneProtocolError(f"stream {stream_id} is not open for sending")
        size = len(data)
        window = min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)
        n = size if size <= window else max(window, 0)
        if n:
            self._flush_h2_out()
            mv = memoryview(data)
            max_frame = conn.max_outbound_frame_size
            out = self._out
            off = 0
            if not self.fast_path:
                while off < n:
                    k = min(max_frame, n - off)
                    conn.send_data(stream_id, mv[off:off + k])
                    off += k
            else:
                while off < n:
                    k = min(max_frame, n - off)
                    out.append(_data_header(k, 0, stream_id))
                    out.append(mv[off:off + k])
                    off += k
                # Same bookkeeping as H2Connection.send_data / H2Stream.send_data.
                conn.outbound_flow_control_window -= n
                stream.outbound_flow_control_window -= n
        if end_stream and n == size:
            self.end_stream(stream_id)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (empty DATA with END_STREAM)."""
        try:
            self._flush_h2_out()
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise HboneProtocolError(f"cannot end stream {stream_id}: {exc}") from exc
        self._maybe_closed = True

    def reset_stream(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM; a no-op if the stream is already closed."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        self._flush_h2_out()
        self._h2.reset_stream(stream_id, code)
        self._maybe_closed = True

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The consumer processed ``nbytes`` of StreamData: hand window back to the peer."""
        if nbytes > 0 and not self.dead:
            self._h2.acknowledge_received_data(nbytes, stream_id)

    def ping(self) -> None:
        """Send a keepalive PING (its ACK is awaited by :meth:`tick`)."""
        if self.dead:
            return
        self._ping_payload = os.urandom(8)
        self._ping_sent_at = self._clock()
        self._h2.ping(self._ping_payload)

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """NO_ERROR: graceful (no new streams, in-flight ones finish). Else: fatal."""
        if self.dead:
            return
        if code != ErrorCodes.NO_ERROR:
            self._h2.close_connection(error_code=code)
            self.dead = True
            return
        if self.goaway_sent_last_id is not None:
            return
        last = self._h2.highest_inbound_stream_id
        self.goaway_sent_last_id = last
        # Built here: h2's close_connection would refuse every later frame of in-flight streams.
        self._flush_h2_out()
        payload = struct.pack(">II", last, ErrorCodes.NO_ERROR)
        self._out.append(struct.pack(">I", (8 << 8) | _GOAWAY) + b"\x00" + b"\x00\x00\x00\x00")
        self._out.append(payload)

    def tick(self, now: float) -> list[ev.Event]:
        """Keepalive: PING after KEEPALIVE_INTERVAL of silence; error after KEEPALIVE_TIMEOUT."""
        if self.dead:
            return self._take_events()
        if self._received_since_tick:
            self._received_since_tick = False
            self._last_activity = now
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= cfg.KEEPALIVE_TIMEOUT:
                self._fail(
                    f"keepalive PING not acknowledged within {cfg.KEEPALIVE_TIMEOUT:.0f}s",
                    ErrorCodes.NO_ERROR, kind="keepalive",
                )
        elif now - self._last_activity >= cfg.KEEPALIVE_INTERVAL:
            self.ping()
            self._ping_sent_at = now
        return self._take_events()

    def pending_events(self) -> list[ev.Event]:
        """Events produced by commands (StreamClosed after a local half-close, ...)."""
        self._check_closed()
        return self._take_events()

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, in order."""
        self._flush_h2_out()
        out = self._out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else bytes(out[0])
        out.clear()
        return data

    # ------------------------------------------------------------------ receive

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Feed bytes from the transport; return the events they caused. Never raises for
        peer misbehaviour: a ConnectionError event is returned and GOAWAY queued. ``data`` is
        not retained (it may be the glue's reused receive buffer)."""
        if self.dead:
            return self._take_events()
        self._received_since_tick = True
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        pos = 0
        try:
            if self._preface_left:
                pos = self._take_preface(mv)
            while pos < n and not self.dead:
                if self._data_left:
                    take = min(self._data_left, n - pos)
                    self._deliver(mv[pos:pos + take])
                    pos += take
                    self._data_left -= take
                    if not self._data_left:
                        self._finish_data_frame()
                    continue
                if self._partial_need:
                    pos = self._fill_partial(mv, pos)
                    continue
                if n - pos < 9:
                    self._partial[:] = mv[pos:]
                    self._partial_need = 9
                    break
                pos = self._on_header(mv, pos)
            self._flush_acc()
            self._feed_h2()
        except h2.exceptions.ProtocolError as exc:
            self._flush_acc()
            self._fail(f"HTTP/2 protocol error from peer: {exc}", exc.error_code)
        if self._maybe_closed:
            self._check_closed()
        return self._take_events()

    def _take_preface(self, mv: memoryview) -> int:
        take = min(self._preface_left, len(mv))
        start = len(PREFACE) - self._preface_left
        if bytes(mv[:take]) != PREFACE[start:start + take]:
            self._fail("peer did not send the HTTP/2 client preface (not an HBONE client?)",
                       ErrorCodes.PROTOCOL_ERROR)
            return len(mv)
        self._preface_left -= take
        if not self._preface_left:
            self._h2_in += PREFACE  # h2's frame buffer expects to strip it itself
        return take

    def _fill_partial(self, mv: memoryview, pos: int) -> int:
        part = self._partial
        take = min(self._partial_need - len(part), len(mv) - pos)
        part += mv[pos:pos + take]
        pos += take
        if len(part) < self._partial_need:
            return pos
        if self._partial_need == 9:
            hdr = bytes(part)
            part.clear()
            self._partial_need = 0
            length = self._classify(memoryview(hdr), 0)
            if length >= 0:  # needs the whole frame
                if length == 0:
                    self._whole_frame(hdr)
                else:
                    part += hdr
                    self._partial_need = 9 + length
            return pos
        frame = bytes(part)
        part.clear()
        self._partial_need = 0
        self._whole_frame(frame)
        return pos

    def _on_header(self, mv: memoryview, pos: int) -> int:
        length = self._classify(mv, pos)
        if length < 0:  # fast-path DATA (or error): header consumed
            return pos + 9
        total = 9 + length
        if len(mv) - pos >= total:
            self._whole_frame(mv[pos:pos + total])
            return pos + total
        self._partial[:] = mv[pos:]
        self._partial_need = total
        return len(mv)

    def _classify(self, mv: memoryview, pos: int) -> int:
        """Decide what to do with the frame whose header is at ``pos``. Returns the payload
        length if the whole frame must be collected, or -1 if the header was consumed (fast
        DATA started, or a connection error)."""
        word: int = _HDR.unpack_from(mv, pos)[0]
        length = word >> 8
        ftype = word & 0xFF
        flags = mv[pos + 4]
        sid: int = _HDR.unpack_from(mv, pos + 5)[0] & 0x7FFFFFFF
        if length > self._h2.max_inbound_frame_size:
            self._fail(f"frame of {length} bytes exceeds our max frame size "
                       f"{self._h2.max_inbound_frame_size}", ErrorCodes.FRAME_SIZE_ERROR)
            return -1
        if self._costs_work(ftype, flags, length) and self._control_frames.hit(self._clock()):
            limits = self.flood_limits
            self._fail(f"peer sent more than {limits.max_control_frames} control frames "
                       f"(PING/SETTINGS/PRIORITY/empty DATA) within {limits.window:g}s",
                       ErrorCodes.ENHANCE_YOUR_CALM, kind="control_flood")
            return -1
        if (ftype == _DATA and sid and self.fast_path and not self._in_header_block
                and not flags & _FLAG_PADDED):
            self._feed_h2()  # h2 must know about streams opened by earlier frames
            if self.dead:
                return -1
            stream = self._h2.streams.get(sid)
            if stream is not None and stream.state_machine.state in _RECV_STATES:
                try:
                    self._conn_window.window_consumed(length)
                    stream._inbound_window_manager.window_consumed(length)
                except h2.exceptions.FlowControlError as exc:
                    self._fail(f"peer overran the flow-control window: {exc}",
                               ErrorCodes.FLOW_CONTROL_ERROR)
                    return -1
                self._data_sid = sid
                self._data_stream = stream
                self._data_end = bool(flags & _FLAG_END_STREAM)
                self._data_left = length
                if not length:
                    self._finish_data_frame()
                return -1
        elif ftype in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            self._in_header_block = not flags & _FLAG_END_HEADERS
        return length

    @staticmethod
    def _costs_work(ftype: int, flags: int, length: int) -> bool:
        """Frames that make us answer or work while carrying no payload (flood classes)."""
        if ftype in (_PING, _SETTINGS):
            return not flags & _FLAG_ACK
        if ftype == _PRIORITY:
            return True
        return ftype == _DATA and length == 0 and not flags & _FLAG_END_STREAM

    def _whole_frame(self, frame: bytes | memoryview) -> None:
        if frame[3] == _GOAWAY and not self._in_header_block:
            self._feed_h2()
            self._on_goaway(bytes(frame))
        else:
            self._h2_in += frame

    def _deliver(self, chunk: memoryview) -> None:
        stream = self._data_stream
        if stream is None or stream.state_machine.state not in _RECV_STATES:  # type: ignore[attr-defined]
            # Reset locally mid-frame: drop the bytes but return their connection window.
            self._h2.acknowledge_received_data(len(chunk), self._data_sid)
            return
        if self._acc and self._acc_sid != self._data_sid:
            self._flush_acc()
        self._acc_sid = self._data_sid
        self._acc.append(chunk)

    def _finish_data_frame(self) -> None:
        if self._data_end:
            self._flush_acc()
            # Let h2 see END_STREAM (state machine); zero length, so no window accounting.
            self._h2_in += _data_header(0, _FLAG_END_STREAM, self._data_sid)
            self._feed_h2()
        self._data_stream = None

    def _flush_acc(self) -> None:
        if self._acc:
            parts = self._acc
            data = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
            self._events.append(ev.StreamData(self._acc_sid, data))
            parts.clear()

    def _feed_h2(self) -> None:
        if not self._h2_in:
            return
        if self.dead:
            self._h2_in.clear()
            return
        self._flush_acc()
        frames = bytes(self._h2_in)
        self._h2_in.clear()
        for event in self._h2.receive_data(frames):
            self._translate(event)

    def _translate(self, e: H2Event) -> None:
        out = self._events
        if isinstance(e, h2.events.DataReceived):
            if e.data:
                out.append(ev.StreamData(e.stream_id, bytes(e.data)))
            pad = (e.flow_controlled_length or 0) - len(e.data or b"")
            if pad > 0:  # padding is never seen by the consumer: return its window now
                self._h2.acknowledge_received_data(pad, e.stream_id)
        elif isinstance(e, h2.events.RequestReceived):
            self._on_request(e)
        elif isinstance(e, h2.events.ResponseReceived):
            headers = tuple((str(k), str(v)) for k, v in e.headers or ())
            status = int(dict(headers).get(":status", "0"))
            out.append(ev.ConnectResponse(e.stream_id, status, headers))
        elif isinstance(e, h2.events.StreamEnded):
            out.append(ev.StreamEnded(e.stream_id))
            self._maybe_closed = True
        elif isinstance(e, h2.events.StreamReset):
            out.append(ev.StreamReset(e.stream_id, int(e.error_code or 0), e.remote_reset))
            self._maybe_closed = True
            if e.remote_reset and e.stream_id in self._unanswered:
                self._unanswered.discard(e.stream_id)
                self._on_premature_reset()
        elif isinstance(e, h2.events.WindowUpdated):
            out.append(ev.WindowOpened(e.stream_id or None))
        elif isinstance(e, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                out.append(ev.WindowOpened(None))
        elif isinstance(e, h2.events.PingAckReceived):
            if e.ping_data == self._ping_payload:
                self._ping_sent_at = None
        elif isinstance(e, h2.events.ConnectionTerminated):  # pragma: no cover - intercepted
            out.append(ev.GoAway(e.last_stream_id or 0, int(e.error_code or 0)))
        elif isinstance(e, h2.events.TrailersReceived):
            pass  # CONNECT tunnels carry no trailers; END_STREAM arrives as StreamEnded

    def _on_request(self, e: RequestReceived) -> None:
        sid = e.stream_id
        headers = tuple((str(k), str(v)) for k, v in e.headers or ())
        if self.goaway_sent_last_id is not None and sid > self.goaway_sent_last_id:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        self._live.add(sid)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        reason = None
        if pseudo.get(":method") != "CONNECT":
            reason = f"method {pseudo.get(':method')!r} is not CONNECT"
        elif not pseudo.get(":authority"):
            reason = "CONNECT without :authority"
        elif e.stream_ended is not None:
            reason = "CONNECT request ended the stream"
        else:
            try:
                host, port = parse_authority(pseudo[":authority"])
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self._h2.send_headers(sid, [(":status", "400")], end_stream=True)
            self._close_refused(sid)
            self._maybe_closed = True
            self._events.append(ev.BadRequest(sid, reason, headers))
            return
        extra = tuple((k, v) for k, v in headers if not k.startswith(":"))
        self._unanswered.add(sid)
        self._events.append(ev.ConnectRequest(sid, pseudo[":authority"], extra, host, port))

    def _on_goaway(self, frame: bytes) -> None:
        sid = _HDR.unpack_from(frame, 5)[0] & 0x7FFFFFFF
        if sid != 0 or len(frame) < 17:
            self._fail("malformed GOAWAY frame", ErrorCodes.PROTOCOL_ERROR)
            return
        last, code = struct.unpack_from(">II", frame, 9)
        last &= 0x7FFFFFFF
        event = ev.GoAway(last, code)
        self.goaway_received = event
        self._events.append(event)
        # Our streams above last_stream_id were never processed by the peer.
        for stream_id in sorted(self._live):
            if stream_id > last and (stream_id % 2 == 1) == self.client_side:
                self._live.discard(stream_id)
                self._events.append(ev.StreamReset(stream_id, ErrorCodes.REFUSED_STREAM, True))
                self._events.append(ev.StreamClosed(stream_id))

    # ------------------------------------------------------------------ helpers

    def _on_premature_reset(self) -> None:
        if self._premature_resets.hit(self._clock()):
            limits = self.flood_limits
            self._fail(f"peer reset more than {limits.max_premature_resets} streams before "
                       f"they were answered within {limits.window:g}s (HTTP/2 rapid reset)",
                       ErrorCodes.ENHANCE_YOUR_CALM, kind="reset_flood")

    def _fail(self, reason: str, code: int, *, kind: str = "protocol") -> None:
        if self.dead:
            return
        self.dead = True
        self._data_left = 0
        self._partial_need = 0
        self._unanswered.clear()
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed by h2
            self._h2.close_connection(error_code=code)
        self._events.append(ev.ConnectionError(reason, int(code), kind))

    def _flush_h2_out(self) -> None:
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)

    def _check_closed(self) -> None:
        self._maybe_closed = False
        streams = self._h2.streams
        closed = [s for s in self._live if s not in streams or streams[s].closed]
        for sid in closed:
            self._live.discard(sid)
            self._unanswered.discard(sid)
            self._events.append(ev.StreamClosed(sid))
        if closed:
            # h2 drops closed streams from its table only when it counts open ones; without
            # this an idle pooled connection kept every stream it ever carried (~1 KB each).
            _ = self._h2.open_inbound_streams

    def _take_events(self) -> list[ev.Event]:
        events = self._events
        self._events = []
        return events
