"""Prometheus metrics with Istio's names and labels (DESIGN §7).

The registry is injected, so tests and several agents in one process never share state.
Labels never carry ports or connection ids (bounded cardinality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

MAX_CACHED_CHILDREN = 4096


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """The label values of one connection, as reported by one side."""

    reporter: str  # "source" (outbound side) or "destination" (inbound side)
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    source_app: str = "unknown"
    source_version: str = "unknown"
    source_cluster: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_app: str = "unknown"
    destination_version: str = "unknown"
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    destination_cluster: str = "unknown"
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = "unknown"

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in TCP_LABELS)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.failed = Counter(
            "istio_tcp_connections_failed", "TCP connections that failed", TCP_LABELS, registry=r
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent during a TCP connection", TCP_LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received during a TCP connection", TCP_LABELS,
            registry=r,
        )
        self.enrolled_pods = Gauge(
            "nodeproxy_enrolled_pods", "Pods enrolled on this node (rules, listeners, cert)",
            registry=r,
        )
        self.cert_expiry = Gauge(
            "nodeproxy_certificate_expiry_seconds", "Seconds until the identity's cert expires",
            ["identity"], registry=r,
        )
        self.cert_failures = Counter(
            "nodeproxy_certificate_fetch_failures", "Failed certificate fetches", ["identity"],
            registry=r,
        )
        self.pool_connections = Gauge(
            "nodeproxy_pool_connections", "Pooled outbound HBONE connections", registry=r
        )
        self.pool_streams = Gauge(
            "nodeproxy_pool_streams", "Streams on pooled HBONE connections", registry=r
        )
        self.open_connections = Gauge(
            "nodeproxy_open_connections", "Proxied connections currently open", ["direction"],
            registry=r,
        )
        self.build = Info("nodeproxy_build", "nodeproxy build information", registry=r)
        self.rejected = Counter(
            "nodeproxy_connections_rejected",
            "Connections or HBONE streams refused by a limit or a safety rule (docs/agent.md)",
            ["direction", "reason"], registry=r,
        )
        self.unenrolled_pods = Gauge(
            "nodeproxy_unenrolled_pods",
            "Mesh pods of this node that are not enrolled; their traffic is refused",
            registry=r,
        )
        self.enrollment_failures = Counter(
            "nodeproxy_enrollment_failures", "Failed attempts to enroll a pod", registry=r,
        )

        # Bound children by label set: Counter.labels() with 19 values (a lock, a str() and a
        # check per value) cost 5.5 us per opened and 15 us per closed connection; a cached
        # child costs a dict lookup.  Bounded: cleared when full (children stay registered).
        self._children: dict[tuple[int, ConnectionLabels], Any] = {}

    def _child(self, counter: Counter, labels: ConnectionLabels) -> Any:
        key = (id(counter), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= MAX_CACHED_CHILDREN:
                self._children.clear()
            child = self._children[key] = counter.labels(*labels.values())
        return child

    def connection_rejected(self, direction: str, reason: str) -> None:
        self.rejected.labels(direction, reason).inc()

    def connection_opened(self, labels: ConnectionLabels) -> None:
        self._child(self.opened, labels).inc()

    def connection_failed(self, labels: ConnectionLabels) -> None:
        self._child(self.failed, labels).inc()

    def connection_closed(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        self._child(self.closed, labels).inc()
        if sent:
            self._child(self.sent, labels).inc(sent)
        if received:
            self._child(self.received, labels).inc(received)
