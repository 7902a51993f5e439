"""Load balancers with scripted draws: least request prefers the idle host, round robin is
fair over a changing list, random maps draws to endpoints, retries avoid previous hosts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest

from nodeproxy.waypoint.balancer import (
    BALANCER_NAMES,
    LeastRequest,
    Random,
    RoundRobin,
    balancer_for,
)

ABC = ("a", "b", "c")


class Script:
    """A draw source that returns the given values in order and fails when it runs out."""

    def __init__(self, values: Iterable[float]) -> None:
        self._values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        value = self._values[self.calls]
        self.calls += 1
        return value


def never() -> float:
    raise AssertionError("this pick must not draw")


@pytest.mark.parametrize(("active", "draws", "expected"), [
    pytest.param({"a": 5, "b": 0}, (0.0, 0.5), "b", id="second-draw-idle-wins"),
    pytest.param({"a": 0, "b": 5}, (0.0, 0.5), "a", id="first-draw-idle-kept"),
    pytest.param({"a": 3, "b": 3}, (0.5, 0.0), "b", id="tie-keeps-first-draw"),
    pytest.param({"a": 9}, (0.0, 0.1), "a", id="same-host-drawn-twice-is-chosen"),
    pytest.param({}, (0.9, 0.1), "c", id="unknown-counts-are-zero"),
    pytest.param({"c": 1}, (0.9, 0.1), "a", id="missing-active-is-idle"),
])
def test_least_request_prefers_the_idle_host_of_two_draws(
        active: dict[str, int], draws: tuple[float, float], expected: str) -> None:
    draw = Script(draws)
    assert LeastRequest().pick(ABC, active, draw) == expected
    assert draw.calls == 2


def test_least_request_spreads_towards_idle_hosts() -> None:
    # Every pair of draws over three hosts (a busy, b and c idle): the busy host only wins
    # when it is drawn twice (1 pair in 9), as in Envoy's P2C with replacement.
    points = (0.1, 0.5, 0.9)
    picks = Counter(
        LeastRequest().pick(ABC, {"a": 10}, Script((first, second)))
        for first in points for second in points)
    assert picks == Counter({"a": 1, "b": 4, "c": 4})


@pytest.mark.parametrize(("endpoints", "exclude", "draws", "expected"), [
    pytest.param(ABC, {"a"}, (0.0, 0.0), "b", id="excluded-host-skipped"),
    pytest.param(ABC, {"a", "b"}, (0.0, 0.9), "c", id="only-untried-left"),
    pytest.param(("a", "b"), {"a", "b"}, (0.0, 0.0), "a", id="all-excluded-falls-back"),
])
def test_least_request_honours_previous_hosts(endpoints: tuple[str, ...], exclude: set[str],
                                              draws: tuple[float, float], expected: str) -> None:
    assert LeastRequest().pick(endpoints, {}, Script(draws), exclude) == expected


def test_round_robin_is_fair() -> None:
    balancer = RoundRobin()
    picks = [balancer.pick(ABC, {}, never) for _ in range(300)]
    assert picks[:4] == ["a", "b", "c", "a"]
    assert Counter(picks) == Counter({"a": 100, "b": 100, "c": 100})


def test_round_robin_follows_a_changing_list_with_bounded_state() -> None:
    balancer = RoundRobin()
    assert [balancer.pick(ABC, {}, never) for _ in range(2)] == ["a", "b"]
    # The list shrinks under it: the index wraps instead of running off the end.
    assert [balancer.pick(("x", "y"), {}, never) for _ in range(3)] == ["x", "y", "x"]
    assert [balancer.pick(("a", "b", "c", "d"), {}, never) for _ in range(4)] == \
        ["b", "c", "d", "a"]
    for _ in range(100_000):
        balancer.pick(ABC, {}, never)
    assert RoundRobin.__slots__ == ("_next",)
    assert 0 <= balancer._next <= len(ABC)


def test_round_robin_skips_previous_hosts() -> None:
    balancer = RoundRobin()
    assert balancer.pick(ABC, {}, never, exclude={"a"}) == "b"
    assert balancer.pick(ABC, {}, never, exclude={"a", "b", "c"}) == "b"


@pytest.mark.parametrize(("draw", "expected"), [
    pytest.param(0.0, "a", id="zero"),
    pytest.param(0.33, "a", id="first-third"),
    pytest.param(0.34, "b", id="second-third"),
    pytest.param(0.67, "c", id="last-third"),
    pytest.param(0.999999, "c", id="just-below-one"),
    pytest.param(1.0, "c", id="one-is-clamped"),
])
def test_random_maps_the_draw_to_an_endpoint(draw: float, expected: str) -> None:
    assert Random().pick(ABC, {}, Script([draw])) == expected


def test_random_with_exclusion_draws_among_the_rest() -> None:
    assert Random().pick(ABC, {}, Script([0.0]), exclude={"a"}) == "b"
    assert Random().pick(ABC, {}, Script([0.9]), exclude={"a"}) == "c"


@pytest.mark.parametrize("name", [*BALANCER_NAMES, "LEAST_CONN"])
def test_no_endpoint_gives_none_without_drawing(name: str) -> None:
    assert balancer_for(name).pick((), {}, never) is None
    assert balancer_for(name).pick((), {}, never, exclude={"a"}) is None


@pytest.mark.parametrize(("name", "kind"), [
    pytest.param("LEAST_REQUEST", LeastRequest, id="least-request"),
    pytest.param("LEAST_CONN", LeastRequest, id="least-conn-is-least-request"),
    pytest.param("ROUND_ROBIN", RoundRobin, id="round-robin"),
    pytest.param("RANDOM", Random, id="random"),
])
def test_balancer_for_names(name: str, kind: type) -> None:
    balancer = balancer_for(name)
    assert isinstance(balancer, kind)
    assert balancer.name in BALANCER_NAMES


def test_balancer_for_gives_each_caller_its_own_round_robin() -> None:
    first, second = balancer_for("ROUND_ROBIN"), balancer_for("ROUND_ROBIN")
    assert first.pick(ABC, {}, never) == "a"
    assert second.pick(ABC, {}, never) == "a"


@pytest.mark.parametrize("name", ["round_robin", "MAGLEV", ""])
def test_unknown_balancer_names_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match="use one of LEAST_REQUEST, ROUND_ROBIN, RANDOM"):
        balancer_for(name)
