"""Abuse limits of one HBONE server connection (sans-I/O, pure counting).

Two HTTP/2 attack classes cost a server work without costing the client anything:
* rapid reset (CVE-2023-44487): HEADERS then RST_STREAM before the server answered; each one
  starts an upstream dial that the client never waits for. We count streams the peer reset
  before we answered ("premature" resets, as Envoy calls them).
* control-frame floods (CVE-2019-9512/9515/9518): PING, SETTINGS, PRIORITY and empty DATA
  frames, each of which makes us queue an answer or do work.
Over a limit within one window, the connection ends with GOAWAY ENHANCE_YOUR_CALM, as Envoy
and nginx answer the same floods. Legitimate HBONE peers send a keepalive PING every ~10 s and
reset a stream before its 200 only when their own client gave up while dialling.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """Per-connection limits; ``window`` seconds is the counting window of both."""

    window: float = 10.0
    max_premature_resets: int = 200
    max_control_frames: int = 1000

    def __post_init__(self) -> None:
        if self.window <= 0 or self.max_premature_resets < 1 or self.max_control_frames < 1:
            raise ValueError(f"flood limits must be positive: {self}")


class WindowCounter:
    """Counts events in fixed windows of ``window`` seconds; ``hit`` says when over ``limit``.

    A fixed window (not sliding) is enough here: an attacker gains at most 2x the limit at a
    window edge, and the state is two numbers per connection."""

    __slots__ = ("_count", "_limit", "_start", "_window")

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._start: float | None = None
        self._count = 0

    def hit(self, now: float) -> bool:
        """Count one event at ``now``; True once the window holds more than the limit."""
        if self._start is None or now - self._start >= self._window:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count > self._limit

    @property
    def count(self) -> int:
        return self._count
