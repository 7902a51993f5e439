"""An immutable, indexed view of a :class:`Config`.

Built once per (re)load in O(n); every lookup is a dict access.  The data path holds a
reference to one snapshot and never sees it change; a reload builds a new one and swaps it.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ztunnel_cfg.loader import load_config_file
from ztunnel_cfg.model import (
    Config,
    IPAddress,
    MtlsMode,
    PeerAuthentication,
    Policy,
    Scope,
    Service,
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
        for index, p in enumerate(config.policies):
            order[id(p)] = index
            if p.scope is Scope.GLOBAL:
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

        return cls(
            config=config,
            trust_domain=config.trust_domain,
            _by_ip=_frozen(by_ip),
            _by_uid=_frozen(by_uid),
            _by_vip=_frozen(by_vip),
            _by_key=_frozen(by_key),
            _endpoints=_frozen({k: tuple(v) for k, v in endpoints.items()}),
            _healthy=_frozen(
                {
                    k: tuple(w for w in v if w.healthy and w.workload_ips)
                    for k, v in endpoints.items()
                }
            ),
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
        return tuple(sorted(found.values(), key=lambda p: self._policy_order.get(id(p), 0)))

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


def _selects(
    selector: tuple[tuple[str, str], ...], uids: tuple[str, ...], workload: Workload
) -> bool:
    if workload.uid in uids:
        return True
    return bool(selector) and _labels_match(selector, workload.effective_labels())


def load_snapshot(path: str | Path) -> Snapshot:
    """Load, validate and index a config file.  Raises :class:`ConfigError`."""
    return Snapshot.build(load_config_file(path))
