"""The mesh of the L7 scenarios (tests/netns/test_waypoint_*.py): real agents, a real
waypoint process in its own pod, HTTP apps in the backend pods and curl in the client pod.

Topology (2 nodes x 3 pods)::

    n1p1 client   default/client (mesh)      n2p1 waypoint  default/waypoint (not captured)
    n1p2 app-v1   default/app, version v1    n2p2 app-v2    default/app, version v2
    n1p3 legacy   outside the mesh           n2p3 legacy-2  outside the mesh

Every scenario has its own service (VIP 10.96.1.x:80, its own target port), all behind the
one waypoint, so one config serves the whole module and a scenario's circuit breaker or
outlier state cannot leak into another's.  A scenario starts its HTTP apps on its service's
target port and stops them at its end (:meth:`WaypointLab.stop_apps`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlab import Cluster, ClusterSpec, PodRole, ServiceDef, plan_cluster, random_prefix
from meshlab.config import WaypointDef, captured_workloads, render_config
from meshlab.mesh import Mesh
from meshlab.web import CurlResult, HttpApp, HttpReply
from tests.netns.mesh_fixtures import destroy_cluster, metric_value

CLIENT, APP_V1, APP_V2, WAYPOINT_POD = "n1p1", "n1p2", "n2p2", "n2p1"
LEGACY, LEGACY_SAME_NODE = "n1p3", "n2p3"
ROLES: dict[str, PodRole] = {
    CLIENT: PodRole("default", "client", name="client"),
    APP_V1: PodRole("default", "app", name="app-v1", labels={"version": "v1"}),
    LEGACY: PodRole("legacy", "legacy", mesh=False, name="legacy"),
    WAYPOINT_POD: PodRole("default", "waypoint", name="waypoint"),
    APP_V2: PodRole("default", "app", name="app-v2", labels={"version": "v2"}),
    LEGACY_SAME_NODE: PodRole("legacy", "legacy", mesh=False, name="legacy-2"),
}
WAYPOINT = WaypointDef("waypoint", "10.96.1.100", WAYPOINT_POD)
TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"
WAYPOINT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/waypoint"


def _service(name: str, index: int, endpoints: list[str]) -> ServiceDef:
    return ServiceDef(name, f"10.96.1.{index}", {80: 8000 + index}, endpoints, waypoint=WAYPOINT)


SERVICES: dict[str, ServiceDef] = {s.name: s for s in (
    _service("canary", 1, ["app-v1", "app-v2"]),
    _service("flaky", 2, ["app-v2"]),
    _service("slow", 3, ["app-v2"]),
    _service("pool", 4, ["app-v2"]),
    _service("outlier", 5, ["app-v1", "app-v2"]),
    _service("shop", 6, ["app-v1"]),
)}
# curl's sequential requests share one keep-alive connection (one tunnel), as clients do.
ROUTE_TIMEOUT = 0.25  # seconds; the slow app answers after 1.5 s
BASE_EJECTION = 2.0  # seconds
CONSECUTIVE_5XX = 3


def _key(name: str) -> str:
    return SERVICES[name].key


ROUTES: list[dict[str, Any]] = [
    {"name": "canary", "namespace": "default", "parentRefs": [{"service": _key("canary")}],
     "rules": [{"backendRefs": [
         {"service": _key("canary"), "port": 80, "weight": 90, "subset": {"version": "v1"}},
         {"service": _key("canary"), "port": 80, "weight": 10, "subset": {"version": "v2"}},
     ]}]},
    {"name": "flaky", "namespace": "default", "parentRefs": [{"service": _key("flaky")}],
     "rules": [{"backendRefs": [{"service": _key("flaky"), "port": 80}],
                "retry": {"attempts": 3, "retryOn": ["5xx"], "backoff": "5ms"}}]},
    {"name": "slow", "namespace": "default", "parentRefs": [{"service": _key("slow")}],
     "rules": [{"backendRefs": [{"service": _key("slow"), "port": 80}],
                "timeouts": {"request": f"{int(ROUTE_TIMEOUT * 1000)}ms"}}]},
]
TRAFFIC_POLICIES: list[dict[str, Any]] = [
    {"name": "pool", "namespace": "default", "service": _key("pool"),
     "connectionPool": {"tcp": {"maxConnections": 1},
                        "http": {"http1MaxPendingRequests": 1}}},
    {"name": "outlier", "namespace": "default", "service": _key("outlier"),
     "loadBalancer": {"simple": "ROUND_ROBIN"},
     "outlierDetection": {"consecutive5xxErrors": CONSECUTIVE_5XX, "interval": "200ms",
                          "baseEjectionTime": f"{BASE_EJECTION:g}s",
                          "maxEjectionPercent": 100}},
]
POLICIES: list[dict[str, Any]] = [
    {"name": "shop-no-admin", "namespace": "default", "action": "Deny",
     "targetRefs": [{"kind": "Service", "name": "shop"}],
     "rules": [[[{"paths": ["/admin*"]}]]]},
]


def lab_config(cluster: Cluster) -> dict[str, Any]:
    return render_config(cluster.plan, ROLES, list(SERVICES.values()), POLICIES,
                         waypoints=[WAYPOINT],
                         extra={"routes": ROUTES, "trafficPolicies": TRAFFIC_POLICIES})


_records = itertools.count(1)


@dataclass
class WaypointLab:
    cluster: Cluster
    mesh: Mesh
    workdir: Path
    apps: list[HttpApp] = field(default_factory=list)

    # -- apps and clients
    def serve(self, pod: str, service: str, **behaviour: int) -> HttpApp:
        """The HTTP app of ``service`` in ``pod`` (tag: the pod's workload name), with
        ``fail_percent`` / ``fail_status`` / ``delay_ms``."""
        port = next(iter(SERVICES[service].ports.values()))
        tag = ROLES[pod].name or pod
        record = self.workdir / f"http-{service}-{tag}-{next(_records)}.jsonl"
        app = self.cluster.serve_http(pod, port, tag=tag, record=record, **behaviour)
        self.apps.append(app)
        return app

    def stop_apps(self) -> None:
        for app in self.apps:
            app.stop()
        self.apps.clear()

    def url(self, service: str, path: str = "/") -> str:
        return f"http://{SERVICES[service].vip}:80{path}"

    def curl(self, urls: list[str], *, pod: str = CLIENT,
             headers: tuple[str, ...] = (),
             **kw: Any) -> list[CurlResult]:
        return self.cluster.curl(pod, urls, headers=headers, **kw)

    def fetch(self, url: str, *, pod: str = CLIENT,
              headers: tuple[str, ...] = (), **kw: Any) -> HttpReply:
        return self.cluster.fetch(pod, url, headers=headers, **kw)

    # -- observation
    def waypoint_metrics(self) -> str:
        return self.mesh.metrics(WAYPOINT_POD)

    def waypoint_metric(self, name: str, **labels: str) -> float:
        return metric_value(self.waypoint_metrics(), name, **labels)

    def requests_total(self, service: str, **labels: str) -> float:
        """istio_requests_total of the waypoint for ``service`` (summed over other labels)."""
        return self.waypoint_metric("istio_requests_total", reporter="waypoint",
                                    destination_service=SERVICES[service].hostname, **labels)

    def endpoints(self, service: str) -> dict[str, dict[str, Any]]:
        """The waypoint's endpoints of ``service`` by workload name (``/config_dump``
        ``clusters``): address, activeRequests, health."""
        dump = self.mesh.config_dump(WAYPOINT_POD)
        out: dict[str, dict[str, Any]] = {}
        for cluster in dump.get("clusters", []):
            if SERVICES[service].hostname in cluster["cluster"]:
                for ep in cluster.get("endpoints", []):
                    out[ep["workload"].rpartition("/")[2]] = ep
        return out

    def logs(self) -> str:
        nodes = [n.name for n in self.cluster.nodes]
        return "\n".join([*(self.mesh.log_tail(n, 8) for n in nodes),
                          self.mesh.waypoint_log_tail(WAYPOINT_POD, 12)])


@contextlib.contextmanager
def waypoint_lab(workdir: Path) -> Iterator[WaypointLab]:
    """The cluster, the CA service, both agents and the waypoint, ready; torn down on exit
    (also on failure), leaving no namespace behind."""
    plan = plan_cluster(ClusterSpec(random_prefix(), nodes=2, pods_per_node=3))
    cluster = Cluster.create(plan)
    mesh = Mesh(cluster, workdir)
    lab = WaypointLab(cluster, mesh, workdir)
    try:
        doc = lab_config(cluster)
        mesh.start(doc)
        mesh.start_waypoint(WAYPOINT_POD, WAYPOINT.key)
        mesh.wait_waypoint_ready(WAYPOINT_POD)
        mesh.wait_enrolled(captured_workloads(doc))
        yield lab
    finally:
        try:
            lab.stop_apps()
            mesh.stop()
        finally:
            destroy_cluster(cluster)
