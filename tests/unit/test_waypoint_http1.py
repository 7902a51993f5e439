"""The waypoint's sans-I/O HTTP/1.1 codec (nodeproxy.waypoint.http1): readers, strictness
(request smuggling, limits), writers, round trips and split-invariance."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.waypoint.http1 import (
    BodyData,
    BodyKind,
    Event,
    Framing,
    Headers,
    Http1Error,
    Http1Limits,
    MessageEnd,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Upgraded,
    encode_body,
    encode_end,
    encode_request_head,
    encode_response_head,
    request_body_framing,
    response_body_framing,
    strip_hop_by_hop,
)

HOST = (("Host", "a"),)


def req(method: str = "GET", target: str = "/", *, version: str = "1.1",
        headers: Headers = HOST, keep_alive: bool = True, upgrade: bool = False,
        body: BodyKind = BodyKind.NONE, expect_continue: bool = False) -> RequestHead:
    return RequestHead(method, target, version, headers, keep_alive, upgrade, body,
                       expect_continue)


def resp(status: int = 200, reason: str = "OK", *, version: str = "1.1",
         headers: Headers = (), keep_alive: bool = True,
         body: BodyKind = BodyKind.NONE) -> ResponseHead:
    return ResponseHead(status, reason, version, headers, keep_alive, body)


def merged(events: list[Event]) -> list[Event]:
    """Adjacent BodyData joined: how a body is cut into pieces depends on the reads."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], BodyData):
            out[-1] = BodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def with_passthrough(events: list[Event], later: list[bytes]) -> list[Event]:
    """After Upgraded the caller passes later reads through: count them in ``rest``."""
    if events and isinstance(events[-1], Upgraded):
        events[-1] = Upgraded(events[-1].rest + b"".join(later))
    return events


def read_requests(pieces: list[bytes], limits: Http1Limits | None = None) -> list[Event]:
    reader = RequestReader(limits)
    events: list[Event] = []
    for index, piece in enumerate(pieces):
        events += reader.feed(piece)
        if reader.stopped:
            with_passthrough(events, pieces[index + 1:])
            break
    return merged(events)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def read_response(method: str, pieces: list[bytes], *, eof: bool = False,
                  limits: Http1Limits | None = None) -> list[Event]:
    reader = ResponseReader(limits)
    reader.expect_response(method)
    events: list[Event] = []
    for index, piece in enumerate(pieces):
        events += reader.feed(piece)
        if reader.stopped:
            with_passthrough(events, pieces[index + 1:])
            break
    if eof and not reader.stopped:
        events += reader.feed_eof()
    return merged(events)


# --- requests: what comes out ------------------------------------------------------------

POST_CL = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED_WITH_TRAILERS = (
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value;flag\r\nhello\r\n6;q=\"quoted\"\r\n world\r\n0\r\n"
    b"Checksum: abc\r\nX-Tail:  done \r\n\r\n"
)
PIPELINED = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
)

REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", [req(), MessageEnd()], id="simple-get"),
    pytest.param(POST_CL, [
        req("POST", "/upload", headers=(("Host", "a"), ("Content-Length", "11")),
            body=BodyKind.of_length(11)),
        BodyData(b"hello world"), MessageEnd()], id="post-content-length"),
    pytest.param(CHUNKED_WITH_TRAILERS, [
        req("POST", "/c", headers=(("Host", "a"), ("Transfer-Encoding", "chunked")),
            body=BodyKind.CHUNKED),
        BodyData(b"hello world"),
        MessageEnd((("Checksum", "abc"), ("X-Tail", "done")))], id="chunked-extensions-trailers"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", [
        req("POST", headers=(("Host", "a"), ("Transfer-Encoding", "Chunked")),
            body=BodyKind.CHUNKED), MessageEnd()], id="chunked-case-insensitive-empty"),
    pytest.param(PIPELINED, [
        req(target="/1"), MessageEnd(),
        req("POST", "/2", headers=(("Host", "a"), ("Content-Length", "3")),
            body=BodyKind.of_length(3)), BodyData(b"abc"), MessageEnd(),
        req(target="/3"), MessageEnd()], id="pipelined-in-order"),
    pytest.param(b"GET /x HTTP/1.0\r\n\r\n",
                 [req(target="/x", version="1.0", headers=(), keep_alive=False), MessageEnd()],
                 id="http10-without-host"),
    pytest.param(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"
                 b"x", [req("PUT", "/f", headers=(("Host", "a"), ("Expect", "100-Continue"),
                                                 ("Content-Length", "1")),
                            body=BodyKind.of_length(1), expect_continue=True),
                        BodyData(b"x"), MessageEnd()], id="expect-100-continue"),
    pytest.param(b"PUT /f HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
                 [req("PUT", "/f", version="1.0",
                      headers=(("Expect", "100-continue"), ("Content-Length", "0")),
                      keep_alive=False, body=BodyKind.of_length(0)), MessageEnd()],
                 id="expect-ignored-on-http10"),
    pytest.param(b"GET http://a/b?c=d HTTP/1.1\r\nHost: a\r\n\r\n",
                 [req(target="http://a/b?c=d"), MessageEnd()], id="absolute-form-target"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                 [req("OPTIONS", "*"), MessageEnd()], id="asterisk-form"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad:   v w \t\r\nX-Empty:\r\n\r\n",
                 [req(headers=(("Host", "a"), ("X-Pad", "v w"), ("X-Empty", ""))), MessageEnd()],
                 id="ows-trimmed-empty-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9\r\n\r\n",
                 [req(headers=(("Host", "a"), ("X-Latin", "caf\xe9"))), MessageEnd()],
                 id="obs-text-latin-1"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", [req(), MessageEnd()],
                 id="blank-line-before-request"),
    pytest.param(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                 b"\x81\x05hello", [
                     req(target="/ws", headers=(("Host", "a"), ("Upgrade", "websocket"),
                                                ("Connection", "Upgrade")),
                         keep_alive=False, upgrade=True),
                     Upgraded(b"\x81\x05hello")], id="websocket-upgrade-hands-back-rest"),
    pytest.param(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x01", [
        req("CONNECT", "db:5432", headers=(("Host", "db:5432"),), keep_alive=False,
            upgrade=True), Upgraded(b"\x00\x01")], id="connect-hands-back-rest"),
    pytest.param(b"POST /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                 b"Content-Length: 3\r\n\r\nabcRAW", [
                     req("POST", "/h", headers=(("Host", "a"), ("Connection", "Upgrade"),
                                                ("Upgrade", "h2c"), ("Content-Length", "3")),
                         keep_alive=False, upgrade=True, body=BodyKind.of_length(3)),
                     Upgraded(b"abcRAW")], id="upgrade-body-stays-in-rest"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
                 [req(headers=(("Host", "a"), ("Upgrade", "websocket"))), MessageEnd()],
                 id="upgrade-without-connection-token-is-plain"),
    pytest.param(b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                 b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
                 [req(target="/1", headers=(("Host", "a"), ("Connection", "close")),
                      keep_alive=False), MessageEnd()], id="bytes-after-close-ignored"),
    pytest.param(b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGARBAGE\r\n",
                 [req(target="/1", headers=(("Host", "a"), ("Connection", "close")),
                      keep_alive=False), MessageEnd()], id="garbage-after-close-ignored"),
]


@pytest.mark.parametrize(("wire", "expected"), REQUESTS)
def test_request_events(wire: bytes, expected: list[Event]) -> None:
    assert read_requests([wire]) == expected


@pytest.mark.parametrize(("wire", "expected"), REQUESTS)
def test_request_events_one_byte_at_a_time(wire: bytes, expected: list[Event]) -> None:
    assert read_requests(bytewise(wire)) == expected


def test_post_split_at_every_boundary_gives_the_same_events() -> None:
    whole = read_requests([POST_CL])
    for cut in range(len(POST_CL) + 1):
        assert read_requests([POST_CL[:cut], POST_CL[cut:]]) == whole, cut


def test_body_streams_as_it_arrives() -> None:
    reader = RequestReader()
    head = reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
    assert head[1:] == [BodyData(b"ab")]
    assert reader.feed(b"cd") == [BodyData(b"cd")]
    assert reader.feed(b"ef") == [BodyData(b"ef"), MessageEnd()]


@pytest.mark.parametrize(("version", "connection", "keep_alive"), [
    pytest.param("1.1", None, True, id="1.1-default-keep-alive"),
    pytest.param("1.1", "close", False, id="1.1-close"),
    pytest.param("1.1", "Keep-Alive, CLOSE", False, id="1.1-close-wins"),
    pytest.param("1.1", "keep-alive", True, id="1.1-explicit-keep-alive"),
    pytest.param("1.0", None, False, id="1.0-default-close"),
    pytest.param("1.0", "keep-alive", True, id="1.0-keep-alive"),
    pytest.param("1.0", "Keep-Alive, x-custom", True, id="1.0-keep-alive-token-list"),
    pytest.param("1.0", "x-custom", False, id="1.0-other-token"),
])
def test_keep_alive_rules(version: str, connection: str | None, keep_alive: bool) -> None:
    extra = f"Connection: {connection}\r\n" if connection else ""
    wire = f"GET / HTTP/{version}\r\nHost: a\r\n{extra}\r\n".encode()
    head = RequestReader().feed(wire)[0]
    assert isinstance(head, RequestHead)
    assert head.keep_alive is keep_alive


# --- requests: strictness ----------------------------------------------------------------

