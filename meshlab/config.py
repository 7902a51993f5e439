"""Render a nodeproxy config (DESIGN §6 shape) for a lab cluster.

Pure: takes a :class:`ClusterPlan` plus the roles of its pods and returns a dict; dump it
with :func:`dump_config`.  Mesh pods get ``protocol: HBONE`` and their ``netns`` path (the
agent of their node enrolls them); pods outside the mesh get ``protocol: TCP`` and no
``netns``, so no agent ever captures their traffic.  A :class:`WaypointDef` makes a pod the
waypoint proxy of the services that name it (``ServiceDef.waypoint``); agents do not capture
waypoint pods, the waypoint process speaks HBONE itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshlab.cgroups import pod_cgroup
from meshlab.topology import ClusterPlan, LabError, PodPlan

HBONE_PORT = 15008


@dataclass(frozen=True, slots=True)
class PodRole:
    """Who a pod is in the config.  ``name`` defaults to the pod's short name (n1p1)."""

    namespace: str = "default"
    service_account: str = "default"
    mesh: bool = True
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. {"version": "v2"}


@dataclass(frozen=True, slots=True)
class ServiceDef:
    """A service VIP whose endpoints are lab pods (by short name or workload name)."""

    name: str
    vip: str
    ports: Mapping[int, int]
    endpoints: Sequence[str]
    namespace: str = "default"
    extra: Mapping[str, Any] = field(default_factory=dict)
    waypoint: WaypointDef | None = None  # traffic to this service goes through it

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def key(self) -> str:
        """How routes, traffic policies and workloads refer to it: ``ns/hostname``."""
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class WaypointDef:
    """A waypoint proxy: its own service (HBONE port 15008, VIP ``vip``) whose one endpoint
    is the pod ``pod`` (short or workload name) that runs ``nodeproxy waypoint run``."""

    name: str
    vip: str
    pod: str
    namespace: str = "default"

    @property
    def service(self) -> ServiceDef:
        return ServiceDef(self.name, self.vip, {HBONE_PORT: HBONE_PORT}, [self.pod],
                          self.namespace)

    @property
    def key(self) -> str:
        """``--name`` of ``nodeproxy waypoint run``."""
        return f"{self.namespace}/{self.name}"

    def ref(self) -> dict[str, str]:
        """The ``waypoint:`` value of a service or workload that uses it."""
        return {"destination": self.service.key}

    def entry(self) -> dict[str, str]:
        """Its item under ``waypoints:``."""
        return {"name": self.name, "namespace": self.namespace, "service": self.service.key}



def workload_name(pod: PodPlan, role: PodRole) -> str:
    return role.name or pod.name


def render_config(
    plan: ClusterPlan,
    roles: Mapping[str, PodRole] | None = None,
    services: Sequence[ServiceDef] = (),
    policies: Sequence[Mapping[str, Any]] = (),
    *,
    cluster: str = "cluster1",
    extra: Mapping[str, Any] | None = None,
    waypoints: Sequence[WaypointDef] = (),
) -> dict[str, Any]:
    """The config document for ``plan``.  ``roles`` is keyed by pod short name; pods not
    listed are mesh pods in ``default`` with service account ``default``.  Each waypoint
    adds its service and its ``waypoints:`` entry.  ``extra`` top-level keys (e.g.
    ``peerAuthentication``, ``routes``, ``trafficPolicies``) are copied in as given."""
    roles = dict(roles or {})
    unknown = sorted(set(roles) - {p.name for p in plan.pods})
    if unknown:
        raise LabError(f"roles given for unknown pods: {', '.join(unknown)}",
                       hint=f"pods are {', '.join(p.name for p in plan.pods)}")
    by_name: dict[str, PodPlan] = {}
    for pod in plan.pods:
        by_name[pod.name] = pod
        by_name[workload_name(pod, roles.get(pod.name, PodRole()))] = pod

    memberships: dict[str, dict[str, dict[int, int]]] = {}
    rendered_services = []
    for svc in [*services, *(w.service for w in waypoints)]:
        key = f"{svc.namespace}/{svc.hostname}"
        for ep in svc.endpoints:
            if ep not in by_name:
                raise LabError(f"service {svc.name}: unknown endpoint pod {ep!r}")
            memberships.setdefault(by_name[ep].name, {})[key] = dict(svc.ports)
        rendered_services.append({
            "name": svc.name,
            "namespace": svc.namespace,
            "hostname": svc.hostname,
            "vips": [f"/{svc.vip}"],
            "ports": dict(svc.ports),
            **({"waypoint": svc.waypoint.ref()} if svc.waypoint is not None else {}),
            **svc.extra,
        })

    workloads = []
    for pod in plan.pods:
        role = roles.get(pod.name, PodRole())
        name = workload_name(pod, role)
        wl: dict[str, Any] = {
            "uid": f"{cluster}//v1/Pod/{role.namespace}/{name}",
            "name": name,
            "namespace": role.namespace,
            "serviceAccount": role.service_account,
            "workloadIps": [pod.ip],
            "node": pod.node,
            "protocol": "HBONE" if role.mesh else "TCP",
        }
        if role.labels:
            wl["labels"] = dict(role.labels)
        if role.mesh:
            wl["netns"] = pod.netns_path
            wl["cgroup"] = pod_cgroup(pod.netns)
        if pod.name in memberships:
            wl["services"] = memberships[pod.name]
        workloads.append(wl)

    doc: dict[str, Any] = {
        "workloads": workloads,
        "services": rendered_services,
        "policies": [dict(p) for p in policies],
    }
    if waypoints:
        doc["waypoints"] = [w.entry() for w in waypoints]
    doc.update(extra or {})
    return doc


def captured_workloads(doc: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per node, the uids an agent enrolls for ``doc`` (a rendered document): workloads with
    a ``netns``, except waypoints (endpoints of a service named under ``waypoints:``)."""
    waypoint_services = {w["service"] for w in doc.get("waypoints") or []}
    out: dict[str, list[str]] = {}
    for wl in doc.get("workloads") or []:
        if "netns" in wl and not waypoint_services & set(wl.get("services") or {}):
            out.setdefault(str(wl["node"]), []).append(str(wl["uid"]))
    return {node: sorted(uids) for node, uids in out.items()}


def dump_config(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False)
