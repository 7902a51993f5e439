"""Sans-I/O HBONE connection: our own codec for the HTTP/2 subset HBONE uses (RFC 9113).

Bytes in -> events out (:meth:`HboneConnection.receive_data`), commands in -> bytes out
(:meth:`HboneConnection.data_to_send`). No asyncio, sockets or ssl in here, and no HTTP/2
library: frames, stream states and flow control are ours; header blocks go through the
``hpack`` package (:mod:`nodeproxy.hbone.headers`). h2 is only a test peer.

Subset: HEADERS/CONTINUATION (CONNECT requests, responses, END_STREAM trailers), DATA,
WINDOW_UPDATE, SETTINGS(+ACK), PING(+ACK), RST_STREAM, GOAWAY. PRIORITY and unknown frame
types are ignored (RFC 9113 §5.5); PUSH_PROMISE is a PROTOCOL_ERROR (we advertise
ENABLE_PUSH 0; a server never receives it).

Stream states (§5.1) are two flags per stream: ``send_open`` (we may send DATA) and
``recv_open`` (the peer may): open = both, half-closed(local) = recv only,
half-closed(remote) = send only; a stream with neither, or reset, leaves the table for a
bounded map of recently closed ids (how late frames are classified).

Fast receive path (docs/hbone.md): the 9-byte frame headers are parsed here; an unpadded
DATA frame on a stream open for receiving is charged to the windows when its header
arrives and its payload is handed out *as it arrives* (not after the whole, up to 1 MiB,
frame); pieces of one stream within one read are joined once. ``fast_path=False`` collects
every DATA frame whole first (the reference behaviour the tests compare against).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

from nodeproxy.errors import ProxyError
from nodeproxy.hbone import events as ev
from nodeproxy.hbone import frames as fr
from nodeproxy.hbone import headers as hd
from nodeproxy.hbone import settings as cfg
from nodeproxy.hbone.flood import FloodLimits, WindowCounter
from nodeproxy.hbone.frames import PREFACE, ErrorCodes
from ztunnel_cfg.hostport import parse_host_port

__all__ = [
    "PREFACE",
    "ErrorCodes",
    "HboneConnection",
    "HboneProtocolError",
    "PeerSettings",
    "StreamLimitError",
    "parse_authority",
]

_FRAME = fr.FRAME_HEADER
_DATA = fr.DATA
_SETTINGS = fr.SETTINGS
_CONTINUATION = fr.CONTINUATION
_END_STREAM = fr.FLAG_END_STREAM
_PADDED = fr.FLAG_PADDED

#: Recently closed stream ids remembered to classify late frames (RST_STREAM we sent vs
#: stream that ended). Late frames in flight concern the last few streams only; a pooled
#: connection cycles through far more, so the map is bounded.
MAX_CLOSED_STREAMS = 1024
#: CONTINUATION frames allowed after one HEADERS (CONTINUATION flood, CVE-2024-27316 class).
#: A 64 KiB header list needs at most 4 frames at the smallest frame size (16 KiB).
MAX_CONTINUATIONS = 16
#: Send WINDOW_UPDATE once the consumer freed this fraction of a window.
_UPDATE_DIVISOR = 4


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


class PeerSettings:
    """The peer's SETTINGS in force (RFC 9113 §6.5.2 defaults until its SETTINGS arrive)."""

    __slots__ = ("enable_push", "header_table_size", "initial_window_size",
                 "max_concurrent_streams", "max_frame_size", "max_header_list_size")

    def __init__(self) -> None:
        self.header_table_size = 4096
        self.enable_push = 1
        self.max_concurrent_streams = fr.MAX_WINDOW  # "unlimited"
        self.initial_window_size = fr.DEFAULT_WINDOW
        self.max_frame_size = fr.DEFAULT_MAX_FRAME_SIZE
        self.max_header_list_size: int | None = None


class _Stream:
    """Per-stream state. ``outstanding``: bytes handed out as StreamData and not yet
    acknowledged by the consumer; ``recv_pending``: acknowledged, not yet advertised."""

    __slots__ = ("closed", "outstanding", "recv_open", "recv_pending", "recv_window",
                 "responded", "send_open", "send_window", "sid")

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.send_open = True
        self.recv_open = True
        self.send_window = send_window
        self.recv_window = cfg.STREAM_WINDOW
        self.recv_pending = 0
        self.outstanding = 0
        self.responded = False  # server: we answered; client: the final response arrived
        self.closed = False


class _Closed:
    __slots__ = ("outstanding", "reset_by_us")

    def __init__(self, reset_by_us: bool, outstanding: int) -> None:
        self.reset_by_us = reset_by_us
        self.outstanding = outstanding


class _ConnError(Exception):
    """Internal: a connection error found while handling one frame."""

    def __init__(self, reason: str, code: int, kind: str = "protocol") -> None:
        super().__init__(reason)
        self.code = code
        self.kind = kind


