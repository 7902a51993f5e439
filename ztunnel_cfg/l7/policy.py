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

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "RETRY_ON_VALUES", "RetryPolicy", "TrafficPolicy",
           "parse_retry_on", "retry_policy", "timeouts", "traffic_policy"]

# Envoy caps the jittered exponential back-off at 10x its base.
BACKOFF_MAX_FACTOR = 10

# Envoy's retry_on conditions (``x-envoy-retry-on`` and ``x-envoy-retry-grpc-on`` names) that
# the waypoint evaluates (nodeproxy.waypoint.retry); the config's RetryOn values are a subset.
RETRY_ON_VALUES: frozenset[str] = frozenset((
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes", "cancelled", "deadline-exceeded", "resource-exhausted",
    "internal", "unavailable",
))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry policy, resolved (Istio HTTPRetry / Gateway API HTTPRouteRetry with
    Istio's defaults): ``attempts`` retries after the first try (0: none), on ``retry_on``
    conditions or a response status in ``codes``.  The one declaration of the schema: config
    resolution (:func:`retry_policy`, ``explain``) and the waypoint's data path use it."""

    #: Retries after the first try (Envoy num_retries); 0 disables retries.
    attempts: int
    #: Envoy retry_on conditions (:data:`RETRY_ON_VALUES`).
    retry_on: frozenset[str]
    #: Status codes for ``retriable-status-codes`` (ignored without that condition, as Envoy).
    codes: frozenset[int] = frozenset()
    #: Seconds; the first back-off is drawn from [0, base), doubling per retry.
    backoff_base: float = DEFAULT_RETRY_BACKOFF
    #: Seconds one try may take; None: each try may use the rest of the request.
    per_try_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"retry attempts must be 0 or more, not {self.attempts}")
        unknown = sorted(set(self.retry_on) - RETRY_ON_VALUES)
        if unknown:
            raise ValueError(f"unknown retry_on value(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(RETRY_ON_VALUES))}")
        bad_codes = sorted(code for code in self.codes if not 100 <= code <= 599)
        if bad_codes:
            raise ValueError(f"retriable status codes must be HTTP statuses 100-599, "
                             f"not {bad_codes}")
        if self.backoff_base <= 0:
            raise ValueError(f"retry backoff base must be positive, not {self.backoff_base}")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError(f"per-try timeout must be positive, not {self.per_try_timeout}")

    @property
    def backoff_max(self) -> float:
        """Seconds; the cap of the back-off interval (Envoy's default, 10 x base: Istio
        gives no way to set it)."""
        return self.backoff_base * BACKOFF_MAX_FACTOR

    @classmethod
    def from_retry_on(cls, attempts: int, retry_on: str, *,
                      backoff_base: float = DEFAULT_RETRY_BACKOFF,
                      per_try_timeout: float | None = None) -> RetryPolicy:
        """Build from Istio's ``retryOn`` string: integers are status codes, and naming a
        code implies ``retriable-status-codes`` (pilot's parseRetryOn)."""
        conditions, codes = parse_retry_on(retry_on)
        return cls(attempts=attempts, retry_on=conditions, codes=codes,
                   backoff_base=backoff_base, per_try_timeout=per_try_timeout)


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """Split ``"5xx,reset,503"`` into conditions and codes like Istio's parseRetryOn."""
    conditions: set[str] = set()
    codes: set[int] = set()
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        if part.isdigit():
            codes.add(int(part))
        else:
            conditions.add(part)
    if codes:
        conditions.add("retriable-status-codes")
    return frozenset(conditions), frozenset(codes)


# Istio's default: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
# with no codes since 503 left the defaults (Exclude503FromDefaultRetries); without codes the
# retriable-status-codes condition matches nothing, so it is left out here.
DEFAULT_RETRY = RetryPolicy(
    attempts=DEFAULT_RETRY_ATTEMPTS,
    retry_on=frozenset(c.value for c in DEFAULT_RETRY_ON),
    backoff_base=DEFAULT_RETRY_BACKOFF,
)
NO_RETRY = RetryPolicy(attempts=0, retry_on=frozenset())


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
        per_try = _per_try(rule)
        if per_try is None:
            return DEFAULT_RETRY  # the common case, once per request: not rebuilt
        return RetryPolicy(
            attempts=DEFAULT_RETRY.attempts,
            retry_on=DEFAULT_RETRY.retry_on,
            backoff_base=DEFAULT_RETRY.backoff_base,
            per_try_timeout=per_try,
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
