"""Retry, timeouts and per-service traffic policy in force, Istio's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ztunnel_cfg.model import (
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_ON,
    ConnectionPool,
    LoadBalancerPolicy,
    OutlierDetection,
    RetryOn,
    RouteRule,
    Service,
)

if TYPE_CHECKING:  # the snapshot imports this package (its route table)
    from ztunnel_cfg.snapshot import Snapshot

__all__ = ["RetryPolicy", "TrafficPolicy", "retry_policy", "timeouts", "traffic_policy"]

# Envoy caps the jittered exponential back-off at 10x its base.
BACKOFF_MAX_FACTOR = 10


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` retries after the first try (0: none), on ``retry_on`` conditions or a
    response status in ``codes``."""

    attempts: int
    retry_on: frozenset[str]
    codes: frozenset[int]
    backoff_base: float  # seconds
    per_try_timeout: float | None  # seconds; None: each try may use the rest of the request

    @property
    def backoff_max(self) -> float:
        return self.backoff_base * BACKOFF_MAX_FACTOR


def _per_try(rule: RouteRule | None) -> float | None:
    if rule is None:
        return None
    if rule.timeouts is not None and rule.timeouts.backend_request:
        return rule.timeouts.backend_request
    if rule.retry is not None:
        return rule.retry.per_try_timeout
    return None


def retry_policy(rule: RouteRule | None) -> RetryPolicy:
    """The rule's retry, or Istio's default (2 retries on connect-failure, refused-stream,
    unavailable, cancelled; 503 not retried; 25 ms back-off base).  ``rule`` None: default."""
    retry = rule.retry if rule is not None else None
    if retry is None:
        return RetryPolicy(
            attempts=DEFAULT_RETRY_ATTEMPTS,
            retry_on=frozenset(c.value for c in DEFAULT_RETRY_ON),
            codes=frozenset(),
            backoff_base=DEFAULT_RETRY_BACKOFF,
            per_try_timeout=_per_try(rule),
        )
    retry_on = {c.value for c in retry.retry_on}
    if retry.codes:
        retry_on.add(RetryOn.RETRIABLE_STATUS_CODES.value)
    return RetryPolicy(
        attempts=retry.attempts,
        retry_on=frozenset(retry_on),
        codes=frozenset(retry.codes),
        backoff_base=retry.backoff,
        per_try_timeout=_per_try(rule),
    )


def timeouts(rule: RouteRule | None) -> tuple[float | None, float | None]:
    """(request timeout, per-try timeout) in seconds; None: none (Istio: no route timeout
    unless set).  A timeout of 0 in the config means none."""
    request = rule.timeouts.request if rule is not None and rule.timeouts is not None else None
    return (request or None, _per_try(rule))


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """What applies to connections and requests to ``service``.

    ``outlier_detection`` None: off (as Istio, only a trafficPolicy that gives
    ``outlierDetection`` turns it on, then with its defaults for what it leaves out).
    """

    service: str
    policy: str | None  # "ns/name" of the trafficPolicies entry; None: built-in defaults
    connection_pool: ConnectionPool
    outlier_detection: OutlierDetection | None
    load_balancer: LoadBalancerPolicy


_DEFAULT_POOL = ConnectionPool()


def traffic_policy(snapshot: Snapshot, service: Service | str) -> TrafficPolicy:
    """The service's trafficPolicy with every default filled in."""
    key = service if isinstance(service, str) else service.key
    config = snapshot.traffic_policy_config(key)
    if config is None:
        return TrafficPolicy(key, None, _DEFAULT_POOL, None, LoadBalancerPolicy.LEAST_REQUEST)
    return TrafficPolicy(
        service=key,
        policy=config.key,
        connection_pool=config.connection_pool or _DEFAULT_POOL,
        outlier_detection=config.outlier_detection,
        load_balancer=(
            config.load_balancer.simple
            if config.load_balancer is not None
            else LoadBalancerPolicy.LEAST_REQUEST
        ),
    )
