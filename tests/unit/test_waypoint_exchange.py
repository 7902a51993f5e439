"""exchange.run_tries with a scripted ``try_once`` and a real Cluster: which endpoint each try
goes to, what counts as active (LEAST_REQUEST, activeRequests) and for how long, the retry
limit and the breaker's retry budget, and what the client gets when retries end."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import pytest

from nodeproxy.waypoint.cluster import Cluster, ClusterKey
from nodeproxy.waypoint.exchange import Answered, Exchange, Forward, GaveUp, run_tries
from nodeproxy.waypoint.proxy import WaypointProxy, WaypointSettings
from nodeproxy.waypoint.retry import Outcome, RetryPolicy
from nodeproxy.waypoint.telemetry import WaypointMetrics
from nodeproxy.waypoint.upstream import Endpoint, Upstreams, endpoint_for
from ztunnel_cfg.l7 import Request, TrafficPolicy
from ztunnel_cfg.model import (
    ConnectionPool,
    HttpPoolSettings,
    LoadBalancerPolicy,
    Workload,
)
from ztunnel_cfg.snapshot import Snapshot

SERVICE = "default/flaky.default.svc.cluster.local"
FIVE_XX = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}), backoff_base=0.001)


def _endpoint(name: str, ip: str) -> Endpoint:
    return endpoint_for(Workload(name=name, namespace="default",
                                 workload_ips=(ipaddress.ip_address(ip),), node="node2"),
                        None, 8080)


A = _endpoint("flaky-a", "10.0.0.1")
B = _endpoint("flaky-b", "10.0.0.2")


@dataclass(frozen=True)
class Response:
    """What a try got back (the protocol modules' response objects stand for it)."""

    status: int
    body: str = ""


class Script:
    """A ``try_once`` that answers from a script and records the endpoint of every try,
    and how many requests were active on it while the try ran."""

    def __init__(self, cluster: Cluster,
                 results: Iterable[Response | Outcome | Exception]) -> None:
        self.cluster = cluster
        self.results = list(results)
        self.tried: list[str] = []
        self.active_during: list[int] = []
        self.discarded: list[Response] = []

    async def __call__(self, endpoint: Endpoint) -> Response | Outcome:
        self.tried.append(endpoint.address)
        self.active_during.append(self.cluster.active.get(endpoint.address, 0))
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def _cluster(*endpoints: Endpoint, max_retries: int | None = None) -> Cluster:
    http = HttpPoolSettings() if max_retries is None else HttpPoolSettings(
        max_retries=max_retries)
    cluster = Cluster(ClusterKey(SERVICE, 80),
                      TrafficPolicy(SERVICE, "default/flaky", ConnectionPool(http=http), None,
                                    LoadBalancerPolicy.ROUND_ROBIN), rng=random.Random(7))
    cluster.update(cluster.policy, list(endpoints))
    return cluster


def _proxy() -> WaypointProxy:
    def no_snapshot() -> Snapshot:
        raise AssertionError("run_tries does not read the config")

    # run_tries uses the proxy's metrics and random source only.
    return WaypointProxy(no_snapshot, lambda: None, cast(Upstreams, None), WaypointMetrics(),
                         WaypointSettings(), rng=random.Random(3))


def _forward(cluster: Cluster, policy: RetryPolicy = FIVE_XX) -> Forward:
    return Forward(Request("GET", "/", "flaky"), None, cluster, policy, None, None)


async def _run(proxy: WaypointProxy, cluster: Cluster, script: Script, *,
               policy: RetryPolicy = FIVE_XX, replayable: bool = True
               ) -> tuple[Answered[Response] | GaveUp, Exchange]:
    ex = Exchange("GET", "/", "http")
    done = await run_tries(proxy, _forward(cluster, policy), ex,
                           replayable=lambda: replayable, try_once=script,
                           status_of=lambda r: (r.status, None),
                           discard=script.discarded.append)
    return done, ex


# -- active requests (LEAST_REQUEST, activeRequests) ----------------------------------------

async def test_the_answer_stays_active_until_the_caller_has_sent_it() -> None:
    cluster = _cluster(A)
    script = Script(cluster, [Response(200)])
    done, _ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    assert script.active_during == [1]
    # Response headers are in, the body is not sent yet: still active on that endpoint.
    assert cluster.active[A.address] == 1
    cluster.finished(done.endpoint.address)  # what the protocol modules do after _respond
    assert cluster.active[A.address] == 0


async def test_tries_that_are_not_the_answer_stop_counting_when_they_end() -> None:
    cluster = _cluster(A, B)
    script = Script(cluster, [Response(503), Response(200)])
    done, _ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    failed, answered = script.tried
    assert cluster.active == {failed: 0, answered: 1}
    assert script.discarded == [Response(503)]


async def test_failed_and_raising_tries_are_not_left_active() -> None:
    cluster = _cluster(A)
    script = Script(cluster, [Outcome("reset")])
    done, _ex = await _run(_proxy(), cluster, script, policy=RetryPolicy(0, frozenset()))
    assert isinstance(done, GaveUp)
    assert cluster.active.get(A.address, 0) == 0
    script = Script(cluster, [RuntimeError("the client went away")])
    with pytest.raises(RuntimeError):
        await _run(_proxy(), cluster, script)
    assert cluster.active.get(A.address, 0) == 0


# -- which endpoint, how many tries, what the client gets ------------------------------------

async def test_a_retry_goes_to_another_endpoint_than_the_failed_one() -> None:
    for _ in range(5):  # whichever endpoint the balancer starts with
        cluster = _cluster(A, B)
        script = Script(cluster, [Response(503), Response(200)])
        done, ex = await _run(_proxy(), cluster, script)
        assert isinstance(done, Answered)
        first, second = script.tried
        assert first != second
        assert done.endpoint.address == second
        assert (ex.attempts, ex.flags) == (2, "-")


async def test_the_retry_limit_passes_the_last_answer_through_flagged_urx() -> None:
    cluster = _cluster(A)
    script = Script(cluster, [Response(503, "1"), Response(503, "2"), Response(503, "3")])
    done, ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    assert done.response == Response(503, "3")  # the endpoint's answer, not a made-up one
    assert (ex.attempts, ex.flags) == (3, "URX")
    assert script.discarded == [Response(503, "1"), Response(503, "2")]


async def test_a_5xx_that_is_not_retriable_is_not_urx_even_after_a_retry() -> None:
    # A connect failure was retried, then the endpoint answered 500, which this policy does
    # not retry: retries did not end for the limit, so no URX.
    cluster = _cluster(A, B)
    policy = RetryPolicy(2, frozenset({"connect-failure"}), backoff_base=0.001)
    script = Script(cluster, [Outcome("connect_failure"), Response(500)])
    done, ex = await _run(_proxy(), cluster, script, policy=policy)
    assert isinstance(done, Answered)
    assert (ex.attempts, ex.flags) == (2, "-")


async def test_an_exhausted_retry_budget_passes_the_answer_through_flagged_uo() -> None:
    # maxRetries 1, and another request already holds that retry.
    cluster = _cluster(A, B, max_retries=1)
    assert cluster.breaker.try_acquire_retry()
    script = Script(cluster, [Response(503, "the endpoint's own body")])
    done, ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    assert done.response == Response(503, "the endpoint's own body")
    assert (ex.attempts, ex.flags) == (1, "UO")
    assert not script.discarded
    assert cluster.breaker.stats()["retries"].overflows == 1
    cluster.breaker.release_retry()
    # With the budget back, the same request is retried (and the retry is given back).
    script = Script(cluster, [Response(503), Response(200)])
    done, ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    assert (ex.attempts, ex.flags) == (2, "-")
    assert cluster.breaker.stats()["retries"].active == 0


async def test_answers_that_need_no_retry_never_touch_the_retry_budget() -> None:
    cluster = _cluster(A, max_retries=1)
    assert cluster.breaker.try_acquire_retry()
    done, ex = await _run(_proxy(), cluster, Script(cluster, [Response(200)]))
    assert isinstance(done, Answered)
    assert ex.flags == "-"
    assert cluster.breaker.stats()["retries"].overflows == 0
    cluster.breaker.release_retry()


async def test_a_request_that_cannot_be_replayed_is_not_retried() -> None:
    # Body larger than the replay buffer, or streamed: the protocol modules say so.
    cluster = _cluster(A, B)
    script = Script(cluster, [Response(503)])
    done, ex = await _run(_proxy(), cluster, script, replayable=False)
    assert isinstance(done, Answered)
    assert (ex.attempts, ex.flags) == (1, "-")


async def test_max_retries_zero_means_no_limit_as_in_istio() -> None:
    cluster = _cluster(A, max_retries=0)
    assert cluster.breaker.limits.max_retries == 2**32 - 1
    script = Script(cluster, [Response(503), Response(200)])
    done, ex = await _run(_proxy(), cluster, script)
    assert isinstance(done, Answered)
    assert ex.attempts == 2
