"""What every L7 request goes through, whatever its protocol (HTTP/1.1 or HTTP/2):
authorization, route selection, redirect, rewrite, backend choice (:func:`decide`), then
tries against endpoints with retries, back-off, outlier detection and the circuit breaker's
retry budget (:func:`run_tries`).  The protocol modules only move bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nodeproxy.waypoint.cluster import Cluster
from nodeproxy.waypoint.proxy import Downstream, WaypointProxy
from nodeproxy.waypoint.retry import Outcome, backoff, should_retry
from nodeproxy.waypoint.telemetry import RequestRecord
from nodeproxy.waypoint.upstream import Endpoint
from ztunnel_cfg.l7 import Request, RetryPolicy, mirrors, retry_policy, timeouts
from ztunnel_cfg.l7.plan import L7Reply, plan_request
from ztunnel_cfg.model import BackendRef, RouteRule, Workload

log = logging.getLogger("nodeproxy.waypoint")
_EXTRA = {"component": "waypoint"}
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class LocalReply:
    """The waypoint answers itself (deny, no route, redirect, overflow ...)."""

    status: int
    text: str
    flags: str = "-"
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``request`` (rewritten) to ``cluster`` with this retry policy and timeouts."""

    request: Request
    rule: RouteRule | None
    cluster: Cluster
    policy: RetryPolicy
    request_timeout: float | None
    per_try_timeout: float | None


@dataclass(slots=True)
class Exchange:
    """What one request accumulated, for the access log and metrics."""

    method: str
    path: str
    protocol: str  # "http" | "grpc"
    route: str = "-"
    flags: str = "-"
    status: int = 0
    grpc_status: str = ""
    upstream: str = ""
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    destination: Workload | None = None
    reason: str = ""
    traceparent: str = ""


def with_traceparent(headers: tuple[tuple[str, str], ...]) -> tuple[
        tuple[tuple[str, str], ...], str]:
    """Headers carrying a W3C traceparent (kept when the client sent one, else started)."""
    for name, value in headers:
        if name == "traceparent":
            return headers, value
    trace = new_traceparent("01")
    return (*headers, ("traceparent", trace)), trace


# Trace and span ids need to be random, not secret: one seeded generator, not a getrandom()
# syscall per id (with_traceparent was 2.3% of the waypoint's samples under h2load).
_ids = random.Random(os.urandom(16))


def new_traceparent(flags: str) -> str:
    """A W3C traceparent with fresh (non-zero) trace and span ids."""
    trace = _ids.getrandbits(128) or 1
    span = _ids.getrandbits(64) or 1
    return f"00-{trace:032x}-{span:016x}-{flags}"


def decide(proxy: WaypointProxy, down: Downstream, request: Request, ex: Exchange
           ) -> LocalReply | Forward:
    """Policy and routing for one request (:func:`ztunnel_cfg.l7.plan.plan_request`, the
    decision ``explain`` shows too), then the cluster of the chosen backend."""
    target = down.target
    plan = plan_request(down.snapshot, down.waypoint, target.service, target.port, request,
                        source_identity=down.peer, source_ip=down.peer_ip,
                        destination_ip=target.authority.rpartition(":")[0].strip("[]"),
                        draw=proxy.rng.random(), workload=target.workload)
    ex.route = plan.route
    if isinstance(plan, L7Reply):
        return LocalReply(plan.status, plan.text, plan.flags, plan.reason, plan.headers)
    cluster = proxy.cluster_for_target(down.snapshot, target, plan.backend)
    request_timeout, per_try = timeouts(plan.rule)
    return Forward(plan.request, plan.rule, cluster, retry_policy(plan.rule),
                   request_timeout, per_try)


