"""Retry decisions of the waypoint: Envoy's router retry semantics, as Istio configures them.

Pure functions over frozen values; the caller owns the clock, the random source and the
circuit breaker.  One request's retry loop looks like::

    decision = should_retry(policy, outcome, retries_done, replayable=..., budget_ok=...)
    if decision.retry:
        await asyncio.sleep(backoff(retries_done, policy, rng.random()))
        endpoint = balancer.pick(endpoints, active, rng.random, exclude=tried)

Sources (read, not copied): envoy source/common/router/retry_state_impl.cc
(``wouldRetryFromHeaders``, ``wouldRetryFromReset``, ``shouldRetry``), router.cc (a per-try
timeout is a local reset), backoff_strategy.cc (fully jittered exponential back-off) and
istio pilot/pkg/networking/core/route/retry/retry.go (the default policy).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

# The policy's schema is declared once, with the config resolution that builds it.
from ztunnel_cfg.l7.policy import (
    DEFAULT_RETRY,
    NO_RETRY,
    RETRY_ON_VALUES,
    RetryPolicy,
    parse_retry_on,
)

# How one try ended.  A per-try timeout is a local stream reset in Envoy, so it is retried
# by the same policies as a reset (5xx, gateway-error, reset), never by connect-failure.
OutcomeKind = Literal["response", "connect_failure", "refused_stream", "reset", "per_try_timeout"]
OUTCOME_KINDS: frozenset[str] = frozenset(
    ("response", "connect_failure", "refused_stream", "reset", "per_try_timeout"))

# gRPC status codes Envoy can retry on (read from the response headers / trailers-only).
GRPC_CANCELLED = 1
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
_GRPC_RETRY_ON = {
    "cancelled": GRPC_CANCELLED,
    "deadline-exceeded": GRPC_DEADLINE_EXCEEDED,
    "resource-exhausted": GRPC_RESOURCE_EXHAUSTED,
    "internal": GRPC_INTERNAL,
    "unavailable": GRPC_UNAVAILABLE,
}
GATEWAY_ERRORS = frozenset((502, 503, 504))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one try ended: a response (HTTP status, gRPC status if any) or a failure."""

    kind: OutcomeKind
    status: int | None = None
    grpc_status: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"unknown outcome kind {self.kind!r}; "
                             f"known: {', '.join(sorted(OUTCOME_KINDS))}")
        if self.kind == "response" and self.status is None:
            raise ValueError("a response outcome needs its HTTP status")

    @classmethod
    def response(cls, status: int, grpc_status: int | None = None) -> Outcome:
        return cls("response", status, grpc_status)

    def describe(self) -> str:
        if self.kind == "response":
            grpc = f" (grpc-status {self.grpc_status})" if self.grpc_status is not None else ""
            return f"upstream answered {self.status}{grpc}"
        return {
            "connect_failure": "connecting to the endpoint failed",
            "refused_stream": "the endpoint refused the stream (REFUSED_STREAM)",
            "reset": "the endpoint reset the request",
            "per_try_timeout": "the try hit its per-try timeout",
        }[self.kind]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    #: One line for operators (access log, explain): what happened and why.
    reason: str
    #: Envoy response flag when retrying stops for a limit: URX (retry limit), UO (breaker).
    response_flag: str | None = None


def _matching_condition(policy: RetryPolicy, outcome: Outcome) -> str | None:
    """The retry_on condition that makes ``outcome`` retriable, or None (Envoy's
    wouldRetryFromHeaders / wouldRetryFromReset, in their order)."""
    on = policy.retry_on
    if outcome.kind == "response":
        status = outcome.status or 0
        if "5xx" in on and 500 <= status <= 599:
            return "5xx"
        if "gateway-error" in on and status in GATEWAY_ERRORS:
            return "gateway-error"
        if "retriable-4xx" in on and status == 409:
            return "retriable-4xx"
        if "retriable-status-codes" in on and status in policy.codes:
            return "retriable-status-codes"
        for name, code in _GRPC_RETRY_ON.items():
            if name in on and outcome.grpc_status == code:
                return name
        return None
    # Every other kind is a reset of the upstream stream.
    if outcome.kind == "connect_failure" and "connect-failure" in on:
        return "connect-failure"
    for name in ("reset", "5xx", "gateway-error"):
        if name in on:  # Envoy counts any upstream reset as a "5xx" / gateway error
            return name
    if outcome.kind == "refused_stream" and "refused-stream" in on:
        return "refused-stream"
    return None


