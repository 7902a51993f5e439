"""Protocol detection on the first bytes of a tunnel (pure).

HTTP/2 with prior knowledge starts with the connection preface; HTTP/1.x with a request line
``METHOD SP target SP HTTP/1.x``.  Anything else (or silence until the detection deadline:
server-first protocols) is TCP, which the waypoint proxies with L4 policy only.
"""

from __future__ import annotations

import enum
import re

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A request line: a token method, a target without spaces, the version.  Only the prefix that
# has arrived is judged; MAX_SNIFF bytes without a line end is not HTTP/1 (llhttp would 414).
_REQUEST_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ \r\n]+ HTTP/1\.[01]\r?\n")
# The start of one: method, then optionally a space, target, space, and a prefix of the version.
_METHOD_PREFIX = re.compile(
    rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}"
    rb"( [^ \r\n]*( (H(T(T(P(/(1(\.[01]?)?)?)?)?)?)?)?)?)?$"
)
MAX_SNIFF = 8192


class Detected(enum.Enum):
    HTTP1 = "http/1.1"
    HTTP2 = "h2"
    TCP = "tcp"


def detect(data: bytes) -> Detected | None:
    """The protocol ``data`` starts with, or None when more bytes are needed to tell."""
    if not data:
        return None
    if data[: len(H2_PREFACE)] == H2_PREFACE[: len(data)]:
        return Detected.HTTP2 if len(data) >= len(H2_PREFACE) else None
    if _REQUEST_LINE.match(data):
        return Detected.HTTP1
    if len(data) < MAX_SNIFF and b"\n" not in data and _METHOD_PREFIX.match(data):
        return None  # still a plausible request line
    return Detected.TCP