SMUGGLING = [
    pytest.param(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400, id="cl-then-te"),
    pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 400, id="te-then-cl"),
    pytest.param(b"Content-Length: 3\r\nContent-Length: 4\r\n", 400, id="cl-cl-different"),
    pytest.param(b"Content-Length: 3\r\nContent-Length: 3\r\n", 400, id="cl-cl-same"),
    pytest.param(b"Content-Length: 3, 3\r\n", 400, id="cl-list"),
    pytest.param(b"Content-Length: +3\r\n", 400, id="cl-signed"),
    pytest.param(b"Content-Length: 99999999999999999999999\r\n", 400, id="cl-overflow"),
    pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400,
                 id="te-chunked-twice"),
    pytest.param(b"Transfer-Encoding: identity\r\n", 400, id="te-identity"),
    pytest.param(b"Transfer-Encoding: xchunked\r\n", 400, id="te-xchunked"),
    pytest.param(b"Transfer-Encoding: chunked, identity\r\n", 400, id="te-chunked-not-last"),
    pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", 501, id="te-unsupported-coding"),
    pytest.param(b"Transfer-Encoding : chunked\r\n", 400, id="space-before-colon"),
    pytest.param(b"X-A: b\r\n folded\r\n", 400, id="obs-fold"),
    pytest.param(b"X-A: b\x00c\r\n", 400, id="nul-in-value"),
    pytest.param(b"X-A: b\rc\r\n", 400, id="bare-cr-in-value"),
    pytest.param(b"X-A: b\x7f\r\n", 400, id="del-in-value"),
    pytest.param(b"X-A: b\nX-B: c\r\n", 400, id="bare-lf-line-end"),
    pytest.param(b"X-\xff: b\r\n", 400, id="non-token-name"),
    pytest.param(b": b\r\n", 400, id="empty-name"),
    pytest.param(b"Host: b\r\n", 400, id="two-hosts"),
]


@pytest.mark.parametrize(("fields", "status"), SMUGGLING)
def test_request_smuggling_guards(fields: bytes, status: int) -> None:
    wire = b"POST / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n0\r\n\r\n"
    events = read_requests([wire])
    assert isinstance(events[-1], ProtocolError)
    assert events[-1].status == status
    assert not any(isinstance(e, (RequestHead, BodyData, MessageEnd)) for e in events)


@pytest.mark.parametrize(("wire", "status"), [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="1.1-without-host"),
    pytest.param(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
                 id="1.0-with-transfer-encoding"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, id="bare-lf-request-line"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="http-2.0-request-line"),
    pytest.param(b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, id="http-0.9"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400, id="http-1.2"),
    pytest.param(b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="unknown-method"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="space-in-target"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, id="tls-client-hello"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n"
                 b"0\r\n\r\n", 400, id="space-after-chunk-size"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n"
                 b"0\r\n\r\n", 400, id="chunk-longer-than-size"),
])
def test_malformed_requests(wire: bytes, status: int) -> None:
    events = read_requests([wire])
    assert isinstance(events[-1], ProtocolError)
    assert events[-1].status == status


def test_protocol_error_reason_says_what_to_fix() -> None:
    wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    error = read_requests([wire])[-1]
    assert error == ProtocolError(501, "transfer coding 'gzip' is not implemented: send the "
                                       "body chunked or with Content-Length")


SMALL = Http1Limits(max_header_bytes=200, max_headers=5, max_target_bytes=50)


@pytest.mark.parametrize(("pieces", "status"), [
    pytest.param([b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 300 + b"\r\n\r\n"], 431,
                 id="complete-head-too-large"),
    pytest.param([b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "] + [b"v" * 64] * 4, 431,
                 id="unfinished-field-dribbled"),
    pytest.param([b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(6))
                  + b"\r\n"], 431, id="too-many-fields"),
    pytest.param([b"GET /" + b"p" * 60 + b" HTTP/1.1\r\nHost: a\r\n\r\n"], 414,
                 id="long-target"),
    pytest.param([b"GET /" + b"p" * 30, b"p" * 30], 414, id="long-target-unfinished"),
    pytest.param([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"1\r\nx\r\n0\r\nX-T: " + b"t" * 300 + b"\r\n\r\n"], 431,
                 id="trailers-too-large"),
    pytest.param([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;e=",
                  *[b"e" * 100] * 3], 400, id="chunk-extension-flood"),
    pytest.param([b"\r\n" * 101], 400, id="blank-line-flood"),
])
def test_request_limits(pieces: list[bytes], status: int) -> None:
    events = read_requests(pieces, SMALL)
    assert isinstance(events[-1], ProtocolError)
    assert events[-1].status == status


@pytest.mark.parametrize(("value_bytes", "accepted"), [
    pytest.param(182, True, id="at-limit"),
    pytest.param(183, False, id="one-byte-over"),
])
def test_header_section_size_counts_names_values_and_4_per_line(value_bytes: int,
                                                                accepted: bool) -> None:
    # Host: a (5 + 4) and X-Big: v... (5 + n + 4) against SMALL's 200 bytes
    wire = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * value_bytes + b"\r\n\r\n"
    first = read_requests([wire], SMALL)[0]
    assert isinstance(first, RequestHead) is accepted
    assert accepted or first == ProtocolError(431, "header section exceeds 200 bytes "
                                                   "(Http1Limits)")


