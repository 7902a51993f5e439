"""Outlier detection for one cluster: Envoy's consecutive-5xx and consecutive-gateway-failure
detectors with Istio's DestinationRule defaults.  Pure state; the caller passes the time.

What counts (Envoy's default mode, split_external_local_origin_errors false): a response is
recorded by its status; a locally originated failure is mapped to a status first, as
``DetectorHostMonitorImpl::resultToHttpCode`` and the router do: a connect failure or any
upstream reset (refused stream included) is a 503, a timeout (per try or route) a 504, so
both also count as gateway failures.  A response below 500 resets both counters; a 5xx
that is not 502/503/504 resets only the gateway counter.  Circuit-breaker overflows (local
503 UO) must not be recorded: Envoy ignores them so as not to eject hosts of an overloaded
cluster.

Ejection happens inline, on exactly the Nth consecutive error (a threshold of 0 never
fires), then that detector's counter restarts; a host already ejected is left alone.
It is refused when ``100 * (ejected + 1) / hosts > max_ejection_percent`` — Envoy >= 1.31
enforces the cap strictly (envoyproxy/envoy#27624, #27909); before that the first ejection
always went through.  ``always_eject_one_host`` (#34796) restores that, but Istio never sets
it (pilot cluster_traffic_policy.go applyOutlierDetection), so with Istio's 10 % default a
cluster of fewer than 10 endpoints ejects nothing; set maxEjectionPercent for small ones.

An ejected host stays out for ``min(base_ejection * multiplier, max_ejection)`` where the
multiplier grows by one per ejection (Envoy stops it one step past the cap) and
``max_ejection`` is Envoy's max_ejection_time, default max(300 s, base); Istio does not
expose it.  Hosts come back only at an interval sweep (``onIntervalTimer``): sweeps run on
a fixed grid every ``interval`` from the first time seen, and every method that takes
``now`` first runs the sweeps that are due, so results do not depend on when the caller's
timer fires.  At each sweep a host that is not ejected and was un-ejected at least one
interval ago has its multiplier lowered by one.

Panic (``available``): Istio maps minHealthPercent to Envoy's healthy_panic_threshold.
When the healthy share of the endpoints is *below* it, every endpoint is used, ejected or
not.  With Istio's default 0 % panic never happens: if every endpoint is ejected
(possible only with maxEjectionPercent 100), ``available`` is empty and the caller answers
503 with response flag ``UH`` (no healthy upstream), as Envoy does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

EjectionReason = Literal["consecutive_5xx", "consecutive_gateway_failure"]
EJECTION_REASONS: tuple[EjectionReason, ...] = ("consecutive_5xx", "consecutive_gateway_failure")

#: Locally originated failures and the status Envoy records for them.
LOCAL_FAILURE_STATUS: Mapping[str, int] = {
    "connect_failure": 503,
    "refused_stream": 503,
    "reset": 503,
    "per_try_timeout": 504,
    "timeout": 504,
}
_GATEWAY_ERRORS = frozenset((502, 503, 504))
_DEFAULT_MAX_EJECTION = 300.0  # Envoy's max_ejection_time default (seconds)


@dataclass(frozen=True, slots=True)
class OutlierParams:
    """A DestinationRule ``outlierDetection`` with Istio's defaults (seconds, percents)."""

    consecutive_5xx: int = 5
    #: 0 = off (Istio's default).
    consecutive_gateway: int = 0
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: int = 10
    #: Envoy healthy_panic_threshold; 0 = never panic.
    min_health_percent: int = 0
    #: Envoy max_ejection_time; None = max(300 s, base_ejection).
    max_ejection: float | None = None
    #: Envoy always_eject_one_host (Istio leaves it off).
    always_eject_one_host: bool = False

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway"):
            if getattr(self, name) < 0:
                raise ValueError(f"outlier detection {name} must be 0 (off) or more, "
                                 f"not {getattr(self, name)}")
        for name in ("interval", "base_ejection"):
            if getattr(self, name) <= 0:
                raise ValueError(f"outlier detection {name} must be positive seconds, "
                                 f"not {getattr(self, name)}")
        for name in ("max_ejection_percent", "min_health_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"outlier detection {name} must be between 0 and 100, "
                                 f"not {getattr(self, name)}")
        if self.max_ejection is not None and self.max_ejection < self.base_ejection:
            # Envoy refuses the cluster with the same complaint.
            raise ValueError(f"outlier detection max_ejection ({self.max_ejection} s) cannot "
                             f"be smaller than base_ejection ({self.base_ejection} s)")

    @property
    def ejection_cap(self) -> float:
        if self.max_ejection is not None:
            return self.max_ejection
        return max(_DEFAULT_MAX_EJECTION, self.base_ejection)


