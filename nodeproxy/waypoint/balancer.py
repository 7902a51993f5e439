"""Load balancers over an endpoint list that changes between picks (Envoy's, equal weights).

``pick(endpoints, active, draw, exclude)``: ``endpoints`` are the candidates in force now
(already filtered by outlier detection), ``active`` the requests in flight per endpoint,
``draw`` a uniform [0, 1) source (``random.random`` in production, scripted in tests),
``exclude`` the hosts a retry should avoid (previous_hosts); when every candidate is
excluded, all of them are used again.  Returns None only when there is no endpoint.

Sources: envoy least_request_lb.cc ``unweightedHostPickNChoices`` (two draws with
replacement, strict ``<``, the first draw keeps ties), load_balancer_impl.cc round robin
(``rr_index_++ % size``) and random (``random() % size``).  Istio's default is LEAST_REQUEST;
its deprecated LEAST_CONN means the same.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from nodeproxy.waypoint.retry import choose_retry_endpoint

Draw = Callable[[], float]

DEFAULT_BALANCER = "LEAST_REQUEST"


def _index(draw: Draw, size: int) -> int:
    # min() guards a source that returns 1.0 (random.uniform can).
    return min(int(draw() * size), size - 1)


class Balancer(Protocol):
    name: str

    def pick(self, endpoints: Sequence[str], active: Mapping[str, int], draw: Draw,
             exclude: Collection[str] = ()) -> str | None: ...


class LeastRequest:
    """Power of two choices: two random endpoints, the one with fewer active requests."""

    __slots__ = ()
    name = "LEAST_REQUEST"
    choices = 2  # Envoy's default choice_count

    def pick(self, endpoints: Sequence[str], active: Mapping[str, int], draw: Draw,
             exclude: Collection[str] = ()) -> str | None:
        candidates = choose_retry_endpoint(endpoints, exclude) if exclude else endpoints
        if not candidates:
            return None
        size = len(candidates)
        best = candidates[_index(draw, size)]
        for _ in range(self.choices - 1):
            sampled = candidates[_index(draw, size)]
            if active.get(sampled, 0) < active.get(best, 0):
                best = sampled
        return best


class RoundRobin:
    """Each candidate in turn; the only state is the next index, bounded by the list size."""

    __slots__ = ("_next",)
    name = "ROUND_ROBIN"

    def __init__(self, start: int = 0) -> None:
        self._next = start

    def pick(self, endpoints: Sequence[str], active: Mapping[str, int], draw: Draw,
             exclude: Collection[str] = ()) -> str | None:
        candidates = choose_retry_endpoint(endpoints, exclude) if exclude else endpoints
        if not candidates:
            return None
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]


class Random:
    """A uniformly random candidate."""

    __slots__ = ()
    name = "RANDOM"

    def pick(self, endpoints: Sequence[str], active: Mapping[str, int], draw: Draw,
             exclude: Collection[str] = ()) -> str | None:
        candidates = choose_retry_endpoint(endpoints, exclude) if exclude else endpoints
        if not candidates:
            return None
        return candidates[_index(draw, len(candidates))]


_FACTORIES: dict[str, Callable[[], Balancer]] = {
    "LEAST_REQUEST": LeastRequest,
    "LEAST_CONN": LeastRequest,  # deprecated Istio name, mapped to LEAST_REQUEST by pilot
    "ROUND_ROBIN": RoundRobin,
    "RANDOM": Random,
}
BALANCER_NAMES = ("LEAST_REQUEST", "ROUND_ROBIN", "RANDOM")


def balancer_for(name: str) -> Balancer:
    """A new balancer for a DestinationRule ``loadBalancer.simple`` value."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown load balancer {name!r}; use one of "
                         f"{', '.join(BALANCER_NAMES)}") from None


__all__ = [
    "BALANCER_NAMES", "DEFAULT_BALANCER", "Balancer", "Draw", "LeastRequest", "Random",
    "RoundRobin", "balancer_for",
]