def test_default_limits_are_64k_100_fields_8k_target() -> None:
    limits = Http1Limits()
    assert (limits.max_header_bytes, limits.max_headers, limits.max_target_bytes) == (
        64 * 1024, 100, 8 * 1024)
    at_limit = b"GET /" + b"p" * (8 * 1024 - 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert isinstance(read_requests([at_limit])[0], RequestHead)
    over = b"GET /" + b"p" * (8 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert read_requests([over])[-1] == ProtocolError(414, "request target longer than 8192 "
                                                           "bytes (Http1Limits)")
    hundred = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n"
    assert isinstance(read_requests([hundred])[0], RequestHead)
    assert read_requests([hundred[:-2] + b"X-last: v\r\n\r\n"])[-1] == ProtocolError(
        431, "more than 100 header or trailer fields (Http1Limits)")


# --- requests: flow control and lifecycle ------------------------------------------------


def test_pipelining_bound_and_response_sent() -> None:
    reader = RequestReader()
    assert reader.wants_more()
    reader.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reader.wants_more(), "one request being answered: the next may be read"
    reader.feed(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not reader.wants_more(), "a head is waiting behind the one being answered"
    reader.response_sent()
    assert reader.wants_more()
    reader.response_sent()
    with pytest.raises(Http1Error, match="without an outstanding request"):
        reader.response_sent()


def test_one_feed_with_many_pipelined_requests_yields_all_in_order() -> None:
    wire = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
    reader = RequestReader()
    heads = [e.target for e in reader.feed(wire) if isinstance(e, RequestHead)]
    assert heads == ["/0", "/1", "/2", "/3", "/4"]
    assert not reader.wants_more()


@pytest.mark.parametrize(("wire", "expected"), [
    pytest.param(b"", [], id="idle"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", [], id="after-complete-request"),
    pytest.param(b"GET / HTTP/1.1\r\nHo", [
        ProtocolError(400, "client closed the connection in the middle of a request")],
        id="mid-head"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", [
        ProtocolError(400, "client closed the connection in the middle of a request")],
        id="mid-body"),
])
def test_request_eof(wire: bytes, expected: list[Event]) -> None:
    reader = RequestReader()
    reader.feed(wire)
    assert reader.feed_eof() == expected
    assert reader.stopped
    assert not reader.wants_more()


def test_reader_stops_after_protocol_error() -> None:
    reader = RequestReader()
    assert isinstance(reader.feed(b"GET / HTTP/1.1\r\n\r\n")[-1], ProtocolError)
    assert reader.stopped
    assert not reader.wants_more()
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_feeding_after_upgrade_is_a_caller_bug() -> None:
    reader = RequestReader()
    reader.feed(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n")
    with pytest.raises(Http1Error, match="passthrough"):
        reader.feed(b"more")


def test_upgrade_after_pipelined_request() -> None:
    wire = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"frames")
    events = read_requests([wire])
    assert [type(e) for e in events] == [RequestHead, MessageEnd, RequestHead, Upgraded]
    assert events[-1] == Upgraded(b"frames")


# --- responses ---------------------------------------------------------------------------

CL3 = (("Content-Length", "3"),)

RESPONSES = [
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", False,
                 [resp(headers=CL3, body=BodyKind.of_length(3)), BodyData(b"abc"), MessageEnd()],
                 id="get-200-content-length"),
    pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", False,
                 [resp(headers=CL3), MessageEnd()], id="head-has-no-body"),
    pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False,
                 [resp(headers=(("Transfer-Encoding", "chunked"),)), MessageEnd()],
                 id="head-chunked-has-no-body"),
    pytest.param("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", False,
                 [resp(204, "No Content", headers=CL3), MessageEnd()], id="204-no-body"),
    pytest.param("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n", False,
                 [resp(304, "Not Modified", headers=CL3), MessageEnd()], id="304-no-body"),
    pytest.param("POST", b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", False,
                 [resp(100, "Continue"), resp(headers=CL3, body=BodyKind.of_length(3)),
                  BodyData(b"abc"), MessageEnd()], id="100-then-200"),
    pytest.param("GET", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                        b"HTTP/1.1 102 Processing\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False,
                 [resp(103, "Early Hints", headers=(("Link", "</s.css>"),)),
                  resp(102, "Processing"),
                  resp(headers=(("Content-Length", "0"),), body=BodyKind.of_length(0)),
                  MessageEnd()], id="103-102-then-200"),
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstream until close",
                 True, [resp(headers=(("Content-Type", "text/plain"),), keep_alive=False,
                             body=BodyKind.UNTIL_CLOSE),
                        BodyData(b"stream until close"), MessageEnd()], id="read-until-eof"),
    pytest.param("GET", b"HTTP/1.0 200 OK\r\n\r\nold", True,
                 [resp(version="1.0", keep_alive=False, body=BodyKind.UNTIL_CLOSE),
                  BodyData(b"old"), MessageEnd()], id="http10-until-eof"),
    pytest.param("GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n"
                        b"abc", False,
                 [resp(version="1.0", headers=(("Connection", "keep-alive"), *CL3),
                       body=BodyKind.of_length(3)), BodyData(b"abc"), MessageEnd()],
                 id="http10-keep-alive"),
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
                 False, [resp(headers=(("Connection", "close"), *CL3), keep_alive=False,
                              body=BodyKind.of_length(3)), BodyData(b"abc"), MessageEnd()],
                 id="http11-close"),
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n", False,
                 [resp(headers=(("Transfer-Encoding", "chunked"),), body=BodyKind.CHUNKED),
                  BodyData(b"abcde"), MessageEnd((("grpc-status", "0"),))],
                 id="chunked-with-trailers"),
    pytest.param("CONNECT", b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-x\r\n", False,
                 [resp(reason="Connection established", keep_alive=False),
                  Upgraded(b"SSH-2.0-x\r\n")], id="connect-2xx-upgraded"),
    pytest.param("CONNECT", b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno!", False,
                 [resp(403, "Forbidden", headers=CL3, body=BodyKind.of_length(3)),
                  BodyData(b"no!"), MessageEnd()], id="connect-refused-has-body"),
    pytest.param("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n\x81\x00", False,
                 [resp(101, "Switching Protocols",
                       headers=(("Upgrade", "websocket"), ("Connection", "Upgrade")),
                       keep_alive=False), Upgraded(b"\x81\x00")], id="101-upgraded"),
    pytest.param("GET", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", False,
                 [resp(reason="", headers=(("Content-Length", "0"),),
                       body=BodyKind.of_length(0)), MessageEnd()], id="empty-reason"),
    pytest.param("GET", b"\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", False,
                 [resp(204, "No Content"), MessageEnd()], id="blank-lines-before-status"),
]


