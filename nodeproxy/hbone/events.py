"""Events produced by :class:`nodeproxy.hbone.protocol.HboneConnection` (frozen, slotted)."""

from __future__ import annotations

from dataclasses import dataclass

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every HBONE event."""


@dataclass(frozen=True, slots=True)
class ConnectRequest(Event):
    """Server side: a valid CONNECT arrived; answer with ``respond(stream_id, status)``."""

    stream_id: int
    authority: str
    headers: Headers
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class BadRequest(Event):
    """Server side: a request that is not a valid HBONE CONNECT. The layer already answered
    400 (END_STREAM); the event is informational (logging / metrics)."""

    stream_id: int
    reason: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class ConnectResponse(Event):
    """Client side: the response to our CONNECT. Anything but 200 is a failed tunnel."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamData(Event):
    """Tunnel bytes. The consumer calls ``acknowledge(stream_id, len(data))`` once processed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream (END_STREAM): no more data will arrive."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream was reset (``remote``: by the peer's RST_STREAM, or refused by GOAWAY)."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamClosed(Event):
    """Both halves of the stream are closed; its state may be forgotten."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowOpened(Event):
    """Send window grew: on one stream, or on all (``stream_id`` None: connection/settings)."""

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class GoAway(Event):
    """The peer is going away: no new streams; streams up to ``last_stream_id`` continue."""

    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionError(Event):
    """Fatal: protocol violation, keepalive timeout... GOAWAY bytes are queued; flush them
    and close the transport. ``kind`` names abuse classes for metrics: ``protocol``,
    ``keepalive``, ``reset_flood`` or ``control_flood``."""

    reason: str
    error_code: int
    kind: str = "protocol"
