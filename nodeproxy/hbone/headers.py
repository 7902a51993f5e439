"""HPACK header blocks of HBONE (RFC 7541, via the ``hpack`` package) and their validation.

Encoding is stateless on purpose: every field is either a static-table reference (``:status
200``) or a literal *never indexed* (``hpack.NeverIndexedHeaderTuple``), so our encoder's
dynamic table stays empty forever. Consequences:
* the constant parts (``:method CONNECT``, each ``:status``) are encoded once and cached;
* one module-level encoder serves every connection (no per-connection encoder state);
* per-connection values (authority, baggage, forwarded, traceparent) never enter any
  dynamic table, ours or an intermediary's (RFC 7541 §7.1.3);
* a peer lowering SETTINGS_HEADER_TABLE_SIZE only needs a "size 0" update at the start of
  our next block (:data:`TABLE_SIZE_ZERO`), which is always within its limit.
Huffman coding is off for literals: it costs CPU per request and saves a few bytes of
mostly-digit values.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from hpack import Encoder, NeverIndexedHeaderTuple

#: HPACK "dynamic table size update" to 0 (RFC 7541 §6.3): valid at the start of any block.
TABLE_SIZE_ZERO: Final = b"\x20"

_ENCODER: Final = Encoder()

#: Request pseudo-headers RFC 9113 §8.3.1 allows (no :protocol: extended CONNECT is off).
_REQUEST_PSEUDO: Final = frozenset((":method", ":scheme", ":authority", ":path"))
#: Connection-specific fields HTTP/2 forbids (RFC 9113 §8.2.2); ``te`` is checked apart.
_CONNECTION_SPECIFIC: Final = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"))
_BAD_VALUE_CHARS: Final = ("\r", "\n", "\x00")

Headers = tuple[tuple[str, str], ...]


def encode_literals(headers: Sequence[tuple[str, str]]) -> bytes:
    """Never-indexed literals (names from the static table where they exist)."""
    if not headers:
        return b""
    return _ENCODER.encode([NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False)


#: ``:method CONNECT`` (constant: computed once).
CONNECT_METHOD: Final = encode_literals([(":method", "CONNECT")])


@lru_cache(maxsize=64)
def status_block(status: int) -> bytes:
    """``:status`` field (static-table index for 200, 204, 206, 304, 400, 404, 500)."""
    return _ENCODER.encode([NeverIndexedHeaderTuple(":status", str(status))], huffman=False)


def connect_block(authority: str, headers: Sequence[tuple[str, str]]) -> bytes:
    return CONNECT_METHOD + encode_literals([(":authority", authority), *headers])


def response_block(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    return status_block(status) + encode_literals(headers)


def check_outgoing(headers: Sequence[tuple[str, str]]) -> str | None:
    """Reason why extra (non-pseudo) headers a caller wants to send are not valid HTTP/2
    fields, or None. Checked because they are copied from other connections."""
    for name, value in headers:
        if not name or name != name.lower() or name.startswith(":") or " " in name:
            return f"invalid header name {name!r}"
        if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
            return f"connection-specific header {name!r} is not allowed in HTTP/2"
        if any(c in value for c in _BAD_VALUE_CHARS):
            return f"header {name!r} has a value with CR, LF or NUL"
    return None


def split_fields(headers: Headers, *, request: bool) -> tuple[dict[str, str], Headers, str | None]:
    """Pseudo-header dict, regular fields, and the reason the block is malformed (RFC 9113
    §8.2-8.3) or None."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in headers:
        if name.startswith(":"):
            if regular:
                return pseudo, (), f"pseudo-header {name} after regular fields"
            allowed = name in _REQUEST_PSEUDO if request else name == ":status"
            if not allowed:
                return pseudo, (), f"pseudo-header {name} not allowed here"
            if name in pseudo:
                return pseudo, (), f"duplicate pseudo-header {name}"
            pseudo[name] = value
        else:
            if name != name.lower() or not name:
                return pseudo, (), f"header name {name!r} is not lowercase"
            if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
                return pseudo, (), f"connection-specific header {name!r}"
            regular.append((name, value))
        if any(c in value for c in _BAD_VALUE_CHARS):
            return pseudo, (), f"header {name} has a value with CR, LF or NUL"
    return pseudo, tuple(regular), None


def assert_stateless() -> None:
    """The shared encoder never indexed anything (tests call this)."""
    assert len(_ENCODER.header_table.dynamic_entries) == 0