@pytest.mark.parametrize(("method", "wire", "eof", "expected"), RESPONSES)
def test_response_events(method: str, wire: bytes, eof: bool, expected: list[Event]) -> None:
    assert read_response(method, [wire], eof=eof) == expected


@pytest.mark.parametrize(("method", "wire", "eof", "expected"), RESPONSES)
def test_response_events_one_byte_at_a_time(method: str, wire: bytes, eof: bool,
                                            expected: list[Event]) -> None:
    assert read_response(method, bytewise(wire), eof=eof) == expected


def test_connection_is_reused_across_exchanges() -> None:
    reader = ResponseReader()
    seen: list[Event] = []
    for method, wire in [("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
                         ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                         ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n")]:
        reader.expect_response(method)
        seen += reader.feed(wire)
    assert [type(e) for e in seen] == [ResponseHead, MessageEnd, ResponseHead, BodyData,
                                       MessageEnd, ResponseHead, MessageEnd]
    assert not reader.stopped


UPSTREAM_ERRORS = [
    pytest.param("GET", [b"\x16\x03\x03\x00\x02\x02\x28"], False, "malformed response",
                 id="tls-alert-garbage"),
    pytest.param("GET", [b"SSH-2.0-OpenSSH_9.2\r\n"], False, "malformed response",
                 id="server-first-banner"),
    pytest.param("GET", [b"HTTP/1.1 2000 OK\r\n\r\n"], False, "malformed response",
                 id="bad-status"),
    pytest.param("GET", [b"HTTP/2.0 200 OK\r\n\r\n"], False, "HTTP/2.0", id="http2-status"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"], False,
                 "only 'chunked'", id="te-gzip"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n"], False, "malformed response", id="cl-and-te"),
    pytest.param("GET", [b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
                 False, "HTTP/1.0 response with Transfer-Encoding", id="http10-te"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"], False,
                 "malformed response", id="obs-fold"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef"], False,
                 "no response was expected", id="body-longer-than-announced"),
    pytest.param("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"], False,
                 "after a response without a body", id="body-after-head-response"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 300 + b"\r\n\r\n"], False,
                 "exceeds 200 bytes", id="head-too-large"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nX-Big: ", b"v" * 150, b"v" * 150], False,
                 "exceeds 200 bytes", id="head-too-large-unfinished"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;e=",
                         *[b"e" * 100] * 3], False, "chunk framing", id="chunk-extension-flood"),
    pytest.param("GET", [], True, "before responding", id="closed-before-responding"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nCont"], True, "middle of the response head",
                 id="closed-mid-head"),
    pytest.param("GET", [b"HTTP/1.1 100 Continue\r\n\r\n"], True,
                 "middle of the response head", id="closed-after-interim"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"], True,
                 "before the response body was complete", id="closed-mid-body"),
    pytest.param("GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab"], True,
                 "before the response body was complete", id="closed-mid-chunked"),
]


@pytest.mark.parametrize(("method", "pieces", "eof", "reason"), UPSTREAM_ERRORS)
def test_upstream_failures_are_502(method: str, pieces: list[bytes], eof: bool,
                                   reason: str) -> None:
    events = read_response(method, pieces, eof=eof, limits=SMALL)
    assert isinstance(events[-1], ProtocolError)
    assert events[-1].status == 502
    assert reason in events[-1].reason


