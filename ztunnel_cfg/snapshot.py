"""An immutable, indexed view of a :class:`Config`.

Built once per (re)load in O(n); every lookup is a dict access.  The data path holds a
reference to one snapshot and never sees it change; a reload builds a new one and swaps it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ztunnel_cfg.l7.table import RouteCandidate, build_route_table
from ztunnel_cfg.loader import load_config_file
from ztunnel_cfg.model import (
    Config,
    IPAddress,
    MtlsMode,
    PeerAuthentication,
    Policy,
    Scope,
    Service,
    TargetKind,
    TrafficPolicyConfig,
    WaypointConfig,
    Workload,
)
from ztunnel_cfg.spiffe import SpiffeId

__all__ = ["DEFAULT_MTLS_MODE", "Snapshot", "load_snapshot", "to_ip"]

# Mesh-wide default when no peerAuthentication applies (Istio's default).
DEFAULT_MTLS_MODE = MtlsMode.PERMISSIVE


@functools.lru_cache(maxsize=8192)
def _parse_ip(text: str) -> IPAddress | None:
    # Cached: the data path looks up the same few thousand addresses over and over, and
    # ipaddress parsing was the largest cost of route()+authorize() in a profile.
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def to_ip(ip: str | IPAddress) -> IPAddress | None:
    """An address from a string or address object; ``None`` when it is not an IP."""
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip
    if not isinstance(ip, str):
        return None
    return _parse_ip(ip)


def _frozen(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    config: Config
    trust_domain: str
    _by_ip: MappingProxyType[IPAddress, Workload] = field(repr=False)
    _by_uid: MappingProxyType[str, Workload] = field(repr=False)
    _by_vip: MappingProxyType[tuple[IPAddress, int], Service] = field(repr=False)
    _by_key: MappingProxyType[str, Service] = field(repr=False)
    _endpoints: MappingProxyType[str, tuple[Workload, ...]] = field(repr=False)
    _healthy: MappingProxyType[str, tuple[Workload, ...]] = field(repr=False)
    _by_node: MappingProxyType[str, tuple[Workload, ...]] = field(repr=False)
    _identities: MappingProxyType[str, frozenset[SpiffeId]] = field(repr=False)
    _global_policies: tuple[Policy, ...] = field(repr=False)
    _ns_policies: MappingProxyType[str, tuple[Policy, ...]] = field(repr=False)
    _uid_policies: MappingProxyType[str, tuple[Policy, ...]] = field(repr=False)
    # (namespace, label key, label value) -> selector policies whose first label is that pair.
    _label_policies: MappingProxyType[tuple[str, str, str], tuple[Policy, ...]] = field(repr=False)
    _policy_order: MappingProxyType[int, int] = field(repr=False)
    _pa_mesh: PeerAuthentication | None = field(repr=False)
    _pa_ns: MappingProxyType[str, PeerAuthentication] = field(repr=False)
    _pa_selected: MappingProxyType[str, tuple[PeerAuthentication, ...]] = field(repr=False)
    # --- L7 (waypoints) ---
    _waypoints: MappingProxyType[str, WaypointConfig] = field(repr=False)
    # Policies with targetRefs: by waypoint key ("ns/name"), by service "ns/name", and for
    # each (waypoint key, service key) pair where both have some, merged in config order.
    _gateway_policies: MappingProxyType[str, tuple[Policy, ...]] = field(repr=False)
    _service_policies: MappingProxyType[str, tuple[Policy, ...]] = field(repr=False)
    _pair_policies: MappingProxyType[tuple[str, str], tuple[Policy, ...]] = field(repr=False)
    _routes: MappingProxyType[str, tuple[RouteCandidate, ...]] = field(repr=False)
    _subsets: MappingProxyType[tuple[str, tuple[tuple[str, str], ...]], tuple[Workload, ...]] = (
        field(repr=False)
    )
    _traffic: MappingProxyType[str, TrafficPolicyConfig] = field(repr=False)
    _http_policies: frozenset[int] = field(repr=False)  # ids of policies with HTTP fields
    # policies_for() results by workload uid, filled on first use (a merge and a sort per
    # connection otherwise); at most one entry per workload of this snapshot.
    _policies_memo: dict[str, tuple[Policy, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, config: Config) -> Snapshot:
        by_ip: dict[IPAddress, Workload] = {}
        by_uid: dict[str, Workload] = {}
        by_node: dict[str, list[Workload]] = {}
        endpoints: dict[str, list[Workload]] = {}
        for w in config.workloads:
            by_uid.setdefault(w.uid, w)
            for ip in w.workload_ips:
                by_ip.setdefault(ip, w)
            by_node.setdefault(w.node, []).append(w)
            for key, _ports in w.services:
                endpoints.setdefault(key, []).append(w)
        by_vip: dict[tuple[IPAddress, int], Service] = {}
        by_key: dict[str, Service] = {}
        for s in config.services:
            by_key.setdefault(s.key, s)
            for vip in s.vips:
                for port, _target in s.ports:
                    by_vip.setdefault((vip, port), s)

        global_p: list[Policy] = []
        ns_p: dict[str, list[Policy]] = {}
        uid_p: dict[str, list[Policy]] = {}
        label_p: dict[tuple[str, str, str], list[Policy]] = {}
        order: dict[int, int] = {}
        gateway_p: dict[str, list[Policy]] = {}
        service_p: dict[str, list[Policy]] = {}
        for index, p in enumerate(config.policies):
            order[id(p)] = index
            if p.target_refs:  # enforced by waypoints only, never by node agents
                for ref in dict.fromkeys(p.target_refs):
                    by_kind = gateway_p if ref.kind is TargetKind.GATEWAY else service_p
                    by_kind.setdefault(f"{p.namespace}/{ref.name}", []).append(p)
            elif p.scope is Scope.GLOBAL:
                global_p.append(p)
            elif p.scope is Scope.NAMESPACE:
                ns_p.setdefault(p.namespace, []).append(p)
            else:
                for uid in p.workload_uids:
                    uid_p.setdefault(uid, []).append(p)
                if p.selector:
                    k, v = p.selector[0]
                    label_p.setdefault((p.namespace, k, v), []).append(p)

        pa_mesh: PeerAuthentication | None = None
        pa_ns: dict[str, PeerAuthentication] = {}
        pa_selected: dict[str, list[PeerAuthentication]] = {}
        selector_pas = [pa for pa in config.peer_authentications if pa.is_workload_specific]
        for pa in config.peer_authentications:
            if pa.is_workload_specific:
                continue
            if pa.namespace is None:
                pa_mesh = pa_mesh or pa
            else:
                pa_ns.setdefault(pa.namespace, pa)
        if selector_pas:
            # Few in practice; resolved per workload here so mtls_mode() stays a dict lookup.
            by_ns: dict[str, list[PeerAuthentication]] = {}
            for pa in selector_pas:
                by_ns.setdefault(pa.namespace or "", []).append(pa)
            for w in config.workloads:
                chosen = [
                    pa
                    for pa in by_ns.get(w.namespace, ())
                    if _selects(pa.selector, pa.workload_uids, w)
                ]
                if chosen:
                    pa_selected[w.uid] = chosen

        healthy = {
            k: tuple(w for w in v if w.healthy and w.workload_ips) for k, v in endpoints.items()
        }
        waypoints: dict[str, WaypointConfig] = {}
        for wp in config.waypoints:
            waypoints.setdefault(wp.key, wp)
        pairs: dict[tuple[str, str], tuple[Policy, ...]] = {}
        for wp_key in waypoints:
            for svc_name, svc_policies in service_p.items():
                merged = {id(p): p for p in (*gateway_p.get(wp_key, ()), *svc_policies)}
                pairs[(wp_key, svc_name)] = tuple(sorted(merged.values(), key=_by(order)))
        subsets: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Workload, ...]] = {}
        for r in config.routes:
            for rule in r.rules:
                for b in rule.backend_refs:
                    subsets.setdefault(
                        (b.service, b.subset), _in_subset(healthy.get(b.service, ()), b.subset)
                    )
        traffic: dict[str, TrafficPolicyConfig] = {}
        for tp in config.traffic_policies:
            traffic.setdefault(tp.service, tp)

        return cls(
            config=config,
            trust_domain=config.trust_domain,
            _by_ip=_frozen(by_ip),
            _by_uid=_frozen(by_uid),
            _by_vip=_frozen(by_vip),
            _by_key=_frozen(by_key),
            _endpoints=_frozen({k: tuple(v) for k, v in endpoints.items()}),
            _healthy=_frozen(healthy),
            _by_node=_frozen({k: tuple(v) for k, v in by_node.items()}),
            _identities=_frozen({k: frozenset(w.identity for w in v) for k, v in by_node.items()}),
            _global_policies=tuple(global_p),
            _ns_policies=_frozen({k: tuple(v) for k, v in ns_p.items()}),
            _uid_policies=_frozen({k: tuple(v) for k, v in uid_p.items()}),
            _label_policies=_frozen({k: tuple(v) for k, v in label_p.items()}),
            _policy_order=_frozen(order),
            _pa_mesh=pa_mesh,
            _pa_ns=_frozen(pa_ns),
            _pa_selected=_frozen({k: tuple(v) for k, v in pa_selected.items()}),
            _waypoints=_frozen(waypoints),
            _gateway_policies=_frozen({k: tuple(v) for k, v in gateway_p.items()}),
            _service_policies=_frozen({k: tuple(v) for k, v in service_p.items()}),
            _pair_policies=_frozen(pairs),
            _routes=_frozen(build_route_table(config.routes)),
            _subsets=_frozen(subsets),
            _traffic=_frozen(traffic),
            _http_policies=frozenset(id(p) for p in config.policies if p.http_fields()),
        )

    # --- lookups ---------------------------------------------------------------------------

    def workload_by_ip(self, ip: str | IPAddress) -> Workload | None:
        addr = to_ip(ip)
        return None if addr is None else self._by_ip.get(addr)

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._by_uid.get(uid)

    def service_by_vip(self, ip: str | IPAddress, port: int) -> Service | None:
        """The service with ``ip`` among its VIPs and ``port`` among its ports."""
        addr = to_ip(ip)
        return None if addr is None else self._by_vip.get((addr, port))

    def service_by_key(self, key: str) -> Service | None:
        return self._by_key.get(key)

    def endpoints(self, service: Service | str) -> tuple[Workload, ...]:
        """Workloads that list the service under ``services`` (healthy or not), config order."""
        key = service if isinstance(service, str) else service.key
        return self._endpoints.get(key, ())

    def healthy_endpoints(self, service: Service | str) -> tuple[Workload, ...]:
        """Endpoints that are healthy and have an address: the load-balancing candidates."""
        key = service if isinstance(service, str) else service.key
        return self._healthy.get(key, ())

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._by_node.get(node, ())

    def identities_on_node(self, node: str) -> frozenset[SpiffeId]:
        return self._identities.get(node, frozenset())

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._by_node)

    def policies_for(self, workload: Workload) -> tuple[Policy, ...]:
        """Policies applying to ``workload``, in config order.

        Global: every workload.  Namespace: workloads in the policy's namespace.
        WorkloadSelector: workloads in the policy's namespace whose uid is listed or whose
        effective labels contain every selector label.
        """
        own = self._by_uid.get(workload.uid) is workload
        if own:
            memo = self._policies_memo.get(workload.uid)
            if memo is not None:
                return memo
        found: dict[int, Policy] = {}
        for p in self._global_policies:
            found[id(p)] = p
        for p in self._ns_policies.get(workload.namespace, ()):
            found[id(p)] = p
        for p in self._uid_policies.get(workload.uid, ()):
            if p.namespace == workload.namespace:
                found[id(p)] = p
        labels = workload.effective_labels()
        for k, v in labels.items():
            for p in self._label_policies.get((workload.namespace, k, v), ()):
                if _labels_match(p.selector, labels):
                    found[id(p)] = p
        result = tuple(sorted(found.values(), key=lambda p: self._policy_order.get(id(p), 0)))
        if own:
            self._policies_memo[workload.uid] = result
        return result

    # --- L7 (waypoints) ----------------------------------------------------------------------

    def waypoint(self, key: str) -> WaypointConfig | None:
        """The ``waypoints:`` entry ``namespace/name``."""
        return self._waypoints.get(key)

    def waypoint_policies(
        self, waypoint: WaypointConfig, service: Service | None
    ) -> tuple[Policy, ...]:
        """Policies a waypoint enforces for a request to ``service``, in config order.

        Those whose targetRefs name the waypoint (kind Gateway, in its namespace) or the
        service (kind Service, in the service's namespace).  Precomputed: no merge per call.
        """
        own = self._gateway_policies.get(waypoint.key, ())
        if service is None:
            return own
        name = f"{service.namespace}/{service.name}"
        targeted = self._service_policies.get(name)
        if targeted is None:
            return own
        pair = self._pair_policies.get((waypoint.key, name))
        if pair is not None:
            return pair
        # A waypoint not from this snapshot: merge now (never on the data path).
        merged = {id(p): p for p in (*own, *targeted)}
        return tuple(sorted(merged.values(), key=_by(self._policy_order)))

    def route_candidates(self, service_key: str) -> tuple[RouteCandidate, ...]:
        """Route matches attached to the service, highest Gateway API precedence first."""
        return self._routes.get(service_key, ())

    def subset_endpoints(
        self, service_key: str, subset: tuple[tuple[str, str], ...]
    ) -> tuple[Workload, ...]:
        """Healthy endpoints of the service whose effective labels include ``subset``."""
        found = self._subsets.get((service_key, subset))
        if found is not None:
            return found
        return _in_subset(self._healthy.get(service_key, ()), subset)

    def has_http_fields(self, policy: Policy) -> bool:
        """Whether a policy of this snapshot has HTTP fields (precomputed; others: walked)."""
        if self._policy_order.get(id(policy)) is not None:
            return id(policy) in self._http_policies
        return bool(policy.http_fields())

    def traffic_policy_config(self, service_key: str) -> TrafficPolicyConfig | None:
        return self._traffic.get(service_key)

    def mtls_mode(self, workload: Workload) -> MtlsMode:
        """Most specific wins: workload-specific > namespace > mesh-wide > PERMISSIVE.

        Several workload-specific entries selecting one workload: STRICT wins (fail closed).
        """
        return self.peer_authentication_for(workload)[0]

    def peer_authentication_for(
        self, workload: Workload
    ) -> tuple[MtlsMode, PeerAuthentication | None]:
        """The mode in force and the entry that set it (``None``: built-in default)."""
        selected = self._pa_selected.get(workload.uid)
        if selected is None and self._by_uid.get(workload.uid) is not workload:
            # A workload not from this snapshot: resolve directly.
            selected = (
                tuple(
                    pa
                    for pa in self.config.peer_authentications
                    if pa.is_workload_specific
                    and pa.namespace == workload.namespace
                    and _selects(pa.selector, pa.workload_uids, workload)
                )
                or None
            )
        if selected:
            strict = [pa for pa in selected if pa.mode is MtlsMode.STRICT]
            pa = strict[0] if strict else selected[0]
            return pa.mode, pa
        ns = self._pa_ns.get(workload.namespace)
        if ns is not None:
            return ns.mode, ns
        if self._pa_mesh is not None:
            return self._pa_mesh.mode, self._pa_mesh
        return DEFAULT_MTLS_MODE, None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Snapshot(workloads={len(c.workloads)}, services={len(c.services)}, "
            f"policies={len(c.policies)}, trust_domain={self.trust_domain!r})"
        )


def _labels_match(selector: tuple[tuple[str, str], ...], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def _in_subset(
    workloads: tuple[Workload, ...], subset: tuple[tuple[str, str], ...]
) -> tuple[Workload, ...]:
    if not subset:
        return workloads
    return tuple(w for w in workloads if _labels_match(subset, w.effective_labels()))


def _by(order: Mapping[int, int]) -> Callable[[Policy], int]:
    def position(policy: Policy) -> int:
        return order.get(id(policy), 0)

    return position


def _selects(
    selector: tuple[tuple[str, str], ...], uids: tuple[str, ...], workload: Workload
) -> bool:
    if workload.uid in uids:
        return True
    return bool(selector) and _labels_match(selector, workload.effective_labels())


def load_snapshot(path: str | Path) -> Snapshot:
    """Load, validate and index a config file.  Raises :class:`ConfigError`."""
    return Snapshot.build(load_config_file(path))