@dataclass(frozen=True, slots=True)
class Answered(Generic[R]):
    """A try that got a response the caller will stream (``response``), from ``endpoint``.

    The request still counts as active on ``endpoint`` (LEAST_REQUEST, activeRequests): the
    caller calls ``cluster.finished(endpoint.address)`` once the response has been fully
    sent or has failed (a ``finally`` after streaming it)."""

    endpoint: Endpoint
    response: R


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Every try failed (or the failure is not retriable): answer with ``reply``."""

    reply: LocalReply


# One try: a response to stream (R), or how it failed.  ``discard`` is called for a response
# that will be retried instead of streamed (the caller frees its connection).
TryOnce = Callable[[Endpoint], Awaitable["R | Outcome"]]


async def run_tries(proxy: WaypointProxy, fwd: Forward, ex: Exchange, *,
                    replayable: Callable[[], bool],
                    try_once: Callable[[Endpoint], Awaitable[R | Outcome]],
                    status_of: Callable[[R], tuple[int, int | None]],
                    discard: Callable[[R], None]) -> Answered[R] | GaveUp:
    """Try endpoints of ``fwd.cluster`` until a response is worth streaming, retrying what
    the policy allows (Envoy semantics: previous hosts avoided, jittered back-off, the
    breaker's retry budget, outlier detection fed with every result)."""
    cluster = fwd.cluster
    metrics = proxy.metrics
    service = cluster.hostname
    tried: set[str] = set()
    retries = 0
    holding_retry = False
    try:
        while True:
            endpoint = cluster.pick(tried)
            if endpoint is None:
                return GaveUp(LocalReply(503, "no healthy upstream", "UH",
                                         f"no healthy endpoint in {cluster.key}"))
            tried.add(endpoint.address)
            ex.attempts += 1
            ex.upstream = endpoint.address
            ex.destination = endpoint.workload
            # Active from here until the response is fully sent (the caller's finally, see
            # Answered) or, for a try that is not the answer, until it ends.
            cluster.started(endpoint.address)
            try:
                result = await try_once(endpoint)
            except BaseException:
                cluster.finished(endpoint.address)
                raise
            response: R | None = None
            if isinstance(result, Outcome):
                cluster.finished(endpoint.address)
                outcome = result
                _note(proxy, cluster, endpoint.address,
                      "connect_failure" if outcome.kind == "connect_failure" else outcome.kind)
            else:
                response = result
                status, grpc = status_of(result)
                outcome = Outcome.response(status, grpc)
                _note(proxy, cluster, endpoint.address, status)
            if holding_retry:
                cluster.breaker.release_retry()
                holding_retry = False
            # The retry conditions and limit first; the breaker's retry budget only for a
            # retry that would happen (Envoy's shouldRetry), so answers that need no retry
            # never count as a budget overflow.
            decision = should_retry(fwd.policy, outcome, retries, replayable=replayable(),
                                    budget_ok=True)
            budget = decision.retry and cluster.breaker.try_acquire_retry()
            if decision.retry and not budget:
                decision = should_retry(fwd.policy, outcome, retries,
                                        replayable=replayable(), budget_ok=False)
            if not decision.retry:
                if response is not None:
                    # The endpoint's own answer goes to the client (Envoy), flagged URX when
                    # the retry limit ended retries, UO when the retry budget did.
                    if decision.response_flag is not None:
                        ex.flags = decision.response_flag
                    return Answered(endpoint, response)
                return GaveUp(_failure_reply(outcome, decision.response_flag, ex))
            if response is not None:
                cluster.finished(endpoint.address)
                discard(response)
            holding_retry = True
            retries += 1
            metrics.retries.labels(destination_service=service, reason=(
                outcome.kind if outcome.kind != "response" else str(outcome.status))).inc()
            await asyncio.sleep(backoff(retries - 1, fwd.policy, proxy.rng.random()))
    finally:
        if holding_retry:
            cluster.breaker.release_retry()


def _note(proxy: WaypointProxy, cluster: Cluster, address: str, result: int | str) -> None:
    reason = cluster.record(address, result)
    if reason is not None:
        proxy.metrics.ejections.labels(destination_service=cluster.hostname,
                                       reason=str(reason)).inc()
        log.info("endpoint %s of %s ejected (%s)", address, cluster.key, reason, extra=_EXTRA)


def _failure_reply(outcome: Outcome, flag: str | None, ex: Exchange) -> LocalReply:
    why = ex.reason or outcome.describe()
    if outcome.kind == "per_try_timeout":
        return LocalReply(504, "upstream request timeout", "UT", why)
    flags = {"connect_failure": "UF", "refused_stream": "UF"}.get(outcome.kind, "UC")
    if flag == "URX" and ex.attempts > 1:
        flags = "URX," + flags
    return LocalReply(503, "upstream connect error or disconnect/reset before headers", flags,
                      why)


def record(proxy: WaypointProxy, down: Downstream, ex: Exchange, started: float) -> None:
    src = down.source
    service = down.target.service
    dst = ex.destination or down.target.workload
    proxy.metrics.request_done(RequestRecord(
        conn_id=down.conn_id,
        source_workload=src.name if src else "unknown",
        source_namespace=src.namespace if src else down.peer.namespace,
        source_principal=str(down.peer),
        source_app=src.canonical_name if src else "unknown",
        source_version=src.canonical_revision if src else "unknown",
        destination_workload=dst.name if dst else "unknown",
        destination_namespace=dst.namespace if dst else (
            service.namespace if service else "unknown"),
        destination_principal=str(dst.identity) if dst else "unknown",
        destination_app=dst.canonical_name if dst else "unknown",
        destination_version=dst.canonical_revision if dst else "unknown",
        destination_service=service.hostname if service else "unknown",
        destination_service_name=service.name if service else "unknown",
        destination_service_namespace=service.namespace if service else "unknown",
        request_protocol=ex.protocol,
        method=ex.method,
        path=ex.path,
        authority=down.target.authority,
        response_code=ex.status,
        grpc_status=ex.grpc_status,
        response_flags=ex.flags,
        route=ex.route,
        upstream=ex.upstream,
        attempts=ex.attempts,
        request_bytes=ex.request_bytes,
        response_bytes=ex.response_bytes,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
        traceparent=ex.traceparent,
        reason=ex.reason,
    ))



MAX_MIRRORS_IN_FLIGHT = 64  # shadow requests at once; more are dropped (and counted)


def mirror_clusters(proxy: WaypointProxy, down: Downstream, fwd: Forward) -> list[Cluster]:
    """Clusters that get a copy of this request (RequestMirror filters, each with its
    percent drawn), as long as the waypoint has room for more shadow requests."""
    if fwd.rule is None:
        return []
    out = []
    for mirror in mirrors(fwd.rule):
        if proxy.rng.random() * 100 >= mirror.percent:
            continue
        if len(proxy.mirror_tasks) >= MAX_MIRRORS_IN_FLIGHT:
            proxy.metrics.mirrors.labels(result="dropped").inc()
            continue
        backend = BackendRef(service=mirror.backend_ref.service, port=mirror.backend_ref.port)
        out.append(proxy.cluster_for_target(down.snapshot, down.target, backend))
    return out


def shadow_host(host: str) -> str:
    """Envoy marks a mirrored request's Host/:authority with a ``-shadow`` suffix."""
    name, sep, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if sep and port.isdigit():
        return f"{name}-shadow:{port}"
    return f"{host}-shadow"


def spawn_mirror(proxy: WaypointProxy, cluster: Cluster,
                 send: Callable[[Endpoint], Awaitable[None]]) -> None:
    """Send one shadow request in the background; its response and errors are dropped."""

    async def run() -> None:
        endpoint = cluster.pick(set())
        if endpoint is None:
            proxy.metrics.mirrors.labels(result="no_endpoint").inc()
            return
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                await send(endpoint)
        except Exception as exc:  # a shadow never affects the real request
            proxy.metrics.mirrors.labels(result="failed").inc()
            log.debug("mirror to %s failed: %s", endpoint.address, exc, extra=_EXTRA)
        else:
            proxy.metrics.mirrors.labels(result="sent").inc()

    task = asyncio.get_running_loop().create_task(run())
    proxy.mirror_tasks.add(task)
    task.add_done_callback(proxy.mirror_tasks.discard)


MIRROR_TIMEOUT = 30.0