class HboneConnection:
    """One HBONE HTTP/2 connection (client or server side), sans-I/O."""

    def __init__(self, client_side: bool, clock: Callable[[], float], *,
                 fast_path: bool = True, flood_limits: FloodLimits | None = None) -> None:
        self.fast_path = fast_path
        self.client_side = client_side
        self._clock = clock
        self.remote_settings = PeerSettings()
        self._decoder = Decoder(max_header_list_size=cfg.MAX_HEADER_LIST_SIZE)
        self._table_update_due = False
        self._streams: dict[int, _Stream] = {}
        self._closed: dict[int, _Closed] = {}
        self._next_outbound = 1 if client_side else 2
        self._highest_inbound = 0
        self._outbound_open = 0
        self._inbound_open = 0
        # connection windows: what we may send / what the peer may still send us
        self._send_window = fr.DEFAULT_WINDOW
        self._recv_window = cfg.CONNECTION_WINDOW
        self._recv_pending = 0
        self._out: list[bytes | memoryview] = []
        # receive state
        self._partial = bytearray()  # incomplete header or frame carried to the next call
        self._partial_need = 0
        self._preface_left = 0 if client_side else len(PREFACE)
        self._await_settings = True  # the peer's first frame must be SETTINGS
        self._data_left = 0  # payload bytes of the current streamed / dropped DATA frame
        self._data_st: _Stream | None = None  # None: dropping
        self._data_end = False
        self._acc_st: _Stream | None = None  # StreamData coalescing inside one call
        self._acc: list[memoryview] = []
        self._hb_sid = 0  # header block in progress (HEADERS without END_HEADERS)
        self._hb_end_stream = False
        self._hb_parts: list[bytes] = []
        self._hb_size = 0
        self._hb_frames = 0
        self._events: list[ev.Event] = []
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
        # connection preface: [client magic] SETTINGS, then the connection window raised
        # from 65535 (only a WINDOW_UPDATE can do that).
        local = {
            fr.SETTINGS_ENABLE_PUSH: cfg.ENABLE_PUSH,
            fr.SETTINGS_MAX_CONCURRENT_STREAMS: (
                cfg.CLIENT_MAX_CONCURRENT_STREAMS if client_side
                else cfg.SERVER_MAX_CONCURRENT_STREAMS),
            fr.SETTINGS_INITIAL_WINDOW_SIZE: cfg.STREAM_WINDOW,
            fr.SETTINGS_MAX_FRAME_SIZE: cfg.MAX_FRAME_SIZE,
            fr.SETTINGS_MAX_HEADER_LIST_SIZE: cfg.MAX_HEADER_LIST_SIZE,
        }
        if client_side:
            self._out.append(PREFACE)
        self._out.append(fr.settings_frame(local))
        self._out.append(fr.window_update(0, cfg.CONNECTION_WINDOW - fr.DEFAULT_WINDOW))

    # ------------------------------------------------------------------ queries

    def streams_available(self) -> int:
        """How many more streams this side may open now (0 while going away)."""
        if self.dead or self.goaway_received is not None or self.goaway_sent_last_id is not None:
            return 0
        return max(0, self.remote_settings.max_concurrent_streams - self._outbound_open)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept now on this stream (0 if not writable)."""
        st = self._streams.get(stream_id)
        if st is None or not st.send_open or (not self.client_side and not st.responded):
            return 0
        return max(0, min(self._send_window, st.send_window))

    @property
    def outbound_window(self) -> int:
        """Connection-level send window (what the peer lets us send on all streams)."""
        return self._send_window

    def unacknowledged(self, stream_id: int | None = None) -> int:
        """Received bytes the consumer has not acknowledged yet (or dropped): on one stream,
        or on the connection (``None``). Acknowledged bytes are advertised back to the peer
        in batches (a WINDOW_UPDATE per quarter window)."""
        if stream_id is None:
            return cfg.CONNECTION_WINDOW - self._recv_window - self._recv_pending
        st = self._streams.get(stream_id)
        return 0 if st is None else cfg.STREAM_WINDOW - st.recv_window - st.recv_pending

    def stream_state(self, stream_id: int) -> str:
        """RFC 9113 §5.1 name of the stream's state as we see it (tests, debugging)."""
        st = self._streams.get(stream_id)
        if st is not None:
            if st.send_open and st.recv_open:
                return "open"
            return "half-closed (remote)" if st.send_open else "half-closed (local)"
        if stream_id in self._closed or self._is_used(stream_id):
            return "closed"
        return "idle"

    def open_streams(self) -> int:
        return len(self._streams)

    # ----------------------------------------------------------------- commands

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: send ``CONNECT authority`` with extra headers; return the stream id."""
        if not self.client_side:
            raise HboneProtocolError("only the client side opens HBONE streams")
        if self.streams_available() <= 0:
            raise StreamLimitError(
                f"cannot open a stream: {self._outbound_open} open, peer allows "
                f"{self.remote_settings.max_concurrent_streams}"
                + (", connection is going away" if self.goaway_received else ""),
                hint="open another HBONE connection (the pool does this)",
            )
        parse_authority(authority)
        bad = hd.check_outgoing(headers)
        if bad is not None:
            raise HboneProtocolError(f"cannot send CONNECT: {bad}")
        sid = self._next_outbound
        if sid > fr.MAX_WINDOW:
            raise StreamLimitError("stream ids exhausted on this connection",
                                   hint="open another HBONE connection (the pool does this)")
        self._next_outbound += 2
        self._send_headers(sid, hd.connect_block(authority, headers), end_stream=False)
        self._streams[sid] = _Stream(sid, self.remote_settings.initial_window_size)
        self._outbound_open += 1
        return sid

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: answer a ConnectRequest. Non-200 also ends the stream."""
        self._unanswered.discard(stream_id)
        st = self._streams.get(stream_id)
        if self.client_side or st is None or st.responded or not st.send_open:
            raise HboneProtocolError(f"cannot respond on stream {stream_id}: not an unanswered "
                                     "request")
        bad = hd.check_outgoing(headers)
        if bad is not None:
            raise HboneProtocolError(f"cannot respond on stream {stream_id}: {bad}")
        end = status != 200
        st.responded = True
        self._send_headers(stream_id, hd.response_block(status, headers), end_stream=end)
        if end:
            self._refused(st)

    def _refused(self, st: _Stream) -> None:
        """After a complete refusal (END_STREAM sent), RST_STREAM NO_ERROR (RFC 9113 §8.1)
        closes our receive side too: a client that never ends refused streams would
        otherwise keep them counted against SETTINGS_MAX_CONCURRENT_STREAMS."""
        st.send_open = False
        if st.recv_open:
            self._out.append(fr.rst_stream(st.sid, ErrorCodes.NO_ERROR))
            self._close(st, reset_by_us=True)
        else:
            self._close(st, reset_by_us=False)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview,
                  end_stream: bool = False) -> int:
        """Queue DATA frames; return how many bytes the windows accepted (the caller keeps
        the rest and retries after WindowOpened). ``data`` must not be mutated before the
        next :meth:`data_to_send`. END_STREAM is sent only if everything was accepted."""
        st = self._streams.get(stream_id)
        if st is None or not st.send_open or (not self.client_side and not st.responded):
            raise HboneProtocolError(f"stream {stream_id} is not open for sending")
        size = len(data)
        window = min(self._send_window, st.send_window)
        n = size if size <= window else max(window, 0)
        if n:
            mv = memoryview(data)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            max_frame = self.remote_settings.max_frame_size
            out = self._out
            header = fr.data_header
            if n <= max_frame:
                out.append(header(n, 0, stream_id))
                out.append(mv[:n] if n < size else mv)
            else:
                off = 0
                while off < n:
                    k = min(max_frame, n - off)
                    out.append(header(k, 0, stream_id))
                    out.append(mv[off:off + k])
                    off += k
            self._send_window -= n
            st.send_window -= n
        if end_stream and n == size:
            self.end_stream(stream_id)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (empty DATA with END_STREAM)."""
        st = self._streams.get(stream_id)
        if st is None or not st.send_open or (not self.client_side and not st.responded):
            raise HboneProtocolError(f"cannot end stream {stream_id}: not open for sending")
        self._out.append(fr.data_header(0, _END_STREAM, stream_id))
        st.send_open = False
        if not st.recv_open:
            self._close(st, reset_by_us=False)

    def reset_stream(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM; a no-op if the stream is already closed."""
        st = self._streams.get(stream_id)
        if st is None or self.dead:
            return
        self._out.append(fr.rst_stream(stream_id, code))
        self._close(st, reset_by_us=True)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The consumer processed ``nbytes`` of StreamData: hand window back to the peer."""
        if nbytes <= 0 or self.dead:
            return
        st = self._streams.get(stream_id)
        if st is not None:
            n = min(nbytes, st.outstanding)
            st.outstanding -= n
            self._credit_stream(st, n)
        else:
            closed = self._closed.get(stream_id)
            if closed is None:
                return
            n = min(nbytes, closed.outstanding)
            closed.outstanding -= n
        self._credit_connection(n)

    def ping(self) -> None:
        """Send a keepalive PING (its ACK is awaited by :meth:`tick`)."""
        if self.dead:
            return
        self._ping_payload = os.urandom(8)
        self._ping_sent_at = self._clock()
        self._out.append(fr.ping(self._ping_payload))

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """NO_ERROR: graceful (no new streams, in-flight ones finish). Else: fatal."""
        if self.dead:
            return
        if code != ErrorCodes.NO_ERROR:
            self._out.append(fr.goaway(self._highest_inbound, code))
            self.dead = True
            return
        if self.goaway_sent_last_id is not None:
            return
        self.goaway_sent_last_id = self._highest_inbound
        self._out.append(fr.goaway(self._highest_inbound, ErrorCodes.NO_ERROR))

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
        return self._take_events()

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, in order (everything queued, joined once)."""
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
                    if self._data_st is not None:
                        self._deliver(self._data_st, mv[pos:pos + take])
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
        except _ConnError as exc:
            self._fail(str(exc), exc.code, kind=exc.kind)
        self._flush_acc()
        return self._take_events()

    def _take_preface(self, mv: memoryview) -> int:
        take = min(self._preface_left, len(mv))
        start = len(PREFACE) - self._preface_left
        if bytes(mv[:take]) != PREFACE[start:start + take]:
            raise _ConnError("peer did not send the HTTP/2 client preface (not an HBONE "
                             "client?)", ErrorCodes.PROTOCOL_ERROR)
        self._preface_left -= take
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
                    self._on_frame(hdr, 0)
                else:
                    part += hdr
                    self._partial_need = 9 + length
            return pos
        frame = bytes(part)
        part.clear()
        self._partial_need = 0
        self._on_frame(frame, 0)
        return pos

    def _on_header(self, mv: memoryview, pos: int) -> int:
        length = self._classify(mv, pos)
        if length < 0:  # streamed or dropped DATA: header consumed
            return pos + 9
        total = 9 + length
        if len(mv) - pos >= total:
            self._on_frame(mv, pos)
            return pos + total
        self._partial[:] = mv[pos:]
        self._partial_need = total
        return len(mv)

    def _classify(self, mv: memoryview, pos: int) -> int:
        """Check the frame whose header is at ``pos``. Returns the payload length if the
        whole frame must be collected, or -1 if the header was consumed (DATA streamed or
        dropped). Raises _ConnError."""
        word, flags, sid = _FRAME.unpack_from(mv, pos)
        length: int = word >> 8
        ftype = word & 0xFF
        sid &= 0x7FFFFFFF
        if length > cfg.MAX_FRAME_SIZE:
            raise _ConnError(f"frame of {length} bytes exceeds our max frame size "
                             f"{cfg.MAX_FRAME_SIZE}", ErrorCodes.FRAME_SIZE_ERROR)
        if self._await_settings and (ftype != _SETTINGS or flags & fr.FLAG_ACK):
            raise _ConnError(f"first frame from the peer is type {ftype}, not SETTINGS",
                             ErrorCodes.PROTOCOL_ERROR)
        if self._hb_sid and (ftype != _CONTINUATION or sid != self._hb_sid):
            raise _ConnError(f"frame type {ftype} on stream {sid} inside the header block of "
                             f"stream {self._hb_sid}", ErrorCodes.PROTOCOL_ERROR)
        if self._costs_work(ftype, flags, length) and self._control_frames.hit(self._clock()):
            limits = self.flood_limits
            raise _ConnError(f"peer sent more than {limits.max_control_frames} control frames "
                             "(PING/SETTINGS/PRIORITY/empty DATA/CONTINUATION) within "
                             f"{limits.window:g}s", ErrorCodes.ENHANCE_YOUR_CALM,
                             kind="control_flood")
        if ftype == _DATA:
            return self._data_header(length, flags, sid)
        return length

    @staticmethod
    def _costs_work(ftype: int, flags: int, length: int) -> bool:
        """Frames that make us answer or work while carrying no payload (flood classes)."""
        if ftype in (_SETTINGS, fr.PING):
            return not flags & fr.FLAG_ACK
        if ftype == fr.PRIORITY:
            return True
        if ftype == _CONTINUATION:
            return length == 0 and not flags & fr.FLAG_END_HEADERS
        return ftype == _DATA and length == 0 and not flags & _END_STREAM

    def _data_header(self, length: int, flags: int, sid: int) -> int:
        if sid == 0:
            raise _ConnError("DATA frame on stream 0", ErrorCodes.PROTOCOL_ERROR)
        if length > self._recv_window:
            raise _ConnError(f"peer overran the connection flow-control window ({length} > "
                             f"{self._recv_window})", ErrorCodes.FLOW_CONTROL_ERROR)
        st = self._streams.get(sid)
        if st is not None and st.recv_open:
            if length > st.recv_window:
                raise _ConnError(f"peer overran the flow-control window of stream {sid} "
                                 f"({length} > {st.recv_window})", ErrorCodes.FLOW_CONTROL_ERROR)
            self._recv_window -= length
            st.recv_window -= length
            if self.fast_path and not flags & _PADDED:
                self._data_st = st
                self._data_end = bool(flags & _END_STREAM)
                self._data_left = length
                if not length:
                    self._finish_data_frame()
                return -1
            return length  # collected whole (padding, or the reference path)
        if self._is_idle(sid):
            raise _ConnError(f"DATA on stream {sid}, which is not open",
                             ErrorCodes.PROTOCOL_ERROR)
        # Closed or half-closed (remote): the bytes count against the connection window
        # (RFC 9113 §6.9), are dropped, and their window handed back at once.
        self._recv_window -= length
        self._credit_connection(length)
        if st is not None:
            self._stream_error(st, ErrorCodes.STREAM_CLOSED)
        else:
            self._late_frame(sid)
        self._data_st = None
        self._data_end = False
        self._data_left = length
        return -1

    def _deliver(self, st: _Stream, chunk: memoryview) -> None:
        if st.closed:
            # Reset locally mid-frame: drop the bytes but return their connection window.
            self._credit_connection(len(chunk))
            return
        st.outstanding += len(chunk)
        if self._acc and self._acc_st is not st:
            self._flush_acc()
        self._acc_st = st
        self._acc.append(chunk)

    def _finish_data_frame(self) -> None:
        st = self._data_st
        self._data_st = None
        if self._data_end and st is not None and not st.closed:
            self._end_remote(st)

    def _flush_acc(self) -> None:
        parts = self._acc
        if parts:
            data = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
            assert self._acc_st is not None
            self._events.append(ev.StreamData(self._acc_st.sid, data))
            parts.clear()
            self._acc_st = None

    def _emit(self, event: ev.Event) -> None:
        if self._acc:
            self._flush_acc()
        self._events.append(event)

    # ------------------------------------------------------------- whole frames

    def _on_frame(self, buf: bytes | memoryview, pos: int) -> None:
        word, flags, sid = _FRAME.unpack_from(buf, pos)
        length = word >> 8
        ftype = word & 0xFF
        sid &= 0x7FFFFFFF
        payload = memoryview(buf)[pos + 9:pos + 9 + length]
        if ftype == _DATA:
            self._on_data_frame(flags, sid, payload)
        elif ftype == fr.HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == _CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == fr.WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == fr.RST_STREAM:
            self._on_rst_stream(sid, payload)
        elif ftype == _SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == fr.PING:
            self._on_ping(flags, sid, payload)
        elif ftype == fr.GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == fr.PRIORITY:
            if sid == 0:
                raise _ConnError("PRIORITY frame on stream 0", ErrorCodes.PROTOCOL_ERROR)
            if length != 5:
                self._stream_error_by_id(sid, ErrorCodes.FRAME_SIZE_ERROR)
        elif ftype == fr.PUSH_PROMISE:
            raise _ConnError("PUSH_PROMISE received, but push is disabled",
                             ErrorCodes.PROTOCOL_ERROR)
        # any other type: ignored (RFC 9113 §5.5)

    def _on_data_frame(self, flags: int, sid: int, payload: memoryview) -> None:
        """A DATA frame collected whole: already charged to the windows at its header."""
        length = len(payload)
        data = payload
        pad = 0
        if flags & _PADDED:
            if length < 1 or payload[0] >= length:
                raise _ConnError("DATA padding exceeds the frame", ErrorCodes.PROTOCOL_ERROR)
            pad = payload[0] + 1
            data = payload[1:length - payload[0]]
        st = self._streams.get(sid)
        if st is None or st.closed:  # reset locally while the frame was arriving
            self._credit_connection(length)
            return
        if pad:  # padding is never seen by the consumer: return its window now
            self._credit_connection(pad)
            self._credit_stream(st, pad)
        if data:
            self._deliver(st, data)
        if flags & _END_STREAM:
            self._end_remote(st)

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise _ConnError("HEADERS frame on stream 0", ErrorCodes.PROTOCOL_ERROR)
        start, end = 0, len(payload)
        if flags & _PADDED:
            if end < 1:
                raise _ConnError("HEADERS frame too short", ErrorCodes.FRAME_SIZE_ERROR)
            end -= payload[0]
            start = 1
        if flags & fr.FLAG_PRIORITY:
            start += 5
        if end < start:
            raise _ConnError("HEADERS padding exceeds the frame", ErrorCodes.PROTOCOL_ERROR)
        fragment = bytes(payload[start:end])
        self._check_block_size(len(fragment))
        end_stream = bool(flags & _END_STREAM)
        if flags & fr.FLAG_END_HEADERS:
            self._on_header_block(sid, end_stream, fragment)
        else:
            self._hb_sid = sid
            self._hb_end_stream = end_stream
            self._hb_parts = [fragment]
            self._hb_size = len(fragment)
            self._hb_frames = 0

    def _on_continuation(self, flags: int, sid: int, payload: memoryview) -> None:
        if not self._hb_sid:
            raise _ConnError(f"CONTINUATION on stream {sid} without a header block in "
                             "progress", ErrorCodes.PROTOCOL_ERROR)
        self._hb_frames += 1
        if self._hb_frames > MAX_CONTINUATIONS:
            raise _ConnError(f"more than {MAX_CONTINUATIONS} CONTINUATION frames in one header "
                             "block", ErrorCodes.ENHANCE_YOUR_CALM, kind="control_flood")
        self._hb_size += len(payload)
        self._check_block_size(self._hb_size)
        self._hb_parts.append(bytes(payload))
        if flags & fr.FLAG_END_HEADERS:
            block = b"".join(self._hb_parts)
            self._hb_sid = 0
            self._hb_parts = []
            self._on_header_block(sid, self._hb_end_stream, block)

    @staticmethod
    def _check_block_size(size: int) -> None:
        # An HPACK block is not larger than the header list it encodes (literals cost their
        # length plus a few bytes, list entries count 32 more), so the list limit bounds
        # the bytes we buffer and decode too.
        if size > cfg.MAX_HEADER_LIST_SIZE:
            raise _ConnError(f"header block of more than {cfg.MAX_HEADER_LIST_SIZE} bytes",
                             ErrorCodes.ENHANCE_YOUR_CALM)

    def _decode(self, block: bytes) -> hd.Headers | None:
        """Decode a complete block (always: the HPACK context must stay in sync). None if
        a field is not UTF-8 (a malformed message, not a connection error)."""
        try:
            raw = self._decoder.decode(block, raw=True)
        except OversizedHeaderListError as exc:
            raise _ConnError(f"header list larger than {cfg.MAX_HEADER_LIST_SIZE} bytes",
                             ErrorCodes.ENHANCE_YOUR_CALM) from exc
        except (HPACKError, IndexError, ValueError, TypeError) as exc:
            raise _ConnError(f"HPACK decoding failed: {exc}",
                             ErrorCodes.COMPRESSION_ERROR) from exc
        try:
            return tuple((bytes(k).decode(), bytes(v).decode()) for k, v in raw)
        except UnicodeDecodeError:
            return None

    def _on_header_block(self, sid: int, end_stream: bool, block: bytes) -> None:
        headers = self._decode(block)
        st = self._streams.get(sid)
        if st is None:
            if not self.client_side and sid % 2 == 1 and sid > self._highest_inbound:
                self._on_request(sid, end_stream, headers)
            elif self._is_idle(sid):
                raise _ConnError(f"HEADERS on stream {sid}, which the peer may not open",
                                 ErrorCodes.PROTOCOL_ERROR)
            else:
                self._late_frame(sid)
            return
        if not st.recv_open:
            self._stream_error(st, ErrorCodes.STREAM_CLOSED)
            return
        if self.client_side and not st.responded:
            self._on_response(st, end_stream, headers)
            return
        # Trailers: they must end the stream; CONNECT tunnels carry no fields in them.
        if not end_stream:
            self._stream_error(st, ErrorCodes.PROTOCOL_ERROR)
            return
        self._end_remote(st)

    def _on_request(self, sid: int, end_stream: bool, headers: hd.Headers | None) -> None:
        self._highest_inbound = sid
        if self.goaway_sent_last_id is not None and sid > self.goaway_sent_last_id:
            self._refuse_new(sid)
            return
        if self._inbound_open >= cfg.SERVER_MAX_CONCURRENT_STREAMS:
            # RFC 9113 §5.1.2: a stream error (REFUSED_STREAM: the client may retry).
            if self._control_frames.hit(self._clock()):
                raise _ConnError("peer keeps opening streams beyond "
                                 f"{cfg.SERVER_MAX_CONCURRENT_STREAMS}",
                                 ErrorCodes.ENHANCE_YOUR_CALM, kind="control_flood")
            self._refuse_new(sid)
            return
        st = _Stream(sid, self.remote_settings.initial_window_size)
        self._streams[sid] = st
        self._inbound_open += 1
        if end_stream:
            st.recv_open = False
        host, port = "", 0
        pseudo: dict[str, str] = {}
        extra: hd.Headers = ()
        reason: str | None = "header field is not UTF-8"
        if headers is not None:
            pseudo, extra, reason = hd.split_fields(headers, request=True)
        if reason is None:
            method = pseudo.get(":method")
            authority = pseudo.get(":authority")
            if method != "CONNECT":
                reason = f"method {method!r} is not CONNECT"
            elif not authority:
                reason = "CONNECT without :authority"
            elif ":scheme" in pseudo or ":path" in pseudo:
                reason = "CONNECT with :scheme or :path (extended CONNECT is not supported)"
            elif end_stream:
                reason = "CONNECT request ended the stream"
            else:
                try:
                    host, port = parse_authority(authority)
                except ValueError as exc:
                    reason = str(exc)
        if reason is not None:
            self._emit(ev.BadRequest(sid, reason, headers or ()))
            st.responded = True
            self._send_headers(sid, hd.status_block(400), end_stream=True)
            self._refused(st)
            return
        self._unanswered.add(sid)
        self._emit(ev.ConnectRequest(sid, pseudo[":authority"], extra, host, port))

    def _refuse_new(self, sid: int) -> None:
        self._out.append(fr.rst_stream(sid, ErrorCodes.REFUSED_STREAM))
        self._remember_closed(sid, _Closed(True, 0))

    def _on_response(self, st: _Stream, end_stream: bool, headers: hd.Headers | None) -> None:
        status = 0  # stays 0 for a malformed response (RFC 9113 §8.1.1: stream error)
        if headers is not None:
            pseudo, _extra, malformed = hd.split_fields(headers, request=False)
            raw_status = pseudo.get(":status", "")
            if malformed is None and len(raw_status) == 3 and raw_status.isdigit():
                status = int(raw_status)
        if not status or status == 101:
            self._stream_error(st, ErrorCodes.PROTOCOL_ERROR)
            return
        if status < 200:  # informational (1xx): the final response follows
            if end_stream:
                self._stream_error(st, ErrorCodes.PROTOCOL_ERROR)
            return
        st.responded = True
        assert headers is not None
        self._emit(ev.ConnectResponse(st.sid, status, headers))
        if end_stream:
            self._end_remote(st)

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnError("WINDOW_UPDATE frame is not 4 bytes", ErrorCodes.FRAME_SIZE_ERROR)
        increment = fr.unpack_u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise _ConnError("WINDOW_UPDATE of 0 on the connection",
                                 ErrorCodes.PROTOCOL_ERROR)
            self._send_window += increment
            if self._send_window > fr.MAX_WINDOW:
                raise _ConnError("peer grew the connection send window beyond 2^31-1",
                                 ErrorCodes.FLOW_CONTROL_ERROR)
            self._emit(ev.WindowOpened(None))
            return
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise _ConnError(f"WINDOW_UPDATE on idle stream {sid}",
                                 ErrorCodes.PROTOCOL_ERROR)
            return  # closed: may still be in flight (RFC 9113 §6.9)
        if increment == 0:
            self._stream_error(st, ErrorCodes.PROTOCOL_ERROR)
            return
        st.send_window += increment
        if st.send_window > fr.MAX_WINDOW:
            self._stream_error(st, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        self._emit(ev.WindowOpened(sid))

    def _on_rst_stream(self, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise _ConnError("RST_STREAM on stream 0", ErrorCodes.PROTOCOL_ERROR)
        if len(payload) != 4:
            raise _ConnError("RST_STREAM frame is not 4 bytes", ErrorCodes.FRAME_SIZE_ERROR)
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise _ConnError(f"RST_STREAM on idle stream {sid}", ErrorCodes.PROTOCOL_ERROR)
            return  # already closed
        code = fr.unpack_u32(payload)
        premature = sid in self._unanswered
        self._emit(ev.StreamReset(sid, code, True))
        self._close(st, reset_by_us=False)
        if premature:
            self._on_premature_reset()

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnError(f"SETTINGS frame on stream {sid}", ErrorCodes.PROTOCOL_ERROR)
        if flags & fr.FLAG_ACK:
            if payload:
                raise _ConnError("SETTINGS ACK with a payload", ErrorCodes.FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise _ConnError("SETTINGS payload is not a multiple of 6 bytes",
                             ErrorCodes.FRAME_SIZE_ERROR)
        remote = self.remote_settings
        window_changed = False
        for ident, value in fr.unpack_settings(payload):
            if ident == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    raise _ConnError(f"SETTINGS_INITIAL_WINDOW_SIZE {value} exceeds 2^31-1",
                                     ErrorCodes.FLOW_CONTROL_ERROR)
                delta = value - remote.initial_window_size
                remote.initial_window_size = value
                if delta:
                    for st in self._streams.values():
                        st.send_window += delta
                        if st.send_window > fr.MAX_WINDOW:
                            raise _ConnError(f"SETTINGS_INITIAL_WINDOW_SIZE {value} overflows "
                                             f"the send window of stream {st.sid}",
                                             ErrorCodes.FLOW_CONTROL_ERROR)
                window_changed = True
            elif ident == fr.SETTINGS_MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_MAX_FRAME_SIZE:
                    raise _ConnError(f"SETTINGS_MAX_FRAME_SIZE {value} out of range",
                                     ErrorCodes.PROTOCOL_ERROR)
                remote.max_frame_size = value
            elif ident == fr.SETTINGS_ENABLE_PUSH:
                if value > 1 or (value and self.client_side):
                    raise _ConnError(f"SETTINGS_ENABLE_PUSH {value} not allowed",
                                     ErrorCodes.PROTOCOL_ERROR)
                remote.enable_push = value
            elif ident == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
                remote.max_concurrent_streams = value
            elif ident == fr.SETTINGS_HEADER_TABLE_SIZE:
                if value != remote.header_table_size:
                    self._table_update_due = True
                remote.header_table_size = value
            elif ident == fr.SETTINGS_MAX_HEADER_LIST_SIZE:
                remote.max_header_list_size = value
            # unknown identifiers: ignored (RFC 9113 §6.5.2)
        self._out.append(fr.SETTINGS_ACK)
        self._await_settings = False
        self.settings_received = True
        if window_changed:
            self._emit(ev.WindowOpened(None))

    def _on_ping(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnError(f"PING frame on stream {sid}", ErrorCodes.PROTOCOL_ERROR)
        if len(payload) != 8:
            raise _ConnError("PING frame is not 8 bytes", ErrorCodes.FRAME_SIZE_ERROR)
        if flags & fr.FLAG_ACK:
            if bytes(payload) == self._ping_payload:
                self._ping_sent_at = None
        else:
            self._out.append(fr.ping(bytes(payload), ack=True))

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0 or len(payload) < 8:
            raise _ConnError("malformed GOAWAY frame", ErrorCodes.PROTOCOL_ERROR)
        last = fr.unpack_u32(payload) & 0x7FFFFFFF
        code = fr.unpack_u32(payload, 4)
        event = ev.GoAway(last, code)
        self.goaway_received = event
        self._emit(event)
        # Our streams above last_stream_id were never processed by the peer.
        mine = 1 if self.client_side else 0
        for stream_id in sorted(self._streams):
            if stream_id > last and stream_id % 2 == mine:
                self._emit(ev.StreamReset(stream_id, ErrorCodes.REFUSED_STREAM, True))
                self._close(self._streams[stream_id], reset_by_us=False)

    # ------------------------------------------------------------------ helpers

    def _send_headers(self, sid: int, block: bytes, *, end_stream: bool) -> None:
        if self._table_update_due:
            self._table_update_due = False
            block = hd.TABLE_SIZE_ZERO + block
        self._out.extend(fr.headers_frames(sid, block, end_stream,
                                           self.remote_settings.max_frame_size))

    def _is_used(self, sid: int) -> bool:
        """The id belongs to a stream that was opened at some point."""
        if sid % 2 == (1 if self.client_side else 0):
            return 0 < sid < self._next_outbound
        return 0 < sid <= self._highest_inbound

    def _is_idle(self, sid: int) -> bool:
        return not self._is_used(sid)

    def _late_frame(self, sid: int) -> None:
        """A frame on a closed stream: ignored after our RST_STREAM (frames in flight),
        else a stream error STREAM_CLOSED (RFC 9113 §5.1)."""
        closed = self._closed.get(sid)
        if closed is not None and closed.reset_by_us:
            return
        if self._control_frames.hit(self._clock()):
            raise _ConnError("peer keeps sending frames on closed streams",
                             ErrorCodes.ENHANCE_YOUR_CALM, kind="control_flood")
        self._out.append(fr.rst_stream(sid, ErrorCodes.STREAM_CLOSED))
        self._remember_closed(sid, _Closed(True, 0) if closed is None else closed)
        if closed is not None:
            closed.reset_by_us = True

    def _stream_error(self, st: _Stream, code: int) -> None:
        """RST_STREAM ``code``; the consumer learns it as a (local) StreamReset."""
        self._out.append(fr.rst_stream(st.sid, code))
        self._emit(ev.StreamReset(st.sid, code, False))
        self._close(st, reset_by_us=True)

    def _stream_error_by_id(self, sid: int, code: int) -> None:
        st = self._streams.get(sid)
        if st is not None:
            self._stream_error(st, code)
        else:
            self._out.append(fr.rst_stream(sid, code))

    def _end_remote(self, st: _Stream) -> None:
        self._emit(ev.StreamEnded(st.sid))
        st.recv_open = False
        if not st.send_open:
            self._close(st, reset_by_us=False)

    def _close(self, st: _Stream, *, reset_by_us: bool) -> None:
        sid = st.sid
        st.closed = True
        st.send_open = st.recv_open = False
        del self._streams[sid]
        if sid % 2 == (1 if self.client_side else 0):
            self._outbound_open -= 1
        else:
            self._inbound_open -= 1
        self._unanswered.discard(sid)
        # Window the peer may no longer use on this stream stays charged to the connection
        # until the consumer acknowledges what it was handed (or the entry is forgotten).
        self._remember_closed(sid, _Closed(reset_by_us, st.outstanding))
        self._emit(ev.StreamClosed(sid))

    def _remember_closed(self, sid: int, entry: _Closed) -> None:
        closed = self._closed
        closed[sid] = entry
        if len(closed) > MAX_CLOSED_STREAMS:
            oldest = next(iter(closed))
            self._credit_connection(closed.pop(oldest).outstanding)

    def _credit_stream(self, st: _Stream, n: int) -> None:
        if not st.recv_open:  # the peer sends no more DATA here: no window to return
            return
        st.recv_pending += n
        if st.recv_pending >= cfg.STREAM_WINDOW // _UPDATE_DIVISOR:
            self._out.append(fr.window_update(st.sid, st.recv_pending))
            st.recv_window += st.recv_pending
            st.recv_pending = 0

    def _credit_connection(self, n: int) -> None:
        if n <= 0:
            return
        self._recv_pending += n
        if self._recv_pending >= cfg.CONNECTION_WINDOW // _UPDATE_DIVISOR and not self.dead:
            self._out.append(fr.window_update(0, self._recv_pending))
            self._recv_window += self._recv_pending
            self._recv_pending = 0

    def _on_premature_reset(self) -> None:
        if self._premature_resets.hit(self._clock()):
            limits = self.flood_limits
            raise _ConnError(f"peer reset more than {limits.max_premature_resets} streams "
                             f"before they were answered within {limits.window:g}s (HTTP/2 "
                             "rapid reset)", ErrorCodes.ENHANCE_YOUR_CALM, kind="reset_flood")

    def _fail(self, reason: str, code: int, *, kind: str = "protocol") -> None:
        if self.dead:
            return
        self._flush_acc()
        self.dead = True
        self._data_left = 0
        self._partial_need = 0
        self._unanswered.clear()
        self._out.append(fr.goaway(self._highest_inbound, code))
        self._events.append(ev.ConnectionError(reason, int(code), kind))

    def _take_events(self) -> list[ev.Event]:
        events = self._events
        self._events = []
        return events