@dataclass(frozen=True, slots=True)
class Ejection:
    """A host taken out of load balancing by :meth:`OutlierDetector.record`."""

    endpoint: str
    reason: EjectionReason
    at: float
    #: Seconds it stays out at least; it returns at the first sweep after ``at + duration``.
    duration: float
    times_ejected: int

    @property
    def eligible_at(self) -> float:
        return self.at + self.duration


@dataclass(frozen=True, slots=True)
class OutlierCounters:
    """What the runtime exports as metrics for the cluster."""

    #: Ejections carried out, by reason.
    ejections_total: Mapping[str, int]
    #: Ejections detected but refused by max_ejection_percent (Envoy ejections_overflow).
    ejections_overflow: int
    #: Hosts ejected now (gauge).
    ejections_active: int
    unejections_total: int


class _Host:
    """Per-endpoint detector state (Envoy's DetectorHostMonitorImpl)."""

    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected", "ejected_at",
                 "multiplier", "times_ejected", "unejected_at")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected = False
        self.ejected_at = 0.0
        self.unejected_at: float | None = None
        self.times_ejected = 0
        self.multiplier = 0  # Envoy's ejectTimeBackoff


class OutlierDetector:
    """One cluster's outlier detection state machine."""

    def __init__(self, params: OutlierParams, endpoints: Iterable[str], *,
                 now: float | None = None) -> None:
        self._params = params
        self._hosts: dict[str, _Host] = {endpoint: _Host() for endpoint in endpoints}
        self._ejected = 0
        self._next_sweep = None if now is None else now + params.interval
        self._unejected_since_sweep: list[str] = []
        self._ejections_total: dict[str, int] = dict.fromkeys(EJECTION_REASONS, 0)
        self._overflow = 0
        self._unejections = 0

    @property
    def params(self) -> OutlierParams:
        return self._params

    @property
    def next_sweep(self) -> float | None:
        """When the next interval sweep is due (None until a time was seen)."""
        return self._next_sweep

    # -- results ------------------------------------------------------------------------------
    def record(self, endpoint: str, status_or_failure: int | str, now: float) -> Ejection | None:
        """Record how one request to ``endpoint`` ended: an HTTP status, or one of
        :data:`LOCAL_FAILURE_STATUS`.  Returns the ejection it caused, if any."""
        if isinstance(status_or_failure, str):
            try:
                status = LOCAL_FAILURE_STATUS[status_or_failure]
            except KeyError:
                raise ValueError(f"unknown failure {status_or_failure!r} for outlier detection; "
                                 f"use an HTTP status or one of "
                                 f"{', '.join(LOCAL_FAILURE_STATUS)}") from None
        else:
            status = status_or_failure
        self._catch_up(now)
        host = self._hosts.get(endpoint)
        if host is None:  # removed while the request was in flight
            return None
        if not 500 <= status <= 599:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return None
        fired: list[EjectionReason] = []
        if status in _GATEWAY_ERRORS:
            host.consecutive_gateway += 1
            if host.consecutive_gateway == self._params.consecutive_gateway:
                fired.append("consecutive_gateway_failure")
        else:
            host.consecutive_gateway = 0
        host.consecutive_5xx += 1
        if host.consecutive_5xx == self._params.consecutive_5xx:
            fired.append("consecutive_5xx")
        ejection = None
        # Envoy handles the gateway event first; the second finds the host ejected and is
        # dropped without resetting its counter.
        for reason in fired:
            if host.ejected:
                continue
            ejection = self._eject(endpoint, host, reason, now) or ejection
            if reason == "consecutive_5xx":
                host.consecutive_5xx = 0
            else:
                host.consecutive_gateway = 0
        return ejection

    def _eject(self, endpoint: str, host: _Host, reason: EjectionReason,
               now: float) -> Ejection | None:
        params = self._params
        within_cap = 100 * (self._ejected + 1) <= params.max_ejection_percent * len(self._hosts)
        if not within_cap and not (params.always_eject_one_host and self._ejected == 0):
            self._overflow += 1
            return None
        host.ejected = True
        host.ejected_at = now
        host.times_ejected += 1
        self._ejected += 1
        self._ejections_total[reason] += 1
        # Envoy grows the multiplier while base x multiplier < cap + base: one step past cap.
        if host.multiplier * params.base_ejection < params.ejection_cap + params.base_ejection:
            host.multiplier += 1
        return Ejection(endpoint, reason, now, self._ejection_time(host), host.times_ejected)

    def _ejection_time(self, host: _Host) -> float:
        return min(self._params.base_ejection * host.multiplier, self._params.ejection_cap)

    # -- sweeps -------------------------------------------------------------------------------
    def sweep(self, now: float) -> list[str]:
        """Run the sweeps due by ``now``; return the endpoints un-ejected since the last call
        (including by sweeps that other calls ran on the way)."""
        self._catch_up(now)
        unejected, self._unejected_since_sweep = self._unejected_since_sweep, []
        return unejected

    def _catch_up(self, now: float) -> None:
        if self._next_sweep is None:
            self._next_sweep = now + self._params.interval
            return
        interval = self._params.interval
        while self._next_sweep <= now:
            if self._ejected == 0 and not any(host.multiplier for host in self._hosts.values()):
                # Nothing a sweep could change: skip the missed ones in one step.
                missed = math.floor((now - self._next_sweep) / interval) + 1
                self._next_sweep += missed * interval
                continue
            self._sweep_at(self._next_sweep)
            self._next_sweep += interval

    def _sweep_at(self, when: float) -> None:
        for endpoint, host in self._hosts.items():
            if host.ejected and self._ejection_time(host) <= when - host.ejected_at:
                host.ejected = False
                host.unejected_at = when
                # Fresh counters, so a host close to a trigger is not re-ejected at once.
                host.consecutive_5xx = 0
                host.consecutive_gateway = 0
                self._ejected -= 1
                self._unejections += 1
                self._unejected_since_sweep.append(endpoint)
        for host in self._hosts.values():
            if (not host.ejected and host.multiplier and host.unejected_at is not None
                    and when - host.unejected_at >= self._params.interval):
                host.multiplier -= 1

    # -- queries ------------------------------------------------------------------------------
    def is_ejected(self, endpoint: str, now: float) -> bool:
        self._catch_up(now)
        host = self._hosts.get(endpoint)
        return host is not None and host.ejected

    def available(self, endpoints: Iterable[str], now: float) -> tuple[str, ...]:
        """The endpoints load balancing may use now: the healthy ones, or all of them in
        panic (healthy share below min_health_percent).  Empty when every endpoint is
        ejected and panic is off: the caller answers 503 UH."""
        self._catch_up(now)
        candidates = tuple(endpoints)
        if self._ejected == 0:
            return candidates
        healthy = tuple(endpoint for endpoint in candidates if not self._flagged(endpoint))
        if self._panics(len(healthy), len(candidates)):
            return candidates
        return healthy

    def in_panic(self, endpoints: Iterable[str], now: float) -> bool:
        """Whether :meth:`available` ignores ejections for these endpoints now."""
        self._catch_up(now)
        candidates = tuple(endpoints)
        healthy = sum(1 for endpoint in candidates if not self._flagged(endpoint))
        return self._panics(healthy, len(candidates))

    def _panics(self, healthy: int, total: int) -> bool:
        # Envoy isHostSetInPanic: healthy% < threshold, with 0 hosts counting as 0 %.
        return total > 0 and 100 * healthy < self._params.min_health_percent * total

    def _flagged(self, endpoint: str) -> bool:
        host = self._hosts.get(endpoint)
        return host is not None and host.ejected

    # -- membership ---------------------------------------------------------------------------
    def update_endpoints(self, endpoints: Iterable[str]) -> None:
        """A new endpoint set: endpoints that stay keep their state, new ones start clean,
        removed ones are forgotten (an ejected one no longer counts against the cap)."""
        hosts = self._hosts
        self._hosts = {endpoint: hosts.get(endpoint) or _Host() for endpoint in endpoints}
        self._ejected = sum(1 for host in self._hosts.values() if host.ejected)

    # -- export -------------------------------------------------------------------------------
    def counters(self) -> OutlierCounters:
        return OutlierCounters(dict(self._ejections_total), self._overflow, self._ejected,
                               self._unejections)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Per-endpoint state for /config_dump, sorted by endpoint.  ``ejected_until`` is the
        sweep that will return the host (same clock as ``now``)."""
        self._catch_up(now)
        rows: list[dict[str, object]] = []
        for endpoint in sorted(self._hosts):
            host = self._hosts[endpoint]
            until = self._return_time(host) if host.ejected else None
            rows.append({
                "endpoint": endpoint,
                "ejected": host.ejected,
                "ejected_until": until,
                "seconds_left": None if until is None else max(until - now, 0.0),
                "times_ejected": host.times_ejected,
                "ejection_multiplier": host.multiplier,
                "consecutive_5xx": host.consecutive_5xx,
                "consecutive_gateway_errors": host.consecutive_gateway,
            })
        return rows

    def _return_time(self, host: _Host) -> float:
        eligible = host.ejected_at + self._ejection_time(host)
        next_sweep = self._next_sweep
        if next_sweep is None or eligible <= next_sweep:
            return eligible if next_sweep is None else next_sweep
        interval = self._params.interval
        # A hair of slack so float noise does not push the answer one interval late.
        steps = math.ceil((eligible - next_sweep) / interval - 1e-9)
        return next_sweep + steps * interval


__all__ = [
    "EJECTION_REASONS", "LOCAL_FAILURE_STATUS", "Ejection", "EjectionReason", "OutlierCounters",
    "OutlierDetector", "OutlierParams",
]
