"""Circuit-breaker accounting per cluster, as Envoy's cluster resource manager.

Four gauges, each with a limit; ``try_acquire_*`` returns False on overflow and counts it.
What the caller does on overflow follows Envoy:

* requests (``http2MaxRequests``) and pending requests (``http1MaxPendingRequests``):
  answer 503 at once with response flag ``UO``;
* retries (``maxRetries``): do not retry, return the last upstream response (flag ``UO``);
* connections (``tcp.maxConnections``): do not open another upstream connection: an HTTP
  request waits as pending for a pooled one (bounded by the pending limit), a TCP stream is
  refused (503 ``UO``).

``maxRequestsPerConnection`` is not a gauge: a connection is retired after N requests
(:func:`connection_exhausted`).  Istio sets every threshold to 2^32-1 unless the
DestinationRule says otherwise (pilot cluster_traffic_policy.go, getDefaultCircuitBreaker
Thresholds); Envoy's own defaults (1024 / 3 retries) never apply to a mesh cluster.

Single event loop: plain ints, no locks.  Every successful acquire must be released exactly
once; releasing more than was acquired is a bug and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UNLIMITED = 2**32 - 1

BreakerKind = Literal["connections", "pending_requests", "requests", "retries"]
BREAKER_KINDS: tuple[BreakerKind, ...] = ("connections", "pending_requests", "requests",
                                          "retries")


@dataclass(frozen=True, slots=True)
class BreakerLimits:
    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED

    def __post_init__(self) -> None:
        for kind in BREAKER_KINDS:
            value = self.limit(kind)
            if not 0 <= value <= UNLIMITED:
                raise ValueError(f"circuit breaker max_{kind} must be between 0 and 2^32-1, "
                                 f"not {value}")

    def limit(self, kind: BreakerKind) -> int:
        return {
            "connections": self.max_connections,
            "pending_requests": self.max_pending_requests,
            "requests": self.max_requests,
            "retries": self.max_retries,
        }[kind]

    @classmethod
    def from_connection_pool(
        cls, *, max_connections: int | None = None, http1_max_pending_requests: int | None = None,
        http2_max_requests: int | None = None, max_retries: int | None = None,
    ) -> BreakerLimits:
        """Map DestinationRule ``connectionPool`` fields as Istio does: only a value above 0
        overrides the 2^32-1 default (Istio cannot tell 0 from unset)."""
        def pick(value: int | None) -> int:
            return value if value is not None and value > 0 else UNLIMITED
        return cls(max_connections=pick(max_connections),
                   max_pending_requests=pick(http1_max_pending_requests),
                   max_requests=pick(http2_max_requests),
                   max_retries=pick(max_retries))


@dataclass(frozen=True, slots=True)
class BreakerUsage:
    """One gauge as the runtime exports it (metrics, /config_dump)."""

    active: int
    limit: int
    overflows: int

    @property
    def remaining(self) -> int:
        return max(self.limit - self.active, 0)


class _Gauge:
    __slots__ = ("active", "kind", "limit", "overflows")

    def __init__(self, kind: BreakerKind, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.active = 0
        self.overflows = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:  # Envoy's canCreate(): current < max
            self.overflows += 1
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active <= 0:
            raise ValueError(f"circuit breaker: released more {self.kind} than were acquired "
                             "(a release without its acquire)")
        self.active -= 1


class CircuitBreaker:
    """The four gauges of one cluster (one service, or one subset of it)."""

    __slots__ = ("_connections", "_limits", "_pending", "_requests", "_retries")

    def __init__(self, limits: BreakerLimits = BreakerLimits()) -> None:
        self._limits = limits
        self._connections = _Gauge("connections", limits.max_connections)
        self._pending = _Gauge("pending_requests", limits.max_pending_requests)
        self._requests = _Gauge("requests", limits.max_requests)
        self._retries = _Gauge("retries", limits.max_retries)

    @property
    def limits(self) -> BreakerLimits:
        return self._limits

    def reconfigure(self, limits: BreakerLimits) -> None:
        """New limits from a config reload; what is in flight stays counted, so a lowered
        limit refuses new work until enough of it finishes."""
        self._limits = limits
        for gauge in self._gauges():
            gauge.limit = limits.limit(gauge.kind)

    def try_acquire_connection(self) -> bool:
        return self._connections.try_acquire()

    def connection_room(self) -> bool:
        """Whether another connection may open now (nothing acquired, nothing counted)."""
        return self._connections.active < self._connections.limit

    def release_connection(self) -> None:
        self._connections.release()

    def try_acquire_pending(self) -> bool:
        return self._pending.try_acquire()

    def release_pending(self) -> None:
        self._pending.release()

    def try_acquire_request(self) -> bool:
        return self._requests.try_acquire()

    def release_request(self) -> None:
        self._requests.release()

    def try_acquire_retry(self) -> bool:
        return self._retries.try_acquire()

    def release_retry(self) -> None:
        self._retries.release()

    def stats(self) -> dict[BreakerKind, BreakerUsage]:
        return {gauge.kind: BreakerUsage(gauge.active, gauge.limit, gauge.overflows)
                for gauge in self._gauges()}

    def _gauges(self) -> tuple[_Gauge, ...]:
        return (self._connections, self._pending, self._requests, self._retries)


def connection_exhausted(requests_done: int, max_requests_per_connection: int) -> bool:
    """Whether a connection that has carried ``requests_done`` requests must be retired
    (not reused) under ``maxRequestsPerConnection``; 0 means unlimited, 1 disables
    keep-alive."""
    return 0 < max_requests_per_connection <= requests_done


__all__ = [
    "BREAKER_KINDS", "UNLIMITED", "BreakerKind", "BreakerLimits", "BreakerUsage",
    "CircuitBreaker", "connection_exhausted",
]
