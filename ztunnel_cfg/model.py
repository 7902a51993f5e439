"""The config/state model: frozen, slotted dataclasses built by :mod:`ztunnel_cfg.loader`.

Shapes follow ztunnel's local config file (DESIGN §6).  Values are validated by the loader;
constructing these classes directly (tests, other tools) performs no validation.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (service port, target port) pairs, in the order the config lists them.
PortMap = tuple[tuple[int, int], ...]
Labels = tuple[tuple[str, str], ...]

HBONE_PORT = 15008
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_CANONICAL_REVISION = "latest"


class Protocol(enum.Enum):
    """How a workload receives traffic: HBONE (in the mesh) or plain TCP (not in the mesh)."""

    HBONE = "HBONE"
    TCP = "TCP"


class Scope(enum.Enum):
    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class MtlsMode(enum.Enum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"


class TrafficType(enum.Enum):
    """Which traffic a waypoint handles (Istio's ``istio.io/waypoint-for``)."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """Reference to the service fronting a waypoint: ``destination`` is ``ns/hostname``."""

    destination: str
    hbone_mtls_port: int = HBONE_PORT


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str = "default"
    workload_ips: tuple[IPAddress, ...] = ()
    node: str = ""
    protocol: Protocol = Protocol.HBONE
    netns: str | None = None
    waypoint: WaypointRef | None = None
    # ((service key "ns/hostname", ((port, target_port), ...)), ...)
    services: tuple[tuple[str, PortMap], ...] = ()
    canonical_name: str = ""  # loader fills in ``name`` when absent
    canonical_revision: str = DEFAULT_CANONICAL_REVISION
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = DEFAULT_CLUSTER_ID
    healthy: bool = True
    labels: Labels = ()

    @property
    def identity(self) -> SpiffeId:
        # Parts were validated by the loader; building directly avoids re-parsing per call.
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        """``namespace/name``, for messages and tables."""
        return f"{self.namespace}/{self.name}"

    @property
    def app(self) -> str:
        return self.canonical_name or self.name

    def effective_labels(self) -> dict[str, str]:
        """Explicit ``labels`` plus ``app``/``version`` from the canonical name and revision."""
        labels = {"app": self.app, "version": self.canonical_revision}
        labels.update(self.labels)
        return labels

    def target_port(self, service_key: str, port: int) -> int | None:
        """The workload's own port mapping for ``service_key:port``, if it declares one."""
        for key, ports in self.services:
            if key == service_key:
                for svc_port, target in ports:
                    if svc_port == port:
                        return target
        return None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[IPAddress, ...] = ()
    ports: PortMap = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: WaypointRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def target_port(self, port: int) -> int | None:
        for svc_port, target in self.ports:
            if svc_port == port:
                return target
        return None


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio string match: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""

    text: str

    def matches(self, value: str) -> bool:
        t = self.text
        if t == "*":
            return True
        if t.endswith("*"):
            return value.startswith(t[:-1])
        if t.startswith("*"):
            return value.endswith(t[1:])
        return value == t

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Match:
    """One match of a clause.  Empty fields do not constrain; all set fields must hold."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[StringMatch, ...] = ()
    not_service_accounts: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


# A clause is a list of matches ORed; a rule is a list of clauses ANDed (ztunnel's shape).
Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    # WorkloadSelector scope only: a workload in the policy's namespace is selected when its
    # uid is listed, or when every selector label equals its effective label.
    selector: Labels = ()
    workload_uids: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """mTLS mode for the mesh (namespace None), a namespace, or selected workloads in it."""

    mode: MtlsMode
    namespace: str | None = None
    name: str = ""
    selector: Labels = ()
    workload_uids: tuple[str, ...] = ()

    @property
    def is_workload_specific(self) -> bool:
        return bool(self.selector or self.workload_uids)


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    """Declares that a service fronts a waypoint proxy (``waypoints:`` section)."""

    name: str
    namespace: str
    service: str  # "ns/hostname" of the waypoint's service
    traffic_type: TrafficType = TrafficType.SERVICE


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Match on an HTTP request; every set field must hold."""

    path_prefix: str | None = None
    path_exact: str | None = None
    method: str | None = None
    headers: Labels = ()


@dataclass(frozen=True, slots=True)
class Backend:
    service: str  # "ns/hostname"
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RouteRetries:
    attempts: int
    per_try_timeout: float | None = None  # seconds


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = ()  # empty: every request
    backends: tuple[Backend, ...] = ()
    timeout: float | None = None  # seconds
    retries: RouteRetries | None = None


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """L7 routing for requests to ``parent`` (a service key), applied by its waypoint."""

    name: str
    namespace: str
    parent: str
    rules: tuple[RouteRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Config:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Policy, ...] = ()
    waypoints: tuple[WaypointConfig, ...] = ()
    routes: tuple[HttpRoute, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = field(default=())
    trust_domain: str = DEFAULT_TRUST_DOMAIN
