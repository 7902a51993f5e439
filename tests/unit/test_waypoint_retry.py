"""Retry decisions: every retry_on condition against every way a try can end (Envoy's router),
Istio's default policy, the limits (replay, attempts, breaker), back-off bounds, previous hosts."""

from __future__ import annotations

import pytest

from nodeproxy.waypoint.retry import (
    DEFAULT_RETRY,
    NO_RETRY,
    Outcome,
    RetryPolicy,
    backoff,
    choose_retry_endpoint,
    parse_retry_on,
    retry_on_text,
    should_retry,
)

OUTCOMES = {
    "200": Outcome.response(200),
    "404": Outcome.response(404),
    "409": Outcome.response(409),
    "500": Outcome.response(500),
    "501": Outcome.response(501),
    "502": Outcome.response(502),
    "503": Outcome.response(503),
    "504": Outcome.response(504),
    "grpc-ok": Outcome.response(200, grpc_status=0),
    "grpc-cancelled": Outcome.response(200, grpc_status=1),
    "grpc-deadline": Outcome.response(200, grpc_status=4),
    "grpc-exhausted": Outcome.response(200, grpc_status=8),
    "grpc-internal": Outcome.response(200, grpc_status=13),
    "grpc-unavailable": Outcome.response(200, grpc_status=14),
    "connect-failure": Outcome("connect_failure"),
    "refused-stream": Outcome("refused_stream"),
    "reset": Outcome("reset"),
    "per-try-timeout": Outcome("per_try_timeout"),
}
RESETS = {"connect-failure", "refused-stream", "reset", "per-try-timeout"}

# What each condition retries, read from Envoy's wouldRetryFromHeaders/wouldRetryFromReset:
# any upstream reset (a per-try timeout is a local reset) counts as 5xx and gateway error.
RETRIES = {
    "5xx": {"500", "501", "502", "503", "504"} | RESETS,
    "gateway-error": {"502", "503", "504"} | RESETS,
    "reset": RESETS,
    "connect-failure": {"connect-failure"},
    "refused-stream": {"refused-stream"},
    "retriable-4xx": {"409"},
    "retriable-status-codes": {"404", "503"},  # with codes {404, 503}
    "cancelled": {"grpc-cancelled"},
    "deadline-exceeded": {"grpc-deadline"},
    "resource-exhausted": {"grpc-exhausted"},
    "internal": {"grpc-internal"},
    "unavailable": {"grpc-unavailable"},
}
MATRIX = [
    pytest.param(condition, name, name in retried, id=f"{condition}-on-{name}")
    for condition, retried in RETRIES.items()
    for name in OUTCOMES
]


@pytest.mark.parametrize(("condition", "outcome_name", "expected"), MATRIX)
def test_each_retry_on_condition_against_each_outcome(
        condition: str, outcome_name: str, expected: bool) -> None:
    policy = RetryPolicy(attempts=2, retry_on=frozenset({condition}), codes=frozenset({404, 503}))
    decision = should_retry(policy, OUTCOMES[outcome_name], 0, replayable=True, budget_ok=True)
    assert decision.retry is expected
    if expected:
        assert decision.reason.startswith("retry 1 of 2: ")
        assert condition in decision.reason
    else:
        assert decision.reason.startswith("no retry: ")


@pytest.mark.parametrize(("outcome_name", "expected"), [
    pytest.param("connect-failure", True, id="connect-failure"),
    pytest.param("refused-stream", True, id="refused-stream"),
    pytest.param("grpc-unavailable", True, id="grpc-unavailable"),
    pytest.param("grpc-cancelled", True, id="grpc-cancelled"),
    pytest.param("503", False, id="503-no-longer-retried-by-default"),
    pytest.param("502", False, id="502"),
    pytest.param("reset", False, id="reset-after-connect"),
    pytest.param("per-try-timeout", False, id="per-try-timeout"),
    pytest.param("grpc-deadline", False, id="grpc-deadline"),
    pytest.param("200", False, id="success"),
])
def test_istio_default_policy(outcome_name: str, expected: bool) -> None:
    decision = should_retry(DEFAULT_RETRY, OUTCOMES[outcome_name], 0,
                            replayable=True, budget_ok=True)
    assert decision.retry is expected
    assert DEFAULT_RETRY.attempts == 2
    assert DEFAULT_RETRY.backoff_base == 0.025
    assert DEFAULT_RETRY.backoff_max == pytest.approx(0.25)
    assert DEFAULT_RETRY.per_try_timeout is None


