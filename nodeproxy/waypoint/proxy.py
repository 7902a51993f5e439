"""The waypoint's data path: CONNECT streams from source agents, protocol detection, and the
hand-off to the HTTP/1.1 proxy or to TCP proxying (L4 policy only).

One :class:`WaypointProxy` per process.  It owns the clusters (per destination state) and
their HTTP/1.1 connection pools; they follow the config on every reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nodeproxy.errors import ProxyError
from nodeproxy.hbone.glue import HboneStream, StreamResetError
from nodeproxy.proxy import tunnel
from nodeproxy.relay import relay
from nodeproxy.waypoint.cluster import Cluster, ClusterKey
from nodeproxy.waypoint.http1 import Http1Limits
from nodeproxy.waypoint.sniff import MAX_SNIFF, Detected, detect
from nodeproxy.waypoint.target import Refusal, Target, resolve
from nodeproxy.waypoint.telemetry import WaypointMetrics
from nodeproxy.waypoint.upstream import Endpoint, Upstreams, endpoint_for
from nodeproxy.waypoint.upstream_http1 import Http1Pool
from ztunnel_cfg.authz import ConnectionInfo, authorize_tcp_at_waypoint
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.l7 import backend_endpoints, traffic_policy
from ztunnel_cfg.model import BackendRef, WaypointConfig, Workload
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.spiffe import SpiffeId

if TYPE_CHECKING:
    from nodeproxy.waypoint.http2_proxy import Http2Pool

log = logging.getLogger("nodeproxy.waypoint")
_EXTRA = {"component": "waypoint"}


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    # Silence this long at the start of a tunnel means a server-first protocol: TCP.
    detection_timeout: float = 1.0
    # Request bodies up to this size are held so that the request can be retried; larger or
    # streamed bodies are forwarded as they come and never retried.
    replay_buffer: int = 64 * 1024
    http1: Http1Limits = field(default_factory=Http1Limits)
    # A client that starts a request head must finish it this fast (slowloris); between
    # requests a keep-alive connection may stay silent for idle_timeout.
    request_header_timeout: float = 10.0


@dataclass(slots=True)
class Downstream:
    """One CONNECT tunnel from a source agent, accepted and about to be proxied."""

    conn_id: str
    stream: HboneStream
    peer: SpiffeId
    peer_ip: str
    source: Workload | None  # the peer IP's workload when its identity matches
    target: Target
    snapshot: Snapshot
    waypoint: WaypointConfig
    started: float
    live: dict[str, object] = field(default_factory=dict)


class WaypointProxy:
    def __init__(self, snapshot: Callable[[], Snapshot],
                 waypoint: Callable[[], WaypointConfig | None], upstreams: Upstreams,
                 metrics: WaypointMetrics, settings: WaypointSettings, *,
                 rng: random.Random | None = None) -> None:
        self._snapshot = snapshot
        self._waypoint = waypoint
        self.upstreams = upstreams
        self.metrics = metrics
        self.settings = settings
        self.rng = rng or random.Random()
        self.clusters: dict[ClusterKey, Cluster] = {}
        self.pools: dict[ClusterKey, Http1Pool] = {}
        self._ids = 0
        self.live: dict[str, Downstream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.h2pools: dict[ClusterKey, Http2Pool] = {}
        self.mirror_tasks: set[asyncio.Task[None]] = set()

    # -- config -------------------------------------------------------------------------------
    def snapshot_changed(self, snapshot: Snapshot) -> None:
        """Re-derive every cluster's endpoints and policy; drop clusters gone from config."""
        for key in list(self.clusters):
            endpoints = self._endpoints(snapshot, key)
            if endpoints is None:
                self.clusters.pop(key)
                pool = self.pools.pop(key, None)
                if pool is not None:
                    pool.close()
                h2pool = self.h2pools.pop(key, None)
                if h2pool is not None:
                    self._spawn(h2pool.aclose())
                continue
            self.clusters[key].update(traffic_policy(snapshot, key.service)
                                      if not key.service.startswith("pod:") else
                                      traffic_policy(snapshot, ""), endpoints)

    def _endpoints(self, snapshot: Snapshot, key: ClusterKey) -> list[Endpoint] | None:
        if key.service.startswith("pod:"):
            uid = key.service[4:]
            workload = snapshot.workload_by_uid(uid)
            return [endpoint_for(workload, None, key.port)] if workload is not None else None
        service = snapshot.service_by_key(key.service)
        if service is None:
            return None
        backend = BackendRef(service=key.service, port=key.port, subset=key.subset)
        return [endpoint_for(w, service, key.port) for w in backend_endpoints(snapshot, backend)]

    def cluster(self, snapshot: Snapshot, key: ClusterKey) -> Cluster:
        cluster = self.clusters.get(key)
        if cluster is None:
            service = "" if key.service.startswith("pod:") else key.service
            found = snapshot.service_by_key(service) if service else None
            cluster = Cluster(key, traffic_policy(snapshot, service), rng=self.rng,
                              hostname=found.hostname if found is not None else "")
            cluster.update(cluster.policy, self._endpoints(snapshot, key) or [])
            self.clusters[key] = cluster
        return cluster

    def http1_pool(self, cluster: Cluster) -> Http1Pool:
        pool = self.pools.get(cluster.key)
        if pool is None:
            pool = self.pools[cluster.key] = Http1Pool(cluster, self.upstreams,
                                                       self.settings.http1)
        return pool

    def http2_pool(self, cluster: Cluster) -> Http2Pool:
        pool = self.h2pools.get(cluster.key)
        if pool is None:
            from nodeproxy.waypoint.http2_proxy import Http2Pool

            pool = self.h2pools[cluster.key] = Http2Pool(cluster, self.upstreams)
        return pool

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (config tests): nothing can be open either
            work.close()
            return
        task = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cluster_for_target(self, snapshot: Snapshot, target: Target,
                           backend: BackendRef | None) -> Cluster:
        if backend is not None:
            return self.cluster(snapshot, ClusterKey(backend.service, backend.port,
                                                     tuple(sorted(backend.subset))))
        assert target.workload is not None
        return self.cluster(snapshot, ClusterKey(f"pod:{target.workload.uid}", target.port))

    # -- admin --------------------------------------------------------------------------------
    def dump(self) -> dict[str, object]:
        return {"clusters": [c.dump() for c in self.clusters.values()]}

    def live_rows(self) -> list[dict[str, object]]:
        return [{"id": d.conn_id, "source": str(d.peer), "target": d.target.description,
                 **d.live} for d in self.live.values()]

    async def aclose(self) -> None:
        for task in [*self._tasks, *self.mirror_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.mirror_tasks, return_exceptions=True)
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        for h2pool in self.h2pools.values():
            await h2pool.aclose()
        self.h2pools.clear()

    # -- CONNECT ------------------------------------------------------------------------------
    def _next_id(self) -> str:
        self._ids += 1
        return f"wp-{self._ids:x}"

    async def on_connect(self, stream: tunnel.ServerStream, authority: str, peer: SpiffeId,
                         headers: dict[str, str]) -> None:
        waypoint = self._waypoint()
        if waypoint is None:
            stream.refuse(503)
            return
        snapshot = self._snapshot()
        target = resolve(snapshot, waypoint, authority)
        if isinstance(target, Refusal):
            self.metrics.rejected.labels(reason="not_served").inc()
            log.info("CONNECT %s from %s refused: %s", authority, peer, target.reason,
                     extra=_EXTRA)
            stream.refuse(target.status)
            return
        source = snapshot.workload_by_ip(stream.peer_ip)
        if source is not None and source.identity != peer:
            source = None
        down = Downstream(self._next_id(), stream.stream, peer, stream.peer_ip, source, target,
                          snapshot, waypoint, time.monotonic())
        stream.accept()
        self.live[down.conn_id] = down
        try:
            first, detected = await self._sniff(down.stream)
            if detected is Detected.HTTP1:
                from nodeproxy.waypoint.http1_proxy import Http1Session

                await Http1Session(self, down, first).run()
                await _linger(down.stream)
            elif detected is Detected.HTTP2:
                from nodeproxy.waypoint.http2_proxy import Http2Session

                await Http2Session(self, down, first).run()
                await _linger(down.stream)
            else:
                await self._tcp(down, first, detected)
        except (NodeproxyError, OSError) as exc:
            log.info("tunnel %s from %s ended: %s", down.conn_id, peer, exc, extra=_EXTRA)
            down.stream.reset()
        finally:
            self.live.pop(down.conn_id, None)
            if not down.stream.is_reset:
                down.stream.close()

    async def _sniff(self, stream: HboneStream) -> tuple[bytes, Detected]:
        data = b""
        deadline = time.monotonic() + self.settings.detection_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return data, Detected.TCP
            try:
                async with asyncio.timeout(remaining):
                    chunk = await stream.read(MAX_SNIFF)
            except TimeoutError:
                return data, Detected.TCP
            if not chunk:
                return data, Detected.TCP
            data += chunk
            found = detect(data)
            if found is not None:
                return data, found

    # -- TCP ----------------------------------------------------------------------------------
    def authorize_tcp(self, down: Downstream) -> tuple[bool, str]:
        """L4 policy at the waypoint for a non-HTTP tunnel: HTTP fields cannot be checked, so
        an ALLOW rule with HTTP fields never matches and a DENY rule's HTTP fields are
        ignored (fail closed, as node agents do)."""
        target = down.target
        ip = target.authority.rpartition(":")[0].strip("[]")
        decision = authorize_tcp_at_waypoint(
            down.snapshot, down.waypoint, target.service,
            ConnectionInfo(down.peer, down.peer_ip, ip, target.port))
        return decision.allowed, decision.reason

    async def _tcp(self, down: Downstream, first: bytes, detected: Detected) -> None:
        allowed, reason = self.authorize_tcp(down)
        service = down.target.service.hostname if down.target.service else "unknown"
        if not allowed:
            self.metrics.tcp_connections.labels(destination_service=service,
                                                response_flags="DENY").inc()
            log.info("tunnel %s (%s) denied: %s", down.conn_id, detected.value, reason,
                     extra=_EXTRA)
            down.stream.reset()
            return
        backend = None
        if down.target.service is not None:
            backend = BackendRef(service=down.target.service.key, port=down.target.port)
        cluster = self.cluster_for_target(down.snapshot, down.target, backend)
        endpoint = cluster.pick(set())
        if endpoint is None:
            self.metrics.tcp_connections.labels(destination_service=service,
                                                response_flags="UH").inc()
            down.stream.reset()
            return
        if not cluster.breaker.try_acquire_connection():
            self.metrics.overflows.labels(destination_service=service,
                                          limit="connections").inc()
            self.metrics.tcp_connections.labels(destination_service=service,
                                                response_flags="UO").inc()
            down.stream.reset()
            return
        cluster.started(endpoint.address)
        flags = "-"
        try:
            try:
                up = await self.upstreams.open(endpoint, tunnel_headers(down))
            except (NodeproxyError, OSError) as exc:
                cluster.record(endpoint.address, "connect_failure")
                flags = "UF"
                raise ProxyError(f"connecting to {endpoint.address} failed: {exc}",
                                 flags="UF") from exc
            try:
                if first:
                    await up.stream.write(first)
                result = await relay(down.stream, up.stream,
                                     idle_timeout=self.settings.idle_timeout)
                if result.reset:
                    flags = "UR"
            finally:
                up.lease.release()
        except StreamResetError:
            flags = "UR"
        finally:
            cluster.finished(endpoint.address)
            cluster.breaker.release_connection()
            self.metrics.tcp_connections.labels(destination_service=service,
                                                response_flags=flags).inc()


def tunnel_headers(down: Downstream) -> list[tuple[str, str]]:
    """HBONE request headers towards the endpoint: the original client is forwarded (the
    destination agent trusts ``forwarded`` only from waypoints), a fresh traceparent."""
    trace = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
    return [("forwarded", f'for="{down.peer_ip}"'), ("traceparent", trace)]


LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024


async def _linger(stream: HboneStream) -> None:
    """After our last response (END_STREAM sent), give the client a moment to close its side,
    discarding what it still sends, so that the tunnel ends with END_STREAM both ways rather
    than a reset that could destroy the response in flight (a lingering close, as HTTP
    servers do)."""
    discarded = 0
    with contextlib.suppress(TimeoutError, StreamResetError):
        async with asyncio.timeout(LINGER_SECONDS):
            while discarded <= LINGER_BYTES:
                data = await stream.read()
                if not data:
                    return
                discarded += len(data)