def test_bytes_when_no_response_is_expected_are_502() -> None:
    reader = ResponseReader()
    events = reader.feed(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert events == [ProtocolError(502, "upstream sent bytes when no response was expected")]
    assert reader.stopped
    assert reader.feed(b"more") == []


def test_idle_upstream_close_is_not_an_error() -> None:
    reader = ResponseReader()
    reader.expect_response("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert reader.feed_eof() == []
    assert reader.stopped


@pytest.mark.parametrize("setup", [
    pytest.param(lambda r: None, id="response-outstanding"),
    pytest.param(lambda r: r.feed_eof(), id="after-eof"),
])
def test_expect_response_misuse(setup: Callable[[ResponseReader], object]) -> None:
    reader = ResponseReader()
    reader.expect_response("GET")
    setup(reader)
    with pytest.raises(Http1Error):
        reader.expect_response("GET")


def test_feeding_response_reader_after_upgrade_is_a_caller_bug() -> None:
    reader = ResponseReader()
    reader.expect_response("CONNECT")
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(Http1Error, match="passthrough"):
        reader.feed(b"tunnel bytes")


# --- writers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "kept"), [
    pytest.param((("Host", "a"), ("Accept", "*/*")), (("Host", "a"), ("Accept", "*/*")),
                 id="nothing-hop-by-hop"),
    pytest.param((("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
                  ("Proxy-Connection", "x"), ("TE", "trailers"), ("Trailer", "X-T"),
                  ("Transfer-Encoding", "chunked"), ("Upgrade", "websocket"), ("X-Ok", "1")),
                 (("X-Ok", "1"),), id="every-listed-field"),
    pytest.param((("connection", "X-Secret, x-other"), ("x-secret", "1"), ("X-Other", "2"),
                  ("X-Ok", "3")), (("X-Ok", "3"),), id="fields-named-in-connection"),
    pytest.param((("Connection", "Host, Content-Length"), ("Host", "a"),
                  ("Content-Length", "3")), (("Host", "a"), ("Content-Length", "3")),
                 id="host-and-content-length-never-stripped"),
])
def test_strip_hop_by_hop(headers: Headers, kept: Headers) -> None:
    assert strip_hop_by_hop(headers) == kept


@pytest.mark.parametrize(("status", "body", "method", "version", "framing"), [
    pytest.param(200, BodyKind.of_length(5), "GET", "1.1", BodyKind.of_length(5),
                 id="known-length"),
    pytest.param(200, BodyKind.NONE, "GET", "1.1", BodyKind.of_length(0), id="empty-body"),
    pytest.param(200, BodyKind.CHUNKED, "GET", "1.1", BodyKind.CHUNKED, id="unknown-1.1"),
    pytest.param(200, BodyKind.UNTIL_CLOSE, "GET", "1.1", BodyKind.CHUNKED,
                 id="until-close-upstream-chunked-to-1.1"),
    pytest.param(200, BodyKind.CHUNKED, "GET", "1.0", BodyKind.UNTIL_CLOSE,
                 id="unknown-1.0-close-delimited"),
    pytest.param(200, BodyKind.of_length(5), "HEAD", "1.1", BodyKind.NONE, id="head"),
    pytest.param(204, BodyKind.NONE, "GET", "1.1", BodyKind.NONE, id="204"),
    pytest.param(304, BodyKind.NONE, "GET", "1.1", BodyKind.NONE, id="304"),
    pytest.param(100, BodyKind.NONE, "GET", "1.1", BodyKind.NONE, id="interim"),
    pytest.param(200, BodyKind.NONE, "CONNECT", "1.1", BodyKind.NONE, id="connect-2xx"),
    pytest.param(407, BodyKind.NONE, "CONNECT", "1.1", BodyKind.of_length(0),
                 id="connect-refused"),
])
def test_response_body_framing(status: int, body: BodyKind, method: str, version: str,
                               framing: BodyKind) -> None:
    assert response_body_framing(status, body, request_method=method,
                                 request_version=version) == framing


@pytest.mark.parametrize(("args", "kwargs", "wire"), [
    pytest.param((200, "OK", (("X-A", "1"), ("Content-Length", "99"), ("Transfer-Encoding", "x")),
                  BodyKind.of_length(3)), {},
                 b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n",
                 id="writer-owns-framing"),
    pytest.param((200, "OK", (), BodyKind.CHUNKED), {},
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", id="chunked"),
    pytest.param((200, "OK", (), BodyKind.CHUNKED), {"request_version": "1.0"},
                 b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", id="1.0-close-delimited"),
    pytest.param((200, "OK", (), BodyKind.of_length(2)), {"request_version": "1.0"},
                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
                 id="1.0-keep-alive"),
    pytest.param((200, "OK", (), BodyKind.NONE), {"keep_alive": False},
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                 id="close"),
    pytest.param((200, "OK", (("Content-Length", "42"), ("Transfer-Encoding", "chunked")),
                  BodyKind.NONE), {"request_method": "HEAD"},
                 b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", id="head-keeps-length"),
    pytest.param((304, "Not Modified", (("Content-Length", "42"),), BodyKind.NONE), {},
                 b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n",
                 id="304-keeps-length"),
    pytest.param((204, "No Content", (("Content-Length", "42"),), BodyKind.NONE), {},
                 b"HTTP/1.1 204 No Content\r\n\r\n", id="204-no-framing"),
    pytest.param((100, "Continue", (), BodyKind.NONE), {"keep_alive": False},
                 b"HTTP/1.1 100 Continue\r\n\r\n", id="interim"),
    pytest.param((101, "Switching Protocols", (), BodyKind.NONE), {"upgrade": "websocket"},
                 b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: upgrade\r\n\r\n", id="101"),
])
def test_encode_response_head(args: tuple[Any, ...], kwargs: dict[str, Any],
                              wire: bytes) -> None:
    assert encode_response_head(*args, **kwargs) == wire


@pytest.mark.parametrize(("args", "kwargs", "wire"), [
    pytest.param(("GET", "/", HOST, BodyKind.NONE), {}, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                 id="get"),
    pytest.param(("POST", "/p", HOST, BodyKind.NONE), {},
                 b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                 id="empty-post-says-length-0"),
    pytest.param(("POST", "/p", (*HOST, ("content-length", "9")), BodyKind.CHUNKED), {},
                 b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                 id="chunked-replaces-length"),
    pytest.param(("GET", "/", HOST, BodyKind.NONE), {"keep_alive": False},
                 b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", id="close"),
    pytest.param(("GET", "/ws", HOST, BodyKind.NONE), {"upgrade": "websocket"},
                 b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade"
                 b"\r\n\r\n", id="upgrade"),
])
def test_encode_request_head(args: tuple[Any, ...], kwargs: dict[str, Any],
                             wire: bytes) -> None:
    assert encode_request_head(*args, **kwargs) == wire


@pytest.mark.parametrize("call", [
    pytest.param(lambda: encode_request_head("GET", "/", (("X", "a\r\nEvil: 1"),),
                                             BodyKind.NONE), id="crlf-in-value"),
    pytest.param(lambda: encode_request_head("GET", "/", (("X", "a\nb"),), BodyKind.NONE),
                 id="lf-in-value"),
    pytest.param(lambda: encode_request_head("GET", "/", (("X", "a\x00"),), BodyKind.NONE),
                 id="nul-in-value"),
    pytest.param(lambda: encode_request_head("GET", "/", (("X Y", "a"),), BodyKind.NONE),
                 id="space-in-name"),
    pytest.param(lambda: encode_request_head("GET", "/", (("X:", "a"),), BodyKind.NONE),
                 id="colon-in-name"),
    pytest.param(lambda: encode_request_head("GET", "/", (("", "a"),), BodyKind.NONE),
                 id="empty-name"),
    pytest.param(lambda: encode_request_head("GET", "/", (("X", "\u20ac"),), BodyKind.NONE),
                 id="not-latin-1"),
    pytest.param(lambda: encode_request_head("GET", "/a b", (), BodyKind.NONE),
                 id="space-in-target"),
    pytest.param(lambda: encode_request_head("GET", "/\r\n", (), BodyKind.NONE),
                 id="crlf-in-target"),
    pytest.param(lambda: encode_request_head("G T", "/", (), BodyKind.NONE),
                 id="bad-method"),
    pytest.param(lambda: encode_request_head("GET", "/", (), BodyKind.NONE,
                                             upgrade="ws\r\nX: 1"), id="crlf-in-upgrade"),
    pytest.param(lambda: encode_request_head("POST", "/", (), BodyKind.UNTIL_CLOSE),
                 id="close-delimited-request"),
    pytest.param(lambda: encode_response_head(200, "OK\r\nX: 1", (), BodyKind.NONE),
                 id="crlf-in-reason"),
    pytest.param(lambda: encode_response_head(2000, "OK", (), BodyKind.NONE),
                 id="bad-status"),
    pytest.param(lambda: encode_end(True, (("grpc-message", "a\r\nb"),)),
                 id="crlf-in-trailer"),
    pytest.param(lambda: BodyKind.of_length(-1), id="negative-length"),
])
def test_writer_refuses_injection(call: Callable[[], object]) -> None:
    with pytest.raises(Http1Error):
        call()


def test_writer_error_names_the_bad_field() -> None:
    with pytest.raises(Http1Error, match="invalid header name 'X Y'"):
        encode_response_head(200, "OK", (("Ok", "1"), ("X Y", "2")), BodyKind.NONE)


@pytest.mark.parametrize(("data", "chunked", "wire"), [
    pytest.param(b"hello", False, b"hello", id="raw"),
    pytest.param(b"hello", True, b"5\r\nhello\r\n", id="chunk"),
    pytest.param(b"x" * 255, True, b"ff\r\n" + b"x" * 255 + b"\r\n", id="hex-size"),
    pytest.param(b"", True, b"", id="empty-chunk-not-written"),
])
def test_encode_body(data: bytes, chunked: bool, wire: bytes) -> None:
    assert encode_body(data, chunked) == wire


@pytest.mark.parametrize(("chunked", "trailers", "wire"), [
    pytest.param(True, (), b"0\r\n\r\n", id="last-chunk"),
    pytest.param(True, (("grpc-status", "0"), ("grpc-message", "ok")),
                 b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n", id="trailers"),
    pytest.param(False, (("grpc-status", "0"),), b"", id="length-delimited-drops-trailers"),
])
def test_encode_end(chunked: bool, trailers: Headers, wire: bytes) -> None:
    assert encode_end(chunked, trailers) == wire


def test_request_body_framing() -> None:
    assert request_body_framing("GET", BodyKind.NONE) == BodyKind.NONE
    assert request_body_framing("PUT", BodyKind.NONE) == BodyKind.of_length(0)
    assert request_body_framing("POST", BodyKind.CHUNKED) == BodyKind.CHUNKED


# --- round trips -------------------------------------------------------------------------


def encode_request(method: str, target: str, headers: Headers, parts: list[bytes],
                   body: BodyKind, trailers: Headers = ()) -> bytes:
    chunked = request_body_framing(method, body).framing is Framing.CHUNKED
    return (encode_request_head(method, target, headers, body)
            + b"".join(encode_body(p, chunked) for p in parts) + encode_end(chunked, trailers))


@pytest.mark.parametrize(("method", "target", "headers", "parts", "body", "trailers"), [
    pytest.param("GET", "/a?b=c", (*HOST, ("Accept", "*/*")), [], BodyKind.NONE, (),
                 id="get"),
    pytest.param("POST", "/p", HOST, [b"abc", b"def"], BodyKind.of_length(6), (),
                 id="post-length"),
    pytest.param("POST", "/p", HOST, [b"abc", b"", b"def"], BodyKind.CHUNKED,
                 (("Checksum", "x"),), id="post-chunked-trailers"),
    pytest.param("DELETE", "/d", (*HOST, ("X-Latin", "café")), [], BodyKind.NONE, (),
                 id="latin-1-value"),
])
def test_request_round_trip(method: str, target: str, headers: Headers, parts: list[bytes],
                            body: BodyKind, trailers: Headers) -> None:
    events = read_requests([encode_request(method, target, headers, parts, body, trailers)])
    head = events[0]
    assert isinstance(head, RequestHead)
    framing_fields = {"content-length", "transfer-encoding"}
    assert (head.method, head.target, head.body) == (method, target, body)
    assert tuple(h for h in head.headers if h[0].lower() not in framing_fields) == headers
    assert events[1:] == ([BodyData(b"".join(parts))] if b"".join(parts) else []) + [
        MessageEnd(trailers)]


@pytest.mark.parametrize(("method", "status", "headers", "parts", "body"), [
    pytest.param("GET", 200, (("Content-Type", "text/plain"),), [b"hel", b"lo"],
                 BodyKind.of_length(5), id="length"),
    pytest.param("GET", 200, (), [b"hel", b"lo"], BodyKind.CHUNKED, id="chunked"),
    pytest.param("GET", 404, (), [], BodyKind.NONE, id="empty"),
    pytest.param("HEAD", 200, (("Content-Length", "5"),), [], BodyKind.NONE, id="head"),
])
def test_response_round_trip(method: str, status: int, headers: Headers, parts: list[bytes],
                             body: BodyKind) -> None:
    framing = response_body_framing(status, body, request_method=method)
    chunked = framing.framing is Framing.CHUNKED
    wire = (encode_response_head(status, "Reason", headers, body, request_method=method)
            + b"".join(encode_body(p, chunked) for p in parts) + encode_end(chunked))
    events = read_response(method, [wire])
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.body) == (status, "Reason", framing)
    assert events[-1] == MessageEnd()
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == b"".join(parts)


_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_names = st.text(_TCHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "connection",
                                "expect", "upgrade"})
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                blacklist_characters="\x7f"), max_size=20).map(
    lambda v: v.strip(" \t"))


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.tuples(_names, _values), max_size=8),
       body=st.binary(max_size=64), chunked=st.booleans())
def test_any_head_round_trips(headers: list[tuple[str, str]], body: bytes,
                              chunked: bool) -> None:
    fields = HOST + tuple(headers)
    kind = BodyKind.CHUNKED if chunked else BodyKind.of_length(len(body))
    events = read_requests([encode_request("PUT", "/x", fields, [body], kind)])
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers[:-1] == fields
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == body


# --- split invariance (hypothesis) --------------------------------------------------------

VALID_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    POST_CL,
    CHUNKED_WITH_TRAILERS,
    b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-E:\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /u HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw\r\n\r\n",
]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.sampled_from(VALID_REQUESTS), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_split_of_pipelined_requests_gives_the_same_events(picks: list[bytes],
                                                               cuts: list[int]) -> None:
    stream = b"".join(picks)
    assert read_requests(split_at(stream, cuts)) == read_requests([stream])


VALID_RESPONSES = [
    ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4;a=b\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
    ("CONNECT", b"HTTP/1.1 200 OK\r\n\r\ntunnel\r\n\r\nbytes"),
    ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
            b"PRI * HTTP/2.0\r\n\r\n"),
]


@settings(max_examples=300, deadline=None)
@given(pick=st.sampled_from(VALID_RESPONSES),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_of_a_response_gives_the_same_events(pick: tuple[str, bytes],
                                                       cuts: list[int]) -> None:
    method, stream = pick
    whole = read_response(method, [stream])
    assert read_response(method, split_at(stream, cuts)) == whole
    assert not any(isinstance(e, ProtocolError) for e in whole)
