"""Config -> plain document (camelCase keys, the loader's input shape).

``load_config_text(yaml.safe_dump(config_to_document(c)))`` gives back an equal Config;
used by ``config show -o json|yaml`` and the admin API's config dump.
"""

from __future__ import annotations

from typing import Any

from ztunnel_cfg.model import (
    HBONE_PORT,
    Config,
    HttpRoute,
    Match,
    PeerAuthentication,
    Policy,
    PortMap,
    Service,
    WaypointRef,
    Workload,
)

__all__ = [
    "config_to_document",
    "policy_to_document",
    "service_to_document",
    "workload_to_document",
]


def _ports(ports: PortMap) -> dict[int, int]:
    return dict(ports)


def _waypoint(ref: WaypointRef) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": ref.destination}
    if ref.hbone_mtls_port != HBONE_PORT:
        out["hboneMtlsPort"] = ref.hbone_mtls_port
    return out


def workload_to_document(w: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "workloadIps": [str(ip) for ip in w.workload_ips],
        "node": w.node,
        "protocol": w.protocol.value,
    }
    if w.netns is not None:
        out["netns"] = w.netns
    if w.waypoint is not None:
        out["waypoint"] = _waypoint(w.waypoint)
    if w.services:
        out["services"] = {key: _ports(ports) for key, ports in w.services}
    out["canonicalName"] = w.app
    out["canonicalRevision"] = w.canonical_revision
    out["trustDomain"] = w.trust_domain
    out["clusterId"] = w.cluster_id
    out["healthy"] = w.healthy
    if w.labels:
        out["labels"] = dict(w.labels)
    return out


def service_to_document(s: Service) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [f"/{ip}" for ip in s.vips],
        "ports": _ports(s.ports),
    }
    if s.subject_alt_names:
        out["subjectAltNames"] = list(s.subject_alt_names)
    if s.waypoint is not None:
        out["waypoint"] = _waypoint(s.waypoint)
    return out


_MATCH_KEYS = [
    ("namespaces", "namespaces"),
    ("service_accounts", "serviceAccounts"),
    ("principals", "principals"),
    ("source_ips", "sourceIps"),
    ("destination_ips", "destinationIps"),
    ("destination_ports", "destinationPorts"),
]


def _match(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, key in _MATCH_KEYS:
        for a, k in ((attr, key), ("not_" + attr, "not" + key[0].upper() + key[1:])):
            values = getattr(m, a)
            if values:
                out[k] = [v if isinstance(v, int) else str(v) for v in values]
    return out


def policy_to_document(p: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": p.name,
        "namespace": p.namespace,
        "scope": p.scope.value,
        "action": p.action.value,
        "rules": [[[_match(m) for m in clause] for clause in rule] for rule in p.rules],
    }
    if p.selector:
        out["selector"] = dict(p.selector)
    if p.workload_uids:
        out["workloadUids"] = list(p.workload_uids)
    return out


def _peer_auth(pa: PeerAuthentication) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pa.name:
        out["name"] = pa.name
    if pa.namespace is not None:
        out["namespace"] = pa.namespace
    if pa.selector:
        out["selector"] = dict(pa.selector)
    if pa.workload_uids:
        out["workloadUids"] = list(pa.workload_uids)
    out["mode"] = pa.mode.value
    return out


def _route(r: HttpRoute) -> dict[str, Any]:
    rules = []
    for rule in r.rules:
        doc: dict[str, Any] = {}
        if rule.matches:
            matches = []
            for m in rule.matches:
                md: dict[str, Any] = {}
                if m.path_prefix is not None:
                    md["pathPrefix"] = m.path_prefix
                if m.path_exact is not None:
                    md["path"] = m.path_exact
                if m.method is not None:
                    md["method"] = m.method
                if m.headers:
                    md["headers"] = dict(m.headers)
                matches.append(md)
            doc["matches"] = matches
        doc["backends"] = [
            {"service": b.service, "port": b.port, "weight": b.weight} for b in rule.backends
        ]
        if rule.timeout is not None:
            doc["timeout"] = rule.timeout
        if rule.retries is not None:
            retries: dict[str, Any] = {"attempts": rule.retries.attempts}
            if rule.retries.per_try_timeout is not None:
                retries["perTryTimeout"] = rule.retries.per_try_timeout
            doc["retries"] = retries
        rules.append(doc)
    return {"name": r.name, "namespace": r.namespace, "parent": r.parent, "rules": rules}


def config_to_document(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trustDomain": config.trust_domain,
        "workloads": [workload_to_document(w) for w in config.workloads],
        "services": [service_to_document(s) for s in config.services],
        "policies": [policy_to_document(p) for p in config.policies],
    }
    if config.waypoints:
        out["waypoints"] = [
            {
                "name": w.name,
                "namespace": w.namespace,
                "service": w.service,
                "trafficType": w.traffic_type.value,
            }
            for w in config.waypoints
        ]
    if config.routes:
        out["routes"] = [_route(r) for r in config.routes]
    if config.peer_authentications:
        out["peerAuthentication"] = [_peer_auth(pa) for pa in config.peer_authentications]
    return out
