"""HTTP/2 wire constants and frame builders for the HBONE subset (RFC 9113).

Pure functions over bytes: no state, no I/O. The receive side lives in
:mod:`nodeproxy.hbone.protocol` (it parses frame headers inline on its hot path).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# SETTINGS identifiers (RFC 9113 §6.5.2).
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

#: Largest flow-control window (and window increment) HTTP/2 allows.
MAX_WINDOW: Final = 2**31 - 1
#: Initial windows and frame size before SETTINGS say otherwise.
DEFAULT_WINDOW: Final = 65535
DEFAULT_MAX_FRAME_SIZE: Final = 16384
MAX_MAX_FRAME_SIZE: Final = 2**24 - 1

#: 9-byte frame header: length(24) | type(8) as one word, flags, reserved bit + stream id.
FRAME_HEADER: Final = struct.Struct(">IBI")
_U32: Final = struct.Struct(">I")
_U32x2: Final = struct.Struct(">II")
_SETTING: Final = struct.Struct(">HI")


class ErrorCodes(IntEnum):
    """HTTP/2 error codes (RFC 9113 §7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return FRAME_HEADER.pack((length << 8) | ftype, flags, stream_id)


def data_header(length: int, flags: int, stream_id: int) -> bytes:
    """Header of a DATA frame whose payload the caller appends (no copy of the payload)."""
    return FRAME_HEADER.pack(length << 8, flags, stream_id)


def settings_frame(settings: dict[int, int]) -> bytes:
    payload = b"".join(_SETTING.pack(k, v) for k, v in settings.items())
    return frame_header(len(payload), SETTINGS, 0, 0) + payload


SETTINGS_ACK: Final = frame_header(0, SETTINGS, FLAG_ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, stream_id) + _U32.pack(code)


def ping(payload: bytes, ack: bool = False) -> bytes:
    return frame_header(8, PING, FLAG_ACK if ack else 0, 0) + payload


def goaway(last_stream_id: int, code: int) -> bytes:
    return frame_header(8, GOAWAY, 0, 0) + _U32x2.pack(last_stream_id, code)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """A header block as HEADERS (+ CONTINUATION frames when it exceeds ``max_frame``)."""
    flags = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return [frame_header(len(block), HEADERS, flags | FLAG_END_HEADERS, stream_id), block]
    out = []
    ftype = HEADERS
    for off in range(0, len(block), max_frame):
        piece = block[off:off + max_frame]
        last = off + max_frame >= len(block)
        out.append(frame_header(len(piece), ftype, flags | (FLAG_END_HEADERS if last else 0),
                                stream_id))
        out.append(piece)
        ftype, flags = CONTINUATION, 0
    return out


def unpack_u32(data: bytes | memoryview, offset: int = 0) -> int:
    value: int = _U32.unpack_from(data, offset)[0]
    return value


def unpack_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, off) for off in range(0, len(payload), 6)]