def _conditions(policy: RetryPolicy) -> str:
    return ",".join(sorted(policy.retry_on)) or "nothing"


def should_retry(policy: RetryPolicy, outcome: Outcome, retries_done: int, *,
                 replayable: bool, budget_ok: bool) -> RetryDecision:
    """Whether to retry after ``outcome``; ``retries_done`` retries were already made.

    ``replayable`` is False when the request cannot be sent again: its body outgrew the
    replay buffer or was streamed, or the response already started towards the client.
    ``budget_ok`` is False when the cluster's circuit breaker has no retry left
    (max_retries); the caller then returns the last response, flagged UO.
    """
    condition = _matching_condition(policy, outcome)
    if condition is None:
        if outcome.kind == "response" and (outcome.status or 0) < 500 \
                and outcome.grpc_status in (None, 0):
            return RetryDecision(False, f"no retry: {outcome.describe()}")
        return RetryDecision(False, f"no retry: {outcome.describe()}, not retriable under "
                                    f"retry_on={_conditions(policy)}")
    if not replayable:
        return RetryDecision(False, f"no retry: {outcome.describe()} but the request cannot be "
                                    "replayed (body larger than the replay buffer, streamed, "
                                    "or the response already started)")
    if retries_done >= policy.attempts:
        return RetryDecision(False, f"no retry: {outcome.describe()}; retry limit reached "
                                    f"({retries_done} of {policy.attempts} retries used)", "URX")
    if not budget_ok:
        return RetryDecision(False, f"no retry: {outcome.describe()}; the cluster's circuit "
                                    "breaker allows no more concurrent retries (maxRetries)",
                             "UO")
    return RetryDecision(True, f"retry {retries_done + 1} of {policy.attempts}: "
                               f"{outcome.describe()} and retry_on has {condition}")


def backoff(retries_done: int, policy: RetryPolicy, draw: float) -> float:
    """Seconds to wait before the next retry: Envoy's fully jittered exponential back-off,
    uniform in [0, min(base * 2**retries_done, cap)); ``draw`` is uniform in [0, 1)."""
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"back-off draw must be in [0, 1), not {draw}")
    cap = policy.backoff_max
    # Compare exponents first: 2**retries_done overflows a float long before it matters.
    interval = cap if retries_done >= 64 else min(policy.backoff_base * 2 ** retries_done, cap)
    return draw * interval


def choose_retry_endpoint(candidates: Sequence[str], tried: Collection[str]) -> tuple[str, ...]:
    """Envoy's previous_hosts predicate as a filter: the candidates not tried yet, or all of
    them when every candidate was tried (a retry then reuses a host rather than failing)."""
    untried = tuple(endpoint for endpoint in candidates if endpoint not in tried)
    return untried if untried else tuple(candidates)


def retry_on_text(conditions: Iterable[str], codes: Iterable[int] = ()) -> str:
    """The policy as an operator reads it (explain, config_dump): ``5xx,reset,503``."""
    return ",".join([*sorted(conditions), *(str(code) for code in sorted(codes))])


__all__ = [
    "DEFAULT_RETRY", "GATEWAY_ERRORS", "GRPC_CANCELLED",
    "GRPC_DEADLINE_EXCEEDED", "GRPC_INTERNAL", "GRPC_RESOURCE_EXHAUSTED", "GRPC_UNAVAILABLE",
    "NO_RETRY", "OUTCOME_KINDS", "RETRY_ON_VALUES", "Outcome", "OutcomeKind", "RetryDecision",
    "RetryPolicy", "backoff", "choose_retry_endpoint", "parse_retry_on", "retry_on_text",
    "should_retry",
]
