"""Give memory back to the system after a load peak.

glibc keeps freed heap pages mapped: after 10,000 tunnels close, the agent's RSS stays near its
peak although Python freed the objects. A full garbage collection (closed connections leave
reference cycles) followed by ``malloc_trim(0)`` returns what glibc holds. Both block the event
loop for tens of milliseconds, so they run only after a real drop in open connections, at most
once per check interval. CPython's own small-object arenas are returned only when entirely
empty, so part of a peak stays mapped (and is reused by the next peak): measured in
docs/abuse-figures.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("nodeproxy.memory")

Trim = Callable[[], bool]


def glibc_trim() -> Trim | None:
    """``malloc_trim(0)`` when the C library has it (glibc), else None (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> bool:
        return bool(trim(0))

    return run


@dataclass
class TrimPolicy:
    """Trim when open connections fell by at least ``min_drop`` and to at most half of the
    peak seen since the last trim (pure bookkeeping; :meth:`observe` decides)."""

    min_drop: int = 1000
    peak: int = 0

    def observe(self, open_now: int) -> bool:
        self.peak = max(self.peak, open_now)
        if self.peak - open_now >= self.min_drop and open_now * 2 <= self.peak:
            self.peak = open_now
            return True
        return False


class MemoryReleaser:
    def __init__(self, open_connections: Callable[[], int], trim: Trim | None,
                 policy: TrimPolicy | None = None,
                 collect: Callable[[], int] = gc.collect) -> None:
        self._open = open_connections
        self._trim = trim
        self._collect = collect
        self.policy = policy or TrimPolicy()
        self.trims = 0

    def tick(self) -> bool:
        """Called periodically; True if memory was trimmed."""
        if self._trim is None or not self.policy.observe(self._open()):
            return False
        self._collect()
        released = self._trim()
        self.trims += 1
        log.info("released freed memory to the system after a drop in connections "
                 "(malloc_trim: %s)", "pages returned" if released else "nothing to return",
                 extra={"component": "agent"})
        return True
