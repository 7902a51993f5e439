"""Outlier detection: what counts, ejection on the Nth consecutive error, the max ejection
cap, un-ejection at the sweep after base x multiplier, multiplier decay, panic, endpoint set
changes and what the runtime exports.  Time is a plain float; sweeps run every 10 s from 0."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from nodeproxy.waypoint.outlier import (
    Ejection,
    OutlierCounters,
    OutlierDetector,
    OutlierParams,
)

EJECT_ALL = OutlierParams(max_ejection_percent=100)


def detector(params: OutlierParams = EJECT_ALL, endpoints: Sequence[str] = ("a", "b"),
             now: float = 0.0) -> OutlierDetector:
    return OutlierDetector(params, endpoints, now=now)


def fail(outliers: OutlierDetector, endpoint: str, now: float, times: int = 5,
         result: int | str = 500) -> Ejection | None:
    ejection = None
    for _ in range(times):
        ejection = outliers.record(endpoint, result, now) or ejection
    return ejection


def row(outliers: OutlierDetector, endpoint: str, now: float) -> dict[str, object]:
    return next(r for r in outliers.snapshot(now) if r["endpoint"] == endpoint)


# -- which results count, and when the ejection fires ----------------------------------------
@pytest.mark.parametrize(("params", "results", "fires_at", "reason"), [
    pytest.param(EJECT_ALL, [500] * 5, 4, "consecutive_5xx", id="fifth-500-ejects"),
    pytest.param(EJECT_ALL, [500] * 4, None, None, id="four-500-do-not"),
    pytest.param(EJECT_ALL, [500] * 4 + [200] + [500] * 4, None, None,
                 id="success-resets-the-count"),
    pytest.param(EJECT_ALL, [500] * 4 + [404] + [500] * 4, None, None, id="4xx-is-a-success"),
    pytest.param(EJECT_ALL, [503, 502, 501, 599, 500], 4, "consecutive_5xx",
                 id="any-5xx-counts"),
    pytest.param(EJECT_ALL, ["connect_failure"] * 5, 4, "consecutive_5xx",
                 id="connect-failures-count-as-5xx"),
    pytest.param(EJECT_ALL, ["reset", "refused_stream", "per_try_timeout", "timeout", 503], 4,
                 "consecutive_5xx", id="local-failures-count-as-5xx"),
    pytest.param(OutlierParams(consecutive_5xx=0, max_ejection_percent=100), [500] * 20, None,
                 None, id="zero-threshold-is-off"),
    pytest.param(OutlierParams(consecutive_5xx=1, max_ejection_percent=100), [200, 500], 1,
                 "consecutive_5xx", id="threshold-one"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 [502, 503, 504], 2, "consecutive_gateway_failure", id="three-gateway-errors"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 ["connect_failure", "per_try_timeout", "reset"], 2,
                 "consecutive_gateway_failure", id="local-failures-are-gateway-errors"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 [502, 500, 502, 503], None, None, id="non-gateway-5xx-resets-gateway-count"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 [502, 500, 502, 503, 504], 4, "consecutive_gateway_failure",
                 id="both-fire-gateway-wins"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 [500] * 5, 4, "consecutive_5xx", id="500s-are-not-gateway-errors"),
    pytest.param(OutlierParams(consecutive_gateway=3, max_ejection_percent=100),
                 [502, 502, 200, 502, 502], None, None, id="success-resets-gateway-count"),
])
def test_consecutive_error_detectors(params: OutlierParams, results: list[int | str],
                                     fires_at: int | None, reason: str | None) -> None:
    outliers = detector(params)
    ejections = [outliers.record("a", result, 1.0) for result in results]
    fired = [index for index, ejection in enumerate(ejections) if ejection is not None]
    assert fired == ([] if fires_at is None else [fires_at])
    if fires_at is not None:
        ejection = ejections[fires_at]
        assert ejection == Ejection("a", reason, 1.0, 30.0, 1)  # type: ignore[arg-type]
        assert outliers.is_ejected("a", 1.0)
    else:
        assert not outliers.is_ejected("a", 1.0)
    assert not outliers.is_ejected("b", 1.0)


def test_counters_restart_after_an_ejection_that_the_cap_refused() -> None:
    outliers = detector(OutlierParams(max_ejection_percent=0))
    assert fail(outliers, "a", 1.0, times=5) is None
    assert row(outliers, "a", 1.0)["consecutive_5xx"] == 0
    assert fail(outliers, "a", 1.0, times=5) is None
    assert outliers.counters().ejections_overflow == 2


def test_unknown_failure_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="connect_failure, refused_stream"):
        detector().record("a", "bogus", 0.0)


# -- max ejection percent ---------------------------------------------------------------------
@pytest.mark.parametrize(("hosts", "max_percent", "always_one", "failing", "ejected", "overflow"), [
    pytest.param(3, 10, False, 1, 0, 1, id="istio-default-ejects-nothing-below-10-hosts"),
    pytest.param(10, 10, False, 2, 1, 1, id="ten-hosts-one-ejection"),
    pytest.param(20, 10, False, 3, 2, 1, id="twenty-hosts-two-ejections"),
    pytest.param(3, 50, False, 3, 1, 2, id="half-of-three-is-one"),
    pytest.param(3, 67, False, 3, 2, 1, id="cap-checked-after-the-ejection"),
    pytest.param(2, 100, False, 2, 2, 0, id="hundred-percent-ejects-all"),
    pytest.param(1, 10, False, 1, 0, 1, id="single-host-kept"),
    pytest.param(1, 100, False, 1, 1, 0, id="single-host-ejected-at-100"),
    pytest.param(5, 0, False, 1, 0, 1, id="zero-percent-ejects-nothing"),
    pytest.param(3, 10, True, 2, 1, 1, id="always-eject-one-host"),
    pytest.param(3, 0, True, 1, 1, 0, id="always-eject-one-even-at-zero"),
])
def test_max_ejection_percent_is_a_strict_cap(hosts: int, max_percent: int, always_one: bool,
                                              failing: int, ejected: int, overflow: int) -> None:
    endpoints = [f"h{i}" for i in range(hosts)]
    outliers = detector(OutlierParams(max_ejection_percent=max_percent,
                                      always_eject_one_host=always_one), endpoints)
    for endpoint in endpoints[:failing]:
        fail(outliers, endpoint, 1.0)
    counters = outliers.counters()
    assert (counters.ejections_active, counters.ejections_overflow) == (ejected, overflow)
    assert sum(outliers.is_ejected(e, 1.0) for e in endpoints) == ejected


# -- un-ejection at the sweeps ----------------------------------------------------------------
@pytest.mark.parametrize(("now", "ejected"), [
    pytest.param(5.0, True, id="just-ejected"),
    pytest.param(30.0, True, id="sweep-at-30-too-early"),
    pytest.param(35.0, True, id="eligible-but-no-sweep-yet"),
    pytest.param(39.999, True, id="just-before-the-sweep"),
    pytest.param(40.0, False, id="returned-at-the-sweep-at-40"),
    pytest.param(1000.0, False, id="long-after"),
])
def test_un_ejection_at_the_first_sweep_after_the_ejection_time(now: float,
                                                                ejected: bool) -> None:
    outliers = detector()
    ejection = fail(outliers, "a", 5.0)
    assert ejection is not None
    assert ejection.eligible_at == 35.0
    assert outliers.is_ejected("a", now) is ejected


def test_sweep_reports_each_return_once_even_when_another_call_ran_it() -> None:
    outliers = detector()
    fail(outliers, "a", 5.0)
    fail(outliers, "b", 12.0)
    assert outliers.sweep(30.0) == []
    assert outliers.available(("a", "b"), 41.0) == ("a",)  # the sweep at 40 ran here
    assert outliers.sweep(45.0) == ["a"]
    assert outliers.sweep(45.0) == []
    assert outliers.sweep(50.0) == ["b"]
    assert outliers.counters().unejections_total == 2


def returns_at(outliers: OutlierDetector, endpoint: str, now: float) -> float:
    until = row(outliers, endpoint, now)["ejected_until"]
    assert isinstance(until, float)
    return until


def test_each_ejection_lasts_base_times_the_multiplier_up_to_the_cap() -> None:
    outliers = detector()
    now, durations, multipliers = 1.0, [], []
    for _ in range(13):  # re-ejected as soon as it returns: no decay in between
        ejection = fail(outliers, "a", now)
        assert ejection is not None
        durations.append(ejection.duration)
        multipliers.append(row(outliers, "a", now)["ejection_multiplier"])
        now = returns_at(outliers, "a", now)
        assert not outliers.is_ejected("a", now)
    assert durations == [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0,
                         300.0, 300.0, 300.0]
    # Envoy stops growing the multiplier one step past max_ejection_time (300 s).
    assert multipliers == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 11]
    assert row(outliers, "a", now)["times_ejected"] == 13


def test_max_ejection_time_can_be_set() -> None:
    outliers = detector(OutlierParams(max_ejection_percent=100, max_ejection=45.0))
    first = fail(outliers, "a", 1.0)
    second = fail(outliers, "a", returns_at(outliers, "a", 1.0))
    assert (first and first.duration, second and second.duration) == (30.0, 45.0)


@pytest.mark.parametrize(("second_failure_at", "second_duration"), [
    pytest.param(41.0, 60.0, id="right-after-return-multiplier-2"),
    pytest.param(49.9, 60.0, id="before-a-healthy-sweep"),
    pytest.param(50.0, 30.0, id="healthy-sweep-at-50-decays-it"),
    pytest.param(500.0, 30.0, id="long-healthy"),
])
def test_multiplier_decays_once_per_healthy_interval(second_failure_at: float,
                                                     second_duration: float) -> None:
    outliers = detector()
    fail(outliers, "a", 5.0)  # back at the sweep at 40
    ejection = fail(outliers, "a", second_failure_at)
    assert ejection is not None
    assert ejection.duration == second_duration


def test_multiplier_steps_down_by_one_per_sweep() -> None:
    outliers = detector()
    now = 1.0
    for _ in range(3):
        fail(outliers, "a", now)
        now = returns_at(outliers, "a", now)
    assert now == 190.0  # 1 -> 40 (30 s), -> 100 (60 s), -> 190 (90 s)
    seen = [row(outliers, "a", at)["ejection_multiplier"] for at in (190.0, 200.0, 210.0,
                                                                     220.0, 230.0)]
    assert seen == [3, 2, 1, 0, 0]


def test_un_ejection_restarts_the_counters() -> None:
    outliers = detector()
    fail(outliers, "a", 5.0)
    fail(outliers, "a", 6.0, times=7)  # panic traffic keeps arriving while ejected
    assert row(outliers, "a", 6.0)["consecutive_5xx"] == 7
    assert row(outliers, "a", 40.0)["consecutive_5xx"] == 0
    assert fail(outliers, "a", 41.0, times=4) is None
    assert fail(outliers, "a", 41.0, times=1) is not None


def test_a_long_idle_gap_skips_sweeps_that_have_nothing_to_do() -> None:
    outliers = detector()
    assert outliers.next_sweep == 10.0
    assert outliers.available(("a", "b"), 1e9 + 3.0) == ("a", "b")
    next_sweep = outliers.next_sweep
    assert next_sweep is not None
    assert 1e9 + 3.0 < next_sweep <= 1e9 + 13.0


def test_first_time_seen_starts_the_sweep_grid() -> None:
    outliers = OutlierDetector(EJECT_ALL, ("a", "b"))
    assert outliers.next_sweep is None
    fail(outliers, "a", 100.0)
    assert outliers.next_sweep == 110.0
    assert returns_at(outliers, "a", 100.0) == 130.0


# -- panic (min health percent) ---------------------------------------------------------------
@pytest.mark.parametrize(("hosts", "ejected", "min_health", "available", "panic"), [
    pytest.param(4, 0, 0, 4, False, id="all-healthy"),
    pytest.param(4, 1, 0, 3, False, id="ejected-host-left-out"),
    pytest.param(4, 1, 75, 3, False, id="exactly-at-threshold-is-not-panic"),
    pytest.param(4, 2, 75, 4, True, id="below-threshold-uses-all"),
    pytest.param(2, 2, 0, 0, False, id="istio-default-no-panic-all-ejected-is-empty"),
    pytest.param(2, 2, 1, 2, True, id="any-threshold-panics-when-all-ejected"),
    pytest.param(4, 3, 50, 4, True, id="quarter-healthy-below-half"),
])
def test_min_health_percent_is_envoys_panic_threshold(hosts: int, ejected: int,
                                                       min_health: int, available: int,
                                                       panic: bool) -> None:
    endpoints = [f"h{i}" for i in range(hosts)]
    outliers = detector(OutlierParams(max_ejection_percent=100, min_health_percent=min_health),
                        endpoints)
    for endpoint in endpoints[:ejected]:
        fail(outliers, endpoint, 1.0)
    chosen = outliers.available(endpoints, 2.0)
    assert len(chosen) == available
    assert outliers.in_panic(endpoints, 2.0) is panic
    assert set(chosen) == (set(endpoints) if panic else set(endpoints[ejected:]))


def test_available_keeps_the_callers_order_and_unknown_endpoints() -> None:
    outliers = detector(endpoints=("a", "b", "c"))
    fail(outliers, "b", 1.0)
    assert outliers.available(("c", "new", "b", "a"), 2.0) == ("c", "new", "a")
    assert outliers.available((), 2.0) == ()
    assert outliers.in_panic((), 2.0) is False


# -- endpoint set changes ---------------------------------------------------------------------
def test_update_endpoints_keeps_survivors_and_forgets_the_rest() -> None:
    outliers = detector(OutlierParams(max_ejection_percent=50), ("a", "b", "c", "d"))
    assert fail(outliers, "a", 1.0) is not None
    assert fail(outliers, "b", 1.0) is not None
    fail(outliers, "c", 1.0, times=4)
    outliers.update_endpoints(("a", "c", "e", "f"))
    assert [(r["endpoint"], r["ejected"], r["consecutive_5xx"])
            for r in outliers.snapshot(2.0)] == [
        ("a", True, 0), ("c", False, 4), ("e", False, 0), ("f", False, 0)]
    assert outliers.counters().ejections_active == 1
    # b's ejection no longer counts against the cap: a second host of four may go.
    assert fail(outliers, "e", 2.0) is not None
    assert outliers.record("b", 500, 2.0) is None  # gone: a late result is ignored


def test_an_endpoint_that_comes_back_starts_clean() -> None:
    outliers = detector()
    fail(outliers, "a", 1.0)
    outliers.update_endpoints(("b",))
    outliers.update_endpoints(("a", "b"))
    assert not outliers.is_ejected("a", 2.0)
    assert row(outliers, "a", 2.0)["times_ejected"] == 0


# -- export -----------------------------------------------------------------------------------
def test_snapshot_and_counters_for_config_dump_and_metrics() -> None:
    outliers = detector(OutlierParams(consecutive_gateway=2, max_ejection_percent=100),
                        ("b", "a", "c"))
    fail(outliers, "a", 5.0)
    fail(outliers, "b", 6.0, times=2, result=503)
    outliers.record("c", 502, 7.0)
    assert outliers.snapshot(8.0) == [
        {"endpoint": "a", "ejected": True, "ejected_until": 40.0, "seconds_left": 32.0,
         "times_ejected": 1, "ejection_multiplier": 1, "consecutive_5xx": 0,
         "consecutive_gateway_errors": 0},
        {"endpoint": "b", "ejected": True, "ejected_until": 40.0, "seconds_left": 32.0,
         "times_ejected": 1, "ejection_multiplier": 1, "consecutive_5xx": 2,
         "consecutive_gateway_errors": 0},
        {"endpoint": "c", "ejected": False, "ejected_until": None, "seconds_left": None,
         "times_ejected": 0, "ejection_multiplier": 0, "consecutive_5xx": 1,
         "consecutive_gateway_errors": 1},
    ]
    assert outliers.counters() == OutlierCounters(
        ejections_total={"consecutive_5xx": 1, "consecutive_gateway_failure": 1},
        ejections_overflow=0, ejections_active=2, unejections_total=0)


@pytest.mark.parametrize(("fields", "message"), [
    pytest.param({"consecutive_5xx": -1}, "consecutive_5xx must be 0", id="negative-5xx"),
    pytest.param({"consecutive_gateway": -1}, "consecutive_gateway must be 0",
                 id="negative-gateway"),
    pytest.param({"interval": 0.0}, "interval must be positive", id="zero-interval"),
    pytest.param({"base_ejection": -1.0}, "base_ejection must be positive", id="negative-base"),
    pytest.param({"max_ejection_percent": 101}, "between 0 and 100", id="percent-above-100"),
    pytest.param({"min_health_percent": -1}, "between 0 and 100", id="negative-health"),
    pytest.param({"base_ejection": 60.0, "max_ejection": 30.0}, "cannot be smaller",
                 id="max-below-base"),
])
def test_params_reject_nonsense(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierParams(**fields)  # type: ignore[arg-type]


def test_istio_defaults() -> None:
    params = OutlierParams()
    assert (params.consecutive_5xx, params.consecutive_gateway, params.interval,
            params.base_ejection, params.max_ejection_percent, params.min_health_percent) == \
        (5, 0, 10.0, 30.0, 10, 0)
    assert params.ejection_cap == 300.0
    assert OutlierParams(base_ejection=600.0).ejection_cap == 600.0
