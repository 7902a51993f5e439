"""Sans-I/O HBONE: two in-memory peers, and interop with vanilla h2 peers."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.hbone import events as ev
from nodeproxy.hbone import settings as cfg
from nodeproxy.hbone.protocol import (
    HboneConnection,
    HboneProtocolError,
    StreamLimitError,
    parse_authority,
)

MIB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pair:
    """Client and server HboneConnection wired back to back in memory."""

    def __init__(self, fast_path: bool = True) -> None:
        self.clock = Clock()
        self.c = HboneConnection(True, self.clock, fast_path=fast_path)
        self.s = HboneConnection(False, self.clock, fast_path=fast_path)
        self.ce: list[ev.Event] = []
        self.se: list[ev.Event] = []
        self.pump()

    def pump(self) -> tuple[list[ev.Event], list[ev.Event]]:
        ce: list[ev.Event] = []
        se: list[ev.Event] = []
        while True:
            a, b = self.c.data_to_send(), self.s.data_to_send()
            if not a and not b:
                break
            if a:
                se += self.s.receive_data(a)
            if b:
                ce += self.c.receive_data(b)
        ce += self.c.pending_events()
        se += self.s.pending_events()
        self.ce += ce
        self.se += se
        return ce, se

    def open(self, authority: str = "10.0.0.1:80") -> int:
        sid = self.c.open_stream(authority, [("baggage", "k8s.pod.name=a")])
        _, se = self.pump()
        assert isinstance(se[0], ev.ConnectRequest)
        self.s.respond(sid, 200)
        ce, _ = self.pump()
        assert ev.ConnectResponse(sid, 200, ((":status", "200"),)) in ce
        return sid


def data_of(events: Sequence[ev.Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.StreamData) and e.stream_id == sid)


def vanilla(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


def test_settings_are_ztunnels() -> None:
    p = Pair()
    remote_of_client = p.c.remote_settings
    assert remote_of_client.initial_window_size == 4 * MIB
    assert remote_of_client.max_frame_size == MIB
    assert remote_of_client.max_concurrent_streams == 200
    assert p.s.remote_settings.enable_push == 0
    assert p.c.outbound_window == 16 * MIB
    assert cfg.KEEPALIVE_INTERVAL == 10
    assert cfg.KEEPALIVE_TIMEOUT == 20
    assert cfg.POOL_MAX_STREAMS_PER_CONNECTION == 100
    assert cfg.POOL_IDLE_TIMEOUT == 300


@pytest.mark.parametrize("fast", [True, False])
def test_open_data_both_ways_and_half_close_each_side(fast: bool) -> None:
    p = Pair(fast)
    sid = p.open()
    req = next(e for e in p.se if isinstance(e, ev.ConnectRequest))
    assert (req.authority, req.host, req.port) == ("10.0.0.1:80", "10.0.0.1", 80)
    assert req.headers == (("baggage", "k8s.pod.name=a"),)
    assert p.c.send_data(sid, b"up" * 1000) == 2000
    _, se = p.pump()
    assert data_of(se, sid) == b"up" * 1000
    p.c.end_stream(sid)  # client half-closes; server can still send
    _, se = p.pump()
    assert ev.StreamEnded(sid) in se
    assert p.s.send_data(sid, b"down") == 4
    ce, _ = p.pump()
    assert data_of(ce, sid) == b"down"
    with pytest.raises(HboneProtocolError):
        p.c.send_data(sid, b"more")
    p.s.send_data(sid, b"!", end_stream=True)
    ce, se = p.pump()
    assert data_of(ce, sid) == b"!"
    assert ev.StreamEnded(sid) in ce
    assert ev.StreamClosed(sid) in ce
    assert ev.StreamClosed(sid) in se
    assert p.c.open_streams() == 0
    assert p.s.open_streams() == 0


def test_server_half_closes_first() -> None:
    p = Pair()
    sid = p.open()
    p.s.send_data(sid, b"banner", end_stream=True)
    ce, _ = p.pump()
    assert data_of(ce, sid) == b"banner"
    assert ev.StreamEnded(sid) in ce
    p.c.send_data(sid, b"reply", end_stream=True)
    ce, se = p.pump()
    assert data_of(se, sid) == b"reply"
    assert ev.StreamEnded(sid) in se


@pytest.mark.parametrize("resetter", ["client", "server"])
def test_reset_each_side(resetter: str) -> None:
    p = Pair()
    sid = p.open()
    local, _remote = (p.c, p.s) if resetter == "client" else (p.s, p.c)
    local.reset_stream(sid, ErrorCodes.CANCEL)
    ce, se = p.pump()
    remote_events = se if resetter == "client" else ce
    assert ev.StreamReset(sid, ErrorCodes.CANCEL, True) in remote_events
    assert ev.StreamClosed(sid) in remote_events
    local.reset_stream(sid)  # idempotent


def test_window_exhausted_then_resumed_by_acknowledge() -> None:
    p = Pair()
    sid = p.open()
    big = bytes(6 * MIB)
    sent = p.c.send_data(sid, big)
    assert sent == 4 * MIB  # stream window
    assert p.c.send_window(sid) == 0
    assert p.c.send_data(sid, big[sent:]) == 0
    _, se = p.pump()
    received = data_of(se, sid)
    assert len(received) == 4 * MIB
    ce, _ = p.pump()
    assert not any(isinstance(e, ev.WindowOpened) for e in ce)  # nothing acked yet
    p.s.acknowledge(sid, len(received))
    ce, _ = p.pump()
    assert ev.WindowOpened(sid) in ce
    assert p.c.send_window(sid) == 4 * MIB
    assert p.c.send_data(sid, big[sent:]) == 2 * MIB


def test_connection_window_bounds_many_streams() -> None:
    p = Pair()
    sids = [p.open(f"10.0.0.1:{80 + i}") for i in range(5)]
    accepted = [p.c.send_data(sid, bytes(4 * MIB)) for sid in sids]
    assert sum(accepted) == 16 * MIB  # connection window is shared
    assert accepted[-1] == 0


def test_goaway_lets_in_flight_streams_finish() -> None:
    p = Pair()
    sid = p.open()
    p.s.goaway()
    ce, _ = p.pump()
    assert ev.GoAway(sid, 0) in ce
    assert p.c.streams_available() == 0
    with pytest.raises(StreamLimitError):
        p.c.open_stream("10.0.0.1:81")
    p.c.send_data(sid, b"still flowing", end_stream=True)
    p.s.send_data(sid, b"answer", end_stream=True)
    ce, se = p.pump()
    assert data_of(se, sid) == b"still flowing"
    assert data_of(ce, sid) == b"answer"
    assert not any(isinstance(e, ev.ConnectionError) for e in p.ce + p.se)


def test_goaway_refuses_streams_above_last_id() -> None:
    p = Pair()
    first = p.open()
    late = p.c.open_stream("10.0.0.1:81")  # in flight while the server sends GOAWAY
    p.s.goaway()
    goaway_bytes = p.s.data_to_send()
    ce = p.c.receive_data(goaway_bytes)
    assert ev.GoAway(first, 0) in ce
    assert ev.StreamReset(late, ErrorCodes.REFUSED_STREAM, True) in ce
    _, se = p.pump()  # server gets the late HEADERS: refused, not a request
    assert not any(isinstance(e, ev.ConnectRequest) and e.stream_id == late for e in se)


def test_max_streams_reached() -> None:
    p = Pair()
    for i in range(200):
        p.c.open_stream(f"10.0.0.1:{i + 1}")
    _, se = p.pump()
    assert sum(isinstance(e, ev.ConnectRequest) for e in se) == 200
    assert p.c.streams_available() == 0
    with pytest.raises(StreamLimitError, match="peer allows 200"):
        p.c.open_stream("10.0.0.1:9")


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\x00" * 3 + b"\x04\x00" + b"\x00\x00\x00\x01" + b"x" * 0, ErrorCodes.PROTOCOL_ERROR),
        (struct.pack(">I", (2 * MIB << 8) | 0)[0:4] + b"\x00\x00\x00\x00\x01",
         ErrorCodes.FRAME_SIZE_ERROR),
        (b"\x00\x00\x04\x00\x00\x00\x00\x00\x63abcd", ErrorCodes.PROTOCOL_ERROR),  # DATA, sid 99
        (b"\x00\x00\x03\x07\x00\x00\x00\x00\x00abc", ErrorCodes.PROTOCOL_ERROR),  # short GOAWAY
    ],
    ids=["settings-on-stream", "oversize-frame", "data-unknown-stream", "bad-goaway"],
)
def test_bad_frames_are_connection_errors(garbage: bytes, code: int) -> None:
    p = Pair()
    p.open()
    events = p.s.receive_data(garbage)
    errors = [e for e in events if isinstance(e, ev.ConnectionError)]
    assert errors
    assert errors[0].error_code == code
    out = p.s.data_to_send()
    assert out[3] == 0x07  # a GOAWAY frame is queued
    assert p.s.receive_data(b"anything") == []  # dead: no exception, no events


def test_garbage_instead_of_preface() -> None:
    s = HboneConnection(False, Clock())
    events = s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(events[0], ev.ConnectionError)


def test_flow_control_overrun_is_connection_error() -> None:
    p = Pair()
    sid = p.open()
    p.c.send_data(sid, bytes(4 * MIB))
    p.pump()
    # Forge one more DATA frame past the (unacknowledged) stream window.
    frame = struct.pack(">I", (100 << 8) | 0) + b"\x00" + struct.pack(">I", sid) + bytes(100)
    events = p.s.receive_data(frame)
    assert [e.error_code for e in events if isinstance(e, ev.ConnectionError)] == [
        ErrorCodes.FLOW_CONTROL_ERROR]


def test_local_reset_mid_frame_drops_rest_and_returns_window() -> None:
    p = Pair()
    sid = p.open()
    p.c.send_data(sid, bytes(MIB))
    wire = p.c.data_to_send()
    first = p.s.receive_data(wire[:1000])
    assert len(data_of(first, sid)) == 1000 - 9
    p.s.reset_stream(sid)
    rest = p.s.receive_data(wire[1000:])
    assert data_of(rest, sid) == b""
    # The 1 MiB was charged to the connection window; the dropped part was handed back.
    assert p.s.unacknowledged() <= 1000


def test_server_rejects_non_connect_with_400() -> None:
    s = HboneConnection(False, Clock())
    client = vanilla(True)
    s.receive_data(client.data_to_send())
    client.receive_data(s.data_to_send())
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                            (":authority", "x")], end_stream=True)
    events = s.receive_data(client.data_to_send())
    assert isinstance(events[0], ev.BadRequest)
    assert "GET" in events[0].reason
    replies = client.receive_data(s.data_to_send())
    resp = next(e for e in replies if isinstance(e, h2.events.ResponseReceived))
    headers: dict[Any, Any] = dict(resp.headers)  # str: header_encoding="utf-8"
    assert headers[":status"] == "400"


@pytest.mark.parametrize("authority", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "::1:80",
                                       "[::1:80", ":80"])
def test_bad_authority_gets_400(authority: str) -> None:
    s = HboneConnection(False, Clock())
    client = vanilla(True)
    s.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
    events = s.receive_data(client.data_to_send())
    # Refused and closed both ways (RST_STREAM NO_ERROR): it no longer counts as open.
    assert [type(e) for e in events if not isinstance(e, ev.WindowOpened)] == [
        ev.BadRequest, ev.StreamClosed]
    assert s.open_streams() == 0


def test_parse_authority_accepts_v4_and_v6() -> None:
    assert parse_authority("10.1.2.3:15008") == ("10.1.2.3", 15008)
    assert parse_authority("[fd00::1]:80") == ("fd00::1", 80)


def test_client_sees_non_200() -> None:
    p = Pair()
    sid = p.c.open_stream("10.0.0.1:80")
    p.pump()
    p.s.respond(sid, 401)
    assert p.s.stream_state(sid) == "closed"  # refused: closed on the server at once
    ce, _ = p.pump()
    assert ev.ConnectResponse(sid, 401, ((":status", "401"),)) in ce
    assert ev.StreamEnded(sid) in ce


def test_keepalive_ping_and_timeout() -> None:
    p = Pair()
    p.c.tick(p.clock.now)
    p.clock.now += 5
    assert p.c.tick(p.clock.now) == []
    assert p.c.data_to_send() == b""
    p.clock.now += 6  # 11 s idle -> PING
    p.c.tick(p.clock.now)
    ping = p.c.data_to_send()
    assert ping[3] == 0x06
    p.c.receive_data((p.s.receive_data(ping) and b"") or p.s.data_to_send())  # PING ACK
    p.clock.now += 25
    assert p.c.tick(p.clock.now) == []  # ACKed: no error
    p.clock.now += 11
    p.c.tick(p.clock.now)  # new PING, never answered
    p.c.data_to_send()
    p.clock.now += 21
    events = p.c.tick(p.clock.now)
    assert isinstance(events[0], ev.ConnectionError)
    assert "keepalive" in events[0].reason
    assert p.c.data_to_send()[3] == 0x07  # GOAWAY


# ----------------------------------------------------------------- interop with vanilla h2

def test_fast_client_against_vanilla_h2_server() -> None:
    c = HboneConnection(True, Clock())
    s = vanilla(False)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_stream("10.0.0.1:80")
    payload = bytes(range(256)) * 8192  # vanilla peer: 16 KiB frames, 64 KiB window
    assert c.send_data(sid, payload[:65535]) == 65535  # vanilla default window
    got = b""
    for e in s.receive_data(c.data_to_send()):
        if isinstance(e, h2.events.RequestReceived):
            req_headers: dict[Any, Any] = dict(e.headers)  # str: header_encoding="utf-8"
            assert req_headers[":method"] == "CONNECT"
            s.send_headers(sid, [(":status", "200")])
        elif isinstance(e, h2.events.DataReceived):
            got += e.data
            s.acknowledge_received_data(e.flow_controlled_length, sid)
    assert got == payload[:65535]
    # vanilla server answers with padded DATA + END_STREAM: collected whole, padding dropped
    s.send_data(sid, b"padded reply", pad_length=20)
    s.send_data(sid, b"unpadded end", end_stream=True)
    events = c.receive_data(s.data_to_send())
    assert ev.ConnectResponse(sid, 200, ((":status", "200"),)) in events
    assert data_of(events, sid) == b"padded replyunpadded end"
    assert ev.StreamEnded(sid) in events
    assert not any(isinstance(e, ev.ConnectionError) for e in events)


def test_vanilla_h2_client_against_fast_server() -> None:
    s = HboneConnection(False, Clock())
    client = vanilla(True)
    s.receive_data(client.data_to_send())
    client.receive_data(s.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:443")])
    events = s.receive_data(client.data_to_send())
    assert ev.ConnectRequest(1, "10.0.0.2:443", (), "10.0.0.2", 443) in events
    s.respond(1, 200)
    client.receive_data(s.data_to_send())
    chunk = bytes(client.max_outbound_frame_size)
    total = 0
    while client.local_flow_control_window(1) >= len(chunk) + 4:
        client.send_data(1, chunk)
        total += len(chunk)
    client.send_data(1, b"tail", end_stream=True)
    events = s.receive_data(client.data_to_send())
    assert len(data_of(events, 1)) == total + 4
    assert ev.StreamEnded(1) in events
    assert s.send_data(1, bytes(3 * MIB)) == 65535  # vanilla's default window
    got = 0
    for e in client.receive_data(s.data_to_send()):
        if isinstance(e, h2.events.DataReceived):
            got += len(e.data)
    assert got == 65535


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=30))
def test_fast_path_matches_h2_for_any_read_boundaries(cuts: list[int]) -> None:
    """Same wire bytes, fed in arbitrary pieces, give the same data and ends with the fast
    path (payload handed out as it arrives) as with whole DATA frames (fast_path=False)."""
    results = []
    for fast in (True, False):
        p = Pair(fast_path=fast)
        a, b = p.open("10.0.0.1:1"), p.open("10.0.0.1:2")
        p.c.send_data(a, bytes(range(256)) * 2000)
        p.c.send_data(b, b"B" * 700_000, end_stream=True)
        p.c.send_data(a, b"end of a", end_stream=True)
        wire = p.c.data_to_send()
        events: list[ev.Event] = []
        pos = 0
        for cut in cuts:
            events += p.s.receive_data(wire[pos:pos + cut])
            pos += cut
        events += p.s.receive_data(wire[pos:])
        results.append((data_of(events, a), data_of(events, b),
                        [e for e in events if isinstance(e, ev.StreamEnded)]))
    assert results[0] == results[1]
    assert results[0][0].endswith(b"end of a")
    assert len(results[0][1]) == 700_000