@pytest.mark.parametrize(("policy", "outcome_name", "expected"), [
    pytest.param(RetryPolicy(2, frozenset({"retriable-status-codes"})), "503", False,
                 id="condition-without-codes-matches-nothing"),
    pytest.param(RetryPolicy(2, frozenset({"connect-failure"}), codes=frozenset({503})), "503",
                 False, id="codes-without-the-condition-are-ignored"),
    pytest.param(RetryPolicy(2, frozenset({"retriable-status-codes"}), codes=frozenset({503})),
                 "503", True, id="condition-and-code"),
    pytest.param(RetryPolicy(2, frozenset({"unavailable"})), "503", False,
                 id="grpc-condition-ignores-http-status"),
    pytest.param(NO_RETRY, "connect-failure", False, id="no-retry-policy"),
])
def test_status_code_and_grpc_edges(policy: RetryPolicy, outcome_name: str,
                                    expected: bool) -> None:
    assert should_retry(policy, OUTCOMES[outcome_name], 0,
                        replayable=True, budget_ok=True).retry is expected


FIVE_XX = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))


@pytest.mark.parametrize(
    ("outcome_name", "retries_done", "replayable", "budget_ok", "retry", "flag", "reason_part"), [
        pytest.param("503", 0, True, True, True, None, "retry 1 of 2: upstream answered 503",
                     id="first-retry"),
        pytest.param("503", 1, True, True, True, None, "retry 2 of 2", id="last-retry"),
        pytest.param("503", 2, True, True, False, "URX", "retry limit reached (2 of 2",
                     id="limit-reached"),
        pytest.param("503", 0, False, True, False, None, "cannot be replayed",
                     id="not-replayable"),
        pytest.param("503", 2, False, True, False, None, "cannot be replayed",
                     id="not-replayable-wins-over-limit"),
        pytest.param("503", 0, True, False, False, "UO", "circuit breaker",
                     id="breaker-max-retries"),
        pytest.param("503", 2, True, False, False, "URX", "retry limit",
                     id="limit-checked-before-breaker"),
        pytest.param("404", 0, True, False, False, None, "upstream answered 404",
                     id="not-retriable-says-why-not-breaker"),
        pytest.param("reset", 0, True, True, True, None, "the endpoint reset the request",
                     id="reset-reason"),
    ])
def test_limits_and_operator_reasons(outcome_name: str, retries_done: int, replayable: bool,
                                     budget_ok: bool, retry: bool, flag: str | None,
                                     reason_part: str) -> None:
    decision = should_retry(FIVE_XX, OUTCOMES[outcome_name], retries_done,
                            replayable=replayable, budget_ok=budget_ok)
    assert decision.retry is retry
    assert decision.response_flag == flag
    assert reason_part in decision.reason


def test_not_retriable_reason_names_the_policy() -> None:
    decision = should_retry(DEFAULT_RETRY, OUTCOMES["503"], 0, replayable=True, budget_ok=True)
    assert decision.reason == ("no retry: upstream answered 503, not retriable under "
                               "retry_on=cancelled,connect-failure,refused-stream,unavailable")


BACKOFF = RetryPolicy(attempts=5, retry_on=frozenset({"5xx"}), backoff_base=0.025)


@pytest.mark.parametrize(("retries_done", "draw", "expected"), [
    pytest.param(0, 0.0, 0.0, id="zero-draw"),
    pytest.param(0, 0.5, 0.0125, id="first-retry-half-of-base"),
    pytest.param(1, 0.5, 0.025, id="second-retry-doubles"),
    pytest.param(2, 0.5, 0.05, id="third-retry"),
    pytest.param(3, 0.5, 0.1, id="fourth-retry"),
    pytest.param(4, 0.5, 0.125, id="capped-at-10x-base"),
    pytest.param(10_000, 0.5, 0.125, id="huge-retry-count-stays-capped"),
])
def test_backoff_is_fully_jittered_exponential(retries_done: int, draw: float,
                                               expected: float) -> None:
    assert backoff(retries_done, BACKOFF, draw) == pytest.approx(expected)


