"""The waypoint's request metrics (Istio's names, ``reporter="waypoint"``) and access log.

One access-log line and one observation per request.  Bound label children are cached per
label tuple (bounded), so a request costs dictionary lookups, not ``labels()`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nodeproxy.metrics import TCP_LABELS

log = logging.getLogger("nodeproxy.access")

# Istio's request labels: the TCP ones plus the response code and gRPC status.
REQUEST_LABELS = (*TCP_LABELS, "response_code", "grpc_response_status")
# Envoy's default histogram buckets (milliseconds), as istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                       60000, 300000, 600000, 1800000, 3600000)
# Envoy's default size buckets (bytes) for istio_request_bytes / istio_response_bytes.
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
_CACHE_LIMIT = 4096  # distinct label tuples kept bound; beyond it, bound per call
# Access-log lines are handed to logging in bursts: a line waits at most ACCESS_LOG_DELAY
# seconds (Envoy buffers its access log for up to 1 s) or until ACCESS_LOG_BURST lines wait.
# Measured (issue 14, waypoint and log writer thread on one CPU at ~1,000 req/s): a hand-off
# per request woke the writer thread for every line, ~130 us of the loop's wall time per
# request in record() (cProfile); one wake-up per burst instead.
ACCESS_LOG_DELAY = 0.05
ACCESS_LOG_BURST = 256


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the waypoint knows about one finished request (labels and access log)."""

    conn_id: str
    source_workload: str
    source_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    destination_workload: str
    destination_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_service: str  # hostname
    destination_service_name: str
    destination_service_namespace: str
    request_protocol: str  # http | grpc
    method: str
    path: str
    authority: str
    response_code: int
    grpc_status: str
    response_flags: str
    route: str
    upstream: str  # endpoint ip:port that answered ("" when none)
    attempts: int
    request_bytes: int
    response_bytes: int
    duration_ms: float
    traceparent: str
    reason: str = ""

    def label_values(self) -> tuple[str, ...]:
        return (
            "waypoint", self.source_workload, self.source_namespace, self.source_principal,
            self.source_app, self.source_version, "unknown", self.destination_workload,
            self.destination_namespace, self.destination_principal, self.destination_app,
            self.destination_version, self.destination_service, self.destination_service_name,
            self.destination_service_namespace, "unknown", self.request_protocol,
            self.response_flags, "mutual_tls", str(self.response_code), self.grpc_status,
        )


_ACCESS_FIELDS = tuple(f.name for f in fields(RequestRecord))


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests_total", "Requests handled by the waypoint",
                                REQUEST_LABELS, registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration (ms)", REQUEST_LABELS,
                                  buckets=DURATION_BUCKETS_MS, registry=r)
        self.request_bytes = Histogram("istio_request_bytes", "Request sizes (bytes)",
                                       REQUEST_LABELS, buckets=SIZE_BUCKETS, registry=r)
        self.response_bytes = Histogram("istio_response_bytes", "Response sizes (bytes)",
                                        REQUEST_LABELS, buckets=SIZE_BUCKETS, registry=r)
        self.retries = Counter("nodeproxy_waypoint_retries_total",
                               "Request retries, by destination service and reason",
                               ("destination_service", "reason"), registry=r)
        self.ejections = Counter("nodeproxy_waypoint_ejections_total",
                                 "Endpoints ejected by outlier detection",
                                 ("destination_service", "reason"), registry=r)
        self.overflows = Counter("nodeproxy_waypoint_overflow_total",
                                 "Requests refused by a circuit breaker (503 UO)",
                                 ("destination_service", "limit"), registry=r)
        self.mirrors = Counter("nodeproxy_waypoint_mirrored_requests_total",
                               "Shadow copies of requests (RequestMirror), by result",
                               ("result",), registry=r)
        self.tcp_connections = Counter("nodeproxy_waypoint_tcp_connections_total",
                                       "Tunnels proxied as TCP (no HTTP detected)",
                                       ("destination_service", "response_flags"), registry=r)
        self.active_requests = Gauge("nodeproxy_waypoint_active_requests",
                                     "Requests in flight", registry=r)
        self.rejected = Counter("nodeproxy_waypoint_connections_rejected_total",
                                "Downstream connections or tunnels refused, by reason",
                                ("reason",), registry=r)
        self._bound: dict[tuple[str, ...], tuple[Counter, Histogram, Histogram, Histogram]] = {}
        self._access: list[tuple[float, RequestRecord]] = []  # lines waiting for their burst
        self._access_timer: asyncio.TimerHandle | None = None

    def request_done(self, rec: RequestRecord) -> None:
        values = rec.label_values()
        bound = self._bound.get(values)
        if bound is None:
            bound = (self.requests.labels(*values), self.duration.labels(*values),
                     self.request_bytes.labels(*values), self.response_bytes.labels(*values))
            if len(self._bound) < _CACHE_LIMIT:
                self._bound[values] = bound
        requests, duration, req_bytes, resp_bytes = bound
        requests.inc()
        duration.observe(rec.duration_ms)
        req_bytes.observe(rec.request_bytes)
        resp_bytes.observe(rec.response_bytes)
        if not log.isEnabledFor(logging.INFO):
            return
        self._access.append((time.time(), rec))
        if len(self._access) >= ACCESS_LOG_BURST:
            self.flush_access()
        elif self._access_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a direct call): write at once
                self.flush_access()
                return
            self._access_timer = loop.call_later(ACCESS_LOG_DELAY, self.flush_access)

    def flush_access(self) -> None:
        """Write the access-log lines waiting for their burst (also at shutdown)."""
        if self._access_timer is not None:
            self._access_timer.cancel()
            self._access_timer = None
        waiting, self._access = self._access, []
        for created, rec in waiting:
            write_access(rec, created)


def write_access(rec: RequestRecord, created: float | None = None) -> None:
    """One line per request (text key=value or JSON with --log-format json), stamped with
    ``created`` (when the request ended) if given."""
    if not log.isEnabledFor(logging.INFO):
        return
    data: dict[str, object] = {}
    for name in _ACCESS_FIELDS:
        value = getattr(rec, name)
        if value != "":
            data[name] = value
    record = log.makeRecord(log.name, logging.INFO, "(access)", 0, 'request "%s %s" %d %s',
                            (rec.method, rec.path, rec.response_code, rec.response_flags),
                            None, extra={"component": "access", "fields": data})
    if created is not None:
        record.created = created
        record.msecs = (created - int(created)) * 1000
    log.handle(record)
