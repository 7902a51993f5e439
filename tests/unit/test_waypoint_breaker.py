"""Circuit-breaker accounting: overflow and release per kind, stats, Istio's field mapping,
maxRequestsPerConnection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nodeproxy.waypoint.breaker import (
    UNLIMITED,
    BreakerKind,
    BreakerLimits,
    BreakerUsage,
    CircuitBreaker,
    connection_exhausted,
)


def acquire(breaker: CircuitBreaker, kind: BreakerKind) -> Callable[[], bool]:
    return {
        "connections": breaker.try_acquire_connection,
        "pending_requests": breaker.try_acquire_pending,
        "requests": breaker.try_acquire_request,
        "retries": breaker.try_acquire_retry,
    }[kind]


def release(breaker: CircuitBreaker, kind: BreakerKind) -> Callable[[], None]:
    return {
        "connections": breaker.release_connection,
        "pending_requests": breaker.release_pending,
        "requests": breaker.release_request,
        "retries": breaker.release_retry,
    }[kind]


LIMITED = [
    pytest.param("connections", BreakerLimits(max_connections=2), id="connections"),
    pytest.param("pending_requests", BreakerLimits(max_pending_requests=2), id="pending"),
    pytest.param("requests", BreakerLimits(max_requests=2), id="requests"),
    pytest.param("retries", BreakerLimits(max_retries=2), id="retries"),
]


@pytest.mark.parametrize(("kind", "limits"), LIMITED)
def test_overflow_at_the_limit_and_release_frees_a_slot(kind: BreakerKind,
                                                        limits: BreakerLimits) -> None:
    breaker = CircuitBreaker(limits)
    assert [acquire(breaker, kind)() for _ in range(3)] == [True, True, False]
    assert breaker.stats()[kind] == BreakerUsage(active=2, limit=2, overflows=1)
    release(breaker, kind)()
    assert acquire(breaker, kind)() is True
    assert acquire(breaker, kind)() is False
    assert breaker.stats()[kind] == BreakerUsage(active=2, limit=2, overflows=2)


@pytest.mark.parametrize(("kind", "limits"), LIMITED)
def test_one_kind_overflowing_leaves_the_others_alone(kind: BreakerKind,
                                                      limits: BreakerLimits) -> None:
    breaker = CircuitBreaker(limits)
    for _ in range(3):
        acquire(breaker, kind)()
    others = [other for other in breaker.stats() if other != kind]
    assert all(acquire(breaker, other)() for other in others)
    stats = breaker.stats()
    assert {other: (stats[other].active, stats[other].overflows) for other in others} == \
        {other: (1, 0) for other in others}


@pytest.mark.parametrize(("kind", "limits"), LIMITED)
def test_release_without_acquire_is_a_bug(kind: BreakerKind, limits: BreakerLimits) -> None:
    breaker = CircuitBreaker(limits)
    acquire(breaker, kind)()
    release(breaker, kind)()
    with pytest.raises(ValueError, match=f"released more {kind} than were acquired"):
        release(breaker, kind)()


def test_zero_limit_refuses_everything() -> None:
    breaker = CircuitBreaker(BreakerLimits(max_retries=0))
    assert breaker.try_acquire_retry() is False
    assert breaker.stats()["retries"] == BreakerUsage(active=0, limit=0, overflows=1)


def test_defaults_are_istios_unlimited() -> None:
    breaker = CircuitBreaker()
    assert all(breaker.try_acquire_request() for _ in range(10_000))
    assert {kind: usage.limit for kind, usage in breaker.stats().items()} == {
        "connections": UNLIMITED, "pending_requests": UNLIMITED,
        "requests": UNLIMITED, "retries": UNLIMITED}
    assert breaker.stats()["requests"].remaining == UNLIMITED - 10_000


def test_reconfigure_keeps_in_flight_counted() -> None:
    breaker = CircuitBreaker(BreakerLimits(max_requests=5))
    for _ in range(4):
        assert breaker.try_acquire_request()
    breaker.reconfigure(BreakerLimits(max_requests=2))
    assert breaker.try_acquire_request() is False
    assert breaker.stats()["requests"] == BreakerUsage(active=4, limit=2, overflows=1)
    assert breaker.stats()["requests"].remaining == 0
    for _ in range(3):
        breaker.release_request()
    assert breaker.try_acquire_request() is True
    assert breaker.limits == BreakerLimits(max_requests=2)


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({}, BreakerLimits(), id="nothing-set-is-unlimited"),
    pytest.param({"max_connections": 100, "http1_max_pending_requests": 10,
                  "http2_max_requests": 1000, "max_retries": 3},
                 BreakerLimits(max_connections=100, max_pending_requests=10, max_requests=1000,
                               max_retries=3), id="all-fields"),
    pytest.param({"http1_max_pending_requests": 0, "max_retries": 0}, BreakerLimits(),
                 id="zero-means-unset-as-istio"),
    pytest.param({"http2_max_requests": 1}, BreakerLimits(max_requests=1),
                 id="http2MaxRequests-is-active-requests"),
])
def test_destination_rule_mapping(fields: dict[str, int], expected: BreakerLimits) -> None:
    assert BreakerLimits.from_connection_pool(**fields) == expected


@pytest.mark.parametrize("fields", [
    pytest.param({"max_requests": -1}, id="negative"),
    pytest.param({"max_retries": 2**32}, id="above-uint32"),
])
def test_limits_reject_out_of_range(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="between 0 and 2\\^32-1"):
        BreakerLimits(**fields)


@pytest.mark.parametrize(("requests_done", "max_per_connection", "exhausted"), [
    pytest.param(0, 0, False, id="unlimited-fresh"),
    pytest.param(1_000_000, 0, False, id="unlimited-busy"),
    pytest.param(0, 1, False, id="keepalive-off-first-request"),
    pytest.param(1, 1, True, id="keepalive-off-after-one"),
    pytest.param(9, 10, False, id="below-limit"),
    pytest.param(10, 10, True, id="at-limit"),
    pytest.param(11, 10, True, id="past-limit"),
])
def test_max_requests_per_connection(requests_done: int, max_per_connection: int,
                                     exhausted: bool) -> None:
    assert connection_exhausted(requests_done, max_per_connection) is exhausted