@pytest.mark.parametrize("retries_done", [0, 1, 2, 3, 4, 8])
def test_backoff_stays_below_its_interval(retries_done: int) -> None:
    interval = min(0.025 * 2 ** retries_done, 0.25)
    assert backoff(retries_done, BACKOFF, 0.999999) < interval


def test_backoff_max_is_10x_the_base() -> None:
    policy = RetryPolicy(attempts=5, retry_on=frozenset({"5xx"}), backoff_base=0.1)
    assert policy.backoff_max == pytest.approx(1.0)
    assert backoff(3, policy, 0.5) == pytest.approx(0.4)
    assert backoff(4, policy, 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("draw", [1.0, -0.1, 2.0])
def test_backoff_rejects_a_draw_outside_unit_interval(draw: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        backoff(0, BACKOFF, draw)


@pytest.mark.parametrize(("candidates", "tried", "expected"), [
    pytest.param(("a", "b", "c"), set(), ("a", "b", "c"), id="nothing-tried"),
    pytest.param(("a", "b", "c"), {"a"}, ("b", "c"), id="skips-previous-host"),
    pytest.param(("a", "b", "c"), {"a", "c"}, ("b",), id="only-untried-left"),
    pytest.param(("a", "b"), {"a", "b"}, ("a", "b"), id="all-tried-falls-back-to-all"),
    pytest.param(("a",), {"a"}, ("a",), id="single-endpoint-is-reused"),
    pytest.param((), set(), (), id="no-candidates"),
    pytest.param(("a", "b"), {"z"}, ("a", "b"), id="tried-host-gone"),
])
def test_choose_retry_endpoint_prefers_untried_hosts(
        candidates: tuple[str, ...], tried: set[str], expected: tuple[str, ...]) -> None:
    assert choose_retry_endpoint(candidates, tried) == expected


@pytest.mark.parametrize(("text", "conditions", "codes"), [
    pytest.param("5xx,reset", {"5xx", "reset"}, set(), id="conditions-only"),
    pytest.param("gateway-error, 503 ,409", {"gateway-error", "retriable-status-codes"},
                 {503, 409}, id="codes-imply-retriable-status-codes"),
    pytest.param("retriable-status-codes,503", {"retriable-status-codes"}, {503},
                 id="explicit-condition-kept-once"),
    pytest.param("", set(), set(), id="empty"),
    pytest.param("connect-failure,,", {"connect-failure"}, set(), id="empty-parts-skipped"),
])
def test_parse_retry_on_like_istio(text: str, conditions: set[str], codes: set[int]) -> None:
    assert parse_retry_on(text) == (frozenset(conditions), frozenset(codes))


def test_from_retry_on_builds_a_policy_and_prints_back() -> None:
    policy = RetryPolicy.from_retry_on(3, "5xx,503", per_try_timeout=2.0, backoff_base=0.1)
    assert policy == RetryPolicy(attempts=3, retry_on=frozenset({"5xx",
                                                                  "retriable-status-codes"}),
                                 codes=frozenset({503}), backoff_base=0.1, per_try_timeout=2.0)
    assert retry_on_text(policy.retry_on, policy.codes) == "5xx,retriable-status-codes,503"


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"attempts": -1}, "0 or more", id="negative-attempts"),
    pytest.param({"retry_on": frozenset({"5xx", "bogus"})}, "unknown retry_on value\\(s\\) bogus",
                 id="unknown-condition"),
    pytest.param({"codes": frozenset({99})}, "100-599", id="bad-code"),
    pytest.param({"backoff_base": 0.0}, "backoff base must be positive", id="zero-base"),
    pytest.param({"per_try_timeout": 0.0}, "per-try timeout must be positive",
                 id="zero-per-try-timeout"),
])
def test_policy_rejects_nonsense(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"attempts": 2, "retry_on": frozenset({"5xx"}), **kwargs}
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "status", "message"), [
    pytest.param("response", None, "needs its HTTP status", id="response-without-status"),
    pytest.param("timeout", None, "unknown outcome kind", id="unknown-kind"),
])
def test_outcome_rejects_nonsense(kind: str, status: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Outcome(kind, status)  # type: ignore[arg-type]
