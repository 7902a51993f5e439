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
_HTTP_RETRY_ON = frozenset((
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes",
))
RETRY_ON_VALUES: frozenset[str] = _HTTP_RETRY_ON | frozenset(_GRPC_RETRY_ON)
GATEWAY_ERRORS = frozenset((502, 503, 504))

# Envoy's runtime default upstream.base_retry_backoff_ms.
DEFAULT_BACKOFF_BASE = 0.025


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry policy (Istio HTTPRetry / Gateway API HTTPRouteRetry, resolved)."""

    #: Retries after the first try (Envoy num_retries); 0 disables retries.
    attempts: int
    #: Envoy retry_on conditions (``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on`` names).
    retry_on: frozenset[str]
    #: Status codes for ``retriable-status-codes`` (ignored without that condition, as Envoy).
    codes: frozenset[int] = frozenset()
    #: Seconds; first back-off is drawn from [0, base), doubling per retry.
    backoff_base: float = DEFAULT_BACKOFF_BASE
    #: Seconds; cap of the back-off interval.  None = 10 x base (Envoy's default).
    backoff_max: float | None = None
    #: Seconds one try may take before it is reset and counted as a per-try timeout.
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
        if self.backoff_max is not None and self.backoff_max < self.backoff_base:
            raise ValueError(f"retry backoff max ({self.backoff_max}) must not be below "
                             f"the base ({self.backoff_base})")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError(f"per-try timeout must be positive, not {self.per_try_timeout}")

    @property
    def backoff_cap(self) -> float:
        """The back-off interval cap in seconds (``backoff_max``, else 10 x base)."""
        return self.backoff_max if self.backoff_max is not None else 10 * self.backoff_base

    @classmethod
    def from_retry_on(cls, attempts: int, retry_on: str, *,
                      backoff_base: float = DEFAULT_BACKOFF_BASE,
                      backoff_max: float | None = None,
                      per_try_timeout: float | None = None) -> RetryPolicy:
        """Build from Istio's ``retryOn`` string: integers are status codes, and naming a
        code implies ``retriable-status-codes`` (pilot's parseRetryOn)."""
        conditions, codes = parse_retry_on(retry_on)
        return cls(attempts=attempts, retry_on=conditions, codes=codes,
                   backoff_base=backoff_base, backoff_max=backoff_max,
                   per_try_timeout=per_try_timeout)


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
    attempts=2,
    retry_on=frozenset(("connect-failure", "refused-stream", "unavailable", "cancelled")),
)
NO_RETRY = RetryPolicy(attempts=0, retry_on=frozenset())


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
    cap = policy.backoff_cap
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
    "DEFAULT_BACKOFF_BASE", "DEFAULT_RETRY", "GATEWAY_ERRORS", "GRPC_CANCELLED",
    "GRPC_DEADLINE_EXCEEDED", "GRPC_INTERNAL", "GRPC_RESOURCE_EXHAUSTED", "GRPC_UNAVAILABLE",
    "NO_RETRY", "OUTCOME_KINDS", "RETRY_ON_VALUES", "Outcome", "OutcomeKind", "RetryDecision",
    "RetryPolicy", "backoff", "choose_retry_endpoint", "parse_retry_on", "retry_on_text",
    "should_retry",
]
