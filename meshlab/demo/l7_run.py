"""The runner of the demo's L7 act: add the act's pods to the running cluster, put the waypoint
and its services into the config (agents reload, enrol the new pods), start the waypoint and
the HTTP apps, send the requests with curl from the client pod, collect, and remove the act
again (also on failure): the config goes back to the L4 act's and the pods are deleted."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlab.build import Cluster
from meshlab.config import PodRole, captured_workloads, render_config
from meshlab.demo.l7 import (
    L7Observations,
    L7Scenario,
    Reply,
    counter_total,
    summarize_requests,
)
from meshlab.demo.scenario import Scenario
from meshlab.web import CurlResult, HttpApp, HttpReply

if TYPE_CHECKING:
    from meshlab.mesh import Mesh

# One request per connection: see tests/netns/waypoint_mesh.py (a keep-alive bug of the
# waypoint makes the second bodiless request of a connection stall).
_CLOSE = ("Connection: close",)


class L7Act:
    """The act's state between its phases; :meth:`remove` undoes :meth:`add` and is safe
    to call after a failure half way."""

    def __init__(self, cluster: Cluster, mesh: Mesh, scenario: Scenario, l7: L7Scenario,
                 workdir: Path) -> None:
        self.cluster, self.mesh, self.scenario, self.l7 = cluster, mesh, scenario, l7
        self.workdir = workdir
        self.added: list[str] = []  # pod short names
        self.roles: dict[str, PodRole] = {}
        self.apps: dict[tuple[str, str], HttpApp] = {}  # (workload, service) -> app
        self.base_doc: Mapping[str, Any] | None = None
        self.waypoint_pod = ""

    def _doc(self, with_l7: bool) -> dict[str, Any]:
        s, l7 = self.scenario, self.l7
        if not with_l7:
            return render_config(self.cluster.plan, s.roles, s.services, s.policies)
        return render_config(self.cluster.plan, {**s.roles, **self.roles},
                             [*s.services, *l7.services], [*s.policies, *l7.policies],
                             waypoints=[l7.waypoint], extra=l7.extra_config())

    def pod_of(self, workload: str) -> str:
        return next(p for p, r in {**self.scenario.roles, **self.roles}.items()
                    if r.name == workload)

    # -- phases --------------------------------------------------------------------------------
    def add(self) -> None:
        """Pods, config, waypoint, apps; returns once everything is ready."""
        self.base_doc = self._doc(False)
        for node, role in self.l7.pods:
            [pod] = self.cluster.add_pods(node, 1)
            self.added.append(pod.name)
            self.roles[pod.name] = role
        self.waypoint_pod = self.pod_of(self.l7.waypoint.pod)
        doc = self._doc(True)
        self.mesh.apply_config(doc)
        self.mesh.wait_enrolled(captured_workloads(doc))
        self.mesh.start_waypoint(self.waypoint_pod, self.l7.waypoint.key)
        self.mesh.wait_waypoint_ready(self.waypoint_pod)
        for app in self.l7.apps:
            service = self.l7.service(app.service)
            port = next(iter(service.ports.values()))
            record = self.workdir / f"l7-{app.service}-{app.workload}.jsonl"
            self.apps[(app.workload, app.service)] = self.cluster.serve_http(
                self.pod_of(app.workload), port, tag=app.workload, record=record,
                fail_percent=app.fail_percent, delay_ms=app.delay_ms)

    def _url(self, service: str, path: str) -> str:
        return f"http://{self.l7.service(service).vip}:80{path}"

    def _curl(self, urls: list[str], parallel: int = 0) -> list[CurlResult]:
        return self.cluster.curl(self.pod_of(self.l7.client), urls, parallel=parallel,
                                 headers=_CLOSE)

    def _fetch(self, service: str, path: str) -> HttpReply:
        return self.cluster.fetch(self.pod_of(self.l7.client), self._url(service, path),
                                  headers=_CLOSE)

    def drive(self, started: float) -> L7Observations:
        """Make the act's requests and read what everyone observed."""
        l7 = self.l7
        canary = self._curl([self._url("reviews", f"/canary/[1-{l7.canary_requests}]")])
        retries = self._curl([self._url("ratings", f"/ratings/[1-{l7.retry_requests}]")])
        [timeout] = self._curl([self._url("details", "/details/1")])
        breaker = self._curl([self._url("checkout", f"/checkout/{i}")
                              for i in range(l7.breaker_concurrency)],
                             parallel=l7.breaker_concurrency)
        allowed = self._fetch("reviews", l7.allowed_path)
        denied = self._fetch("reviews", l7.denied_path)
        # The waypoint counts a request once it answered: the client can be a little faster.
        metrics = self._settled_metrics(l7.request_count)
        dump = self.mesh.config_dump(self.waypoint_pod)
        wp_node = self.cluster.pod(self.waypoint_pod).node
        reviews = {w: self.apps[(w, "reviews")] for w in l7.canary_weights}
        ratings_host = l7.service("ratings").hostname
        return L7Observations(
            waypoint=l7.waypoint.key, waypoint_pod=self.waypoint_pod, waypoint_node=wp_node,
            waypoint_identity=str((dump.get("waypoint") or {}).get("identity")),
            canary=tuple(_reply(r) for r in canary),
            canary_recorded={w: sum(1 for r in app.requests()
                                    if str(r["path"]).startswith("/canary/"))
                             for w, app in reviews.items()},
            retries=tuple(_reply(r) for r in retries),
            retry_backend_statuses=tuple(self.apps[("reviews-v1", "ratings")].statuses()),
            retry_counter=counter_total(metrics, "nodeproxy_waypoint_retries_total",
                                        destination_service=ratings_host),
            timeout=_reply(timeout),
            timeout_backend_saw=len(self.apps[("reviews-v2", "details")].requests()),
            breaker=tuple(_reply(r) for r in breaker),
            breaker_backend_saw=len(self.apps[("reviews-v1", "checkout")].requests()),
            allowed=_full(allowed), denied=_full(denied),
            deny_backend_paths=tuple(
                str(r["path"]) for app in reviews.values() for r in app.requests()
                if not str(r["path"]).startswith("/canary/")),
            requests=summarize_requests(metrics),
            seconds=time.monotonic() - started,
        )

    def _settled_metrics(self, want: int, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.mesh.metrics(self.waypoint_pod)
            if sum(r.count for r in summarize_requests(text)) >= want or \
                    time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def remove(self) -> None:
        """Apps and waypoint stopped, the L4 config back (the agents un-enrol the act's
        pods), the pods deleted."""
        for app in self.apps.values():
            app.stop()
        self.apps.clear()
        if self.waypoint_pod and self.waypoint_pod in self.mesh.waypoints:
            self.mesh.stop_waypoint(self.waypoint_pod)
        try:
            if self.base_doc is not None and self.added:
                self.mesh.apply_config(self.base_doc)
                self.mesh.wait_enrolled(captured_workloads(self.base_doc))
        finally:
            for pod in self.added:
                self.mesh.release(pod)
            if self.added:
                self.cluster.remove_pods(self.added)
            self.added.clear()


def _reply(result: CurlResult) -> Reply:
    return Reply(result.status, result.served_by, result.seconds)


def _full(reply: HttpReply) -> Reply:
    return Reply(reply.status, reply.headers.get("x-served-by", ""), 0.0, reply.text())
