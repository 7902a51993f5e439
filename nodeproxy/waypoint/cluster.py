"""Per-destination state of the waypoint (Envoy's cluster): circuit breaker, outlier
detection, load balancer and active-request counts, over an endpoint set that follows the
config.  A cluster is a service (optionally a label subset of it) on one port, or a single
addressed workload.  Decisions live in the pure modules; this only holds their state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodeproxy.waypoint.balancer import Balancer, balancer_for
from nodeproxy.waypoint.breaker import BreakerLimits, CircuitBreaker
from nodeproxy.waypoint.outlier import OutlierDetector, OutlierParams
from nodeproxy.waypoint.upstream import Endpoint
from ztunnel_cfg.l7 import TrafficPolicy
from ztunnel_cfg.model import OutlierDetection


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """``service`` is a service key or ``pod:<ns>/<name>``; ``subset`` sorted label pairs."""

    service: str
    port: int
    subset: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in self.subset)
        return f"{self.service}:{self.port}" + (f"[{labels}]" if labels else "")


def breaker_limits(policy: TrafficPolicy) -> BreakerLimits:
    pool = policy.connection_pool
    return BreakerLimits.from_connection_pool(
        max_connections=pool.tcp.max_connections,
        http1_max_pending_requests=pool.http.http1_max_pending_requests,
        http2_max_requests=pool.http.http2_max_requests,
        max_retries=pool.http.max_retries,
    )


def outlier_params(config: OutlierDetection) -> OutlierParams:
    return OutlierParams(
        consecutive_5xx=config.consecutive_5xx_errors,
        consecutive_gateway=config.consecutive_gateway_errors,
        interval=config.interval,
        base_ejection=config.base_ejection_time,
        max_ejection_percent=config.max_ejection_percent,
        min_health_percent=config.min_health_percent,
    )


class Cluster:
    def __init__(self, key: ClusterKey, policy: TrafficPolicy, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, hostname: str = "") -> None:
        self.key = key
        # The destination_service label of its counters, as on istio_requests_total: the
        # service's hostname (a pod cluster keeps its key).
        self.hostname = hostname or key.service
        self.clock = clock
        self.rng = rng or random.Random()
        self.endpoints: dict[str, Endpoint] = {}
        self.active: dict[str, int] = {}
        self.breaker = CircuitBreaker(breaker_limits(policy))
        self.policy = policy
        self.balancer: Balancer = balancer_for(policy.load_balancer.value)
        self.outlier: OutlierDetector | None = None
        self.max_requests_per_connection = policy.connection_pool.http.max_requests_per_connection
        self._configure_outlier(policy)

    def _configure_outlier(self, policy: TrafficPolicy) -> None:
        config = policy.outlier_detection
        if config is None:
            self.outlier = None
            return
        params = outlier_params(config)
        if self.outlier is None or self.outlier.params != params:
            self.outlier = OutlierDetector(params, self.endpoints, now=self.clock())

    def update(self, policy: TrafficPolicy, endpoints: list[Endpoint]) -> None:
        """New config: endpoint set and policy; state of endpoints that remain is kept."""
        self.endpoints = {e.address: e for e in endpoints}
        for address in list(self.active):
            if address not in self.endpoints and self.active[address] == 0:
                del self.active[address]
        if policy != self.policy:
            self.breaker.reconfigure(breaker_limits(policy))
            if policy.load_balancer != self.policy.load_balancer:
                self.balancer = balancer_for(policy.load_balancer.value)
            self.max_requests_per_connection = (
                policy.connection_pool.http.max_requests_per_connection)
            self.policy = policy
        self._configure_outlier(policy)
        if self.outlier is not None:
            self.outlier.update_endpoints(self.endpoints)

    def available(self) -> tuple[str, ...]:
        """Endpoints load balancing may use now (ejected ones left out)."""
        if self.outlier is None:
            return tuple(self.endpoints)
        return self.outlier.available(self.endpoints, self.clock())

    def pick(self, exclude: set[str]) -> Endpoint | None:
        candidates = self.available()
        if not candidates:
            return None
        chosen = self.balancer.pick(candidates, self.active, self.rng.random, exclude)
        return self.endpoints[chosen] if chosen is not None else None

    def started(self, address: str) -> None:
        self.active[address] = self.active.get(address, 0) + 1

    def finished(self, address: str) -> None:
        left = self.active.get(address, 1) - 1
        if left <= 0 and address not in self.endpoints:
            self.active.pop(address, None)
        else:
            self.active[address] = max(left, 0)

    def record(self, address: str, status_or_failure: int | str) -> str | None:
        """Feed outlier detection; returns the ejection reason when this ejected the host."""
        if self.outlier is None or address not in self.endpoints:
            return None
        ejection = self.outlier.record(address, status_or_failure, self.clock())
        return ejection.reason if ejection is not None else None

    def dump(self) -> dict[str, object]:
        now = self.clock()
        health = {row["endpoint"]: row for row in self.outlier.snapshot(now)} \
            if self.outlier is not None else {}
        return {
            "cluster": str(self.key),
            "trafficPolicy": self.policy.policy,
            "loadBalancer": self.balancer.name,
            "circuitBreaker": {kind: {"active": u.active, "limit": u.limit,
                                      "overflows": u.overflows}
                               for kind, u in self.breaker.stats().items()},
            "outlierDetection": self.outlier is not None,
            "endpoints": [
                {"address": address, "workload": e.workload.key,
                 "activeRequests": self.active.get(address, 0),
                 **({"health": health[address]} if address in health else {})}
                for address, e in self.endpoints.items()
            ],
        }
