"""Strict YAML loader: every problem in a document, located by file, line, column and key path.

The document is composed into YAML nodes (which carry marks), then walked against the schema.
A bad value is reported and replaced by its default so the walk goes on and later problems
(including cross-reference checks) are reported in the same pass.  Whatever the input, the
only exception that escapes is :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from ztunnel_cfg.errors import ConfigError, ConfigIssue, NodeproxyError
from ztunnel_cfg.model import (
    DEFAULT_CANONICAL_REVISION,
    DEFAULT_CLUSTER_ID,
    HBONE_PORT,
    Action,
    Backend,
    Clause,
    Config,
    HttpRoute,
    IPAddress,
    IPNetwork,
    Labels,
    Match,
    MtlsMode,
    PeerAuthentication,
    Policy,
    PortMap,
    Protocol,
    RouteMatch,
    RouteRetries,
    RouteRule,
    Rule,
    Scope,
    Service,
    StringMatch,
    TrafficType,
    WaypointConfig,
    WaypointRef,
    Workload,
)
from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, NodeId, SpiffeId, check_trust_domain

__all__ = ["load_config_file", "load_config_text"]

T = TypeVar("T")

# Names that end up in identities, keys or node certificates: DNS-1123-like.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
# Label keys/values and free-form names: no whitespace, no '/'.
_TOKEN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_WILDCARD_TAIL = re.compile(r"^[A-Za-z0-9._/:-]+$")
_HTTP_METHOD = re.compile(r"^[A-Z]+$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


_EMPTY: tuple[Any, ...] = ()
# libyaml's composer is ~10x faster (5,000 workloads: 6.2 s -> 0.7 s); nodes carry marks too.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Invalid(Exception):
    """Internal: a value was reported as bad; the caller falls back to a default."""


@dataclass
class _Ctx:
    file: str
    issues: list[ConfigIssue] = field(default_factory=list)
    constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = column = None
        mark = getattr(node, "start_mark", None)
        if mark is not None:
            line, column = mark.line + 1, mark.column + 1
        self.issues.append(ConfigIssue(self.file, line, column, path, message))

    def fail(self, node: yaml.Node | None, path: str, message: str) -> NoReturn:
        self.error(node, path, message)
        raise _Invalid


@dataclass(frozen=True, slots=True)
class _Loc:
    node: yaml.Node
    path: str


Conv = Callable[[_Ctx, yaml.Node, str], T]


# --- scalar conversion --------------------------------------------------------------------


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _value(ctx: _Ctx, node: yaml.Node, path: str) -> object:
    if isinstance(node, yaml.MappingNode):
        return _MAPPING
    if isinstance(node, yaml.SequenceNode):
        return _SEQUENCE
    if not isinstance(node, yaml.ScalarNode):  # composer only makes the three node kinds
        ctx.fail(node, path, "unsupported YAML node")
    # Fast path for the common plain tags (construct_object's bookkeeping dominated load time).
    tag = node.tag
    if tag == "tag:yaml.org,2002:str":
        return str(node.value)
    try:
        if tag == "tag:yaml.org,2002:int":
            return ctx.constructor.construct_yaml_int(node)
        return ctx.constructor.construct_object(node, deep=True)
    except Exception as exc:  # any constructor failure (bad tag, bad timestamp...) is the input's
        problem = getattr(exc, "problem", None) or str(exc)
        ctx.fail(node, path, f"cannot read value {getattr(node, 'value', '')!r}: {problem}")


_MAPPING = object()
_SEQUENCE = object()


def _describe(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _value(ctx, node, path)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _str(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _value(ctx, node, path)
    if not isinstance(value, str):
        ctx.fail(node, path, f"expected a string, got {_describe(ctx, node, path)}")
    if not value:
        ctx.fail(node, path, "must not be empty")
    return value


def _bool(ctx: _Ctx, node: yaml.Node, path: str) -> bool:
    value = _value(ctx, node, path)
    if not isinstance(value, bool):
        ctx.fail(node, path, f"expected true or false, got {_describe(ctx, node, path)}")
    return value


def _int(ctx: _Ctx, node: yaml.Node, path: str) -> int:
    value = _value(ctx, node, path)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # JSON documents can only have string keys
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.fail(node, path, f"expected an integer, got {_describe(ctx, node, path)}")
    return value


def _port(ctx: _Ctx, node: yaml.Node, path: str) -> int:
    port = _int(ctx, node, path)
    if not 1 <= port <= 65535:
        ctx.fail(node, path, f"port {port} is out of range (1-65535)")
    return port


def _seconds(ctx: _Ctx, node: yaml.Node, path: str) -> float:
    value = _value(ctx, node, path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.fail(node, path, f"expected a number of seconds, got {_describe(ctx, node, path)}")
    if not 0 < value < 86400 * 365:
        ctx.fail(node, path, f"{value} is not a positive number of seconds")
    return float(value)


def _name(kind: str) -> Conv[str]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> str:
        value = _str(ctx, node, path)
        if not _NAME.match(value):
            ctx.fail(
                node,
                path,
                f"{value!r} is not a valid {kind} "
                "(lowercase letters, digits, '-' and '.', starting and ending alphanumeric)",
            )
        return value

    return conv


def _token(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    if not _TOKEN.match(value):
        ctx.fail(node, path, f"{value!r} may contain only letters, digits, '-', '_' and '.'")
    return value


def _free_text(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    if any(c.isspace() for c in value):
        ctx.fail(node, path, f"{value!r} must not contain whitespace")
    return value


def _trust_domain(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    try:
        return check_trust_domain(value)
    except NodeproxyError as exc:
        ctx.fail(node, path, exc.message)


def _node_name(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    try:
        NodeId.of(value)
    except NodeproxyError:
        ctx.fail(node, path, f"{value!r} is not a valid node name (lowercase DNS name)")
    return value


def _ip(ctx: _Ctx, node: yaml.Node, path: str) -> IPAddress:
    value = _str(ctx, node, path)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        ctx.fail(node, path, f"{value!r} is not an IP address")


def _vip(ctx: _Ctx, node: yaml.Node, path: str) -> IPAddress:
    # ztunnel writes VIPs as "network/ip"; "/ip" is the default network.  A bare IP is accepted.
    value = _str(ctx, node, path)
    _network, _, address = value.rpartition("/")
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        ctx.fail(node, path, f"{value!r} is not a VIP ('/10.96.0.10' or 'network/10.96.0.10')")


def _cidr(ctx: _Ctx, node: yaml.Node, path: str) -> IPNetwork:
    value = _str(ctx, node, path)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            ctx.fail(node, path, f"{value!r} has host bits set (did you mean '{fixed}'?)")
        ctx.fail(node, path, f"{value!r} is not an IP address or CIDR")


def _service_key(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    namespace, slash, hostname = value.partition("/")
    if not slash or not namespace or not hostname or "/" in hostname:
        ctx.fail(
            node, path, f"{value!r} is not a service reference of the form 'namespace/hostname'"
        )
    return value


def _enum(kind: type[T], what: str) -> Conv[T]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> T:
        value = _value(ctx, node, path)
        for member in kind:  # type: ignore[attr-defined]
            if member.value == value:
                return member  # type: ignore[no-any-return]
        allowed = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
        shown = repr(value) if isinstance(value, str) else _describe(ctx, node, path)
        ctx.fail(node, path, f"{shown} is not a valid {what} ({allowed})")

    return conv


def _list(ctx: _Ctx, node: yaml.Node, path: str) -> list[_Loc]:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, path, f"expected a list, got {_describe(ctx, node, path)}")
    return [_Loc(item, f"{path}[{i}]") for i, item in enumerate(node.value)]


def _list_of(conv: Conv[T]) -> Conv[tuple[T, ...]]:
    def parse(ctx: _Ctx, node: yaml.Node, path: str) -> tuple[T, ...]:
        out = []
        for loc in _list(ctx, node, path):
            with contextlib.suppress(_Invalid):
                out.append(conv(ctx, loc.node, loc.path))
        return tuple(out)

    return parse


def _pairs(ctx: _Ctx, node: yaml.Node, path: str) -> list[tuple[yaml.Node, yaml.Node, str]]:
    """Mapping entries as (key node, value node, path), duplicates reported."""
    if not isinstance(node, yaml.MappingNode):
        ctx.fail(node, path, f"expected a mapping, got {_describe(ctx, node, path)}")
    seen: set[object] = set()
    out = []
    for key_node, value_node in node.value:
        try:
            key = _value(ctx, key_node, path)
        except _Invalid:
            continue
        if key is _MAPPING or key is _SEQUENCE:
            ctx.error(key_node, path, "a mapping key must be a plain value, not a list or mapping")
            continue
        shown = f'"{key}"' if isinstance(key, str) else str(key)
        sub = f"{path}[{shown}]" if path else str(key)
        if key in seen:
            ctx.error(key_node, sub, f"duplicate key {key!r}")
            continue
        seen.add(key)
        out.append((key_node, value_node, sub))
    return out


def _port_map(ctx: _Ctx, node: yaml.Node, path: str) -> PortMap:
    out = []
    for key_node, value_node, sub in _pairs(ctx, node, path):
        with contextlib.suppress(_Invalid):
            out.append((_port(ctx, key_node, sub), _port(ctx, value_node, sub)))
    return tuple(out)


def _labels(ctx: _Ctx, node: yaml.Node, path: str) -> Labels:
    out = []
    for key_node, value_node, sub in _pairs(ctx, node, path):
        try:
            key = _str(ctx, key_node, sub)
            if not _LABEL_KEY.match(key):
                ctx.fail(key_node, sub, f"{key!r} is not a valid label key")
            out.append((key, _token(ctx, value_node, sub)))
        except _Invalid:
            pass
    return tuple(out)


class _Map:
    """A schema-checked mapping: unknown, duplicate and missing keys are reported on creation."""

    def __init__(
        self,
        ctx: _Ctx,
        node: yaml.Node,
        path: str,
        keys: Iterable[str],
        required: Iterable[str] = (),
    ) -> None:
        self.ctx, self.node, self.path = ctx, node, path
        allowed = list(keys)
        self.items: dict[str, yaml.Node] = {}
        for key_node, value_node, sub in _pairs(ctx, node, path):
            key = _value(ctx, key_node, sub)
            if not isinstance(key, str):
                ctx.error(
                    key_node, sub, f"keys must be strings, got {_describe(ctx, key_node, sub)}"
                )
            elif key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
                ctx.error(key_node, self.sub(key), f"unknown key {key!r} ({hint})")
            else:
                self.items[key] = value_node
        for key in required:
            if key not in self.items or _is_null(self.items[key]):
                ctx.error(node, path, f"missing required key {key!r}")

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.items and not _is_null(self.items[key])

    def loc(self, key: str) -> _Loc:
        return _Loc(self.items.get(key, self.node), self.sub(key))

    def get(self, key: str, conv: Conv[T], default: T) -> T:
        node = self.items.get(key)
        if node is None or _is_null(node):
            return default
        try:
            return conv(self.ctx, node, self.sub(key))
        except _Invalid:
            return default


# --- sections -----------------------------------------------------------------------------


@dataclass
class _WorkloadLocs:
    node: yaml.Node
    path: str
    uid: _Loc
    ips: list[tuple[IPAddress, _Loc]] = field(default_factory=list)
    services: list[tuple[str, _Loc, list[tuple[int, _Loc]]]] = field(default_factory=list)
    waypoint: _Loc | None = None


@dataclass
class _ServiceLocs:
    node: yaml.Node
    path: str
    vips: list[tuple[IPAddress, _Loc]] = field(default_factory=list)
    waypoint: _Loc | None = None


def _waypoint_ref(ctx: _Ctx, node: yaml.Node, path: str) -> WaypointRef:
    m = _Map(ctx, node, path, ["destination", "hboneMtlsPort"], required=["destination"])
    destination = m.get("destination", _service_key, "")
    port = m.get("hboneMtlsPort", _port, HBONE_PORT)
    if not destination:
        raise _Invalid
    return WaypointRef(destination, port)


_WORKLOAD_KEYS = [
    "uid",
    "name",
    "namespace",
    "serviceAccount",
    "workloadIps",
    "node",
    "protocol",
    "netns",
    "waypoint",
    "services",
    "canonicalName",
    "canonicalRevision",
    "trustDomain",
    "clusterId",
    "healthy",
    "labels",
]


def _workload(
    ctx: _Ctx, node: yaml.Node, path: str, trust_domain: str
) -> tuple[Workload, _WorkloadLocs]:
    m = _Map(ctx, node, path, _WORKLOAD_KEYS, required=["name", "namespace", "workloadIps", "node"])
    name = m.get("name", _token, "")
    td = m.get("trustDomain", _trust_domain, trust_domain)
    namespace = m.get("namespace", _name("namespace"), "")
    service_account = m.get("serviceAccount", _name("service account"), "default")
    cluster_id = m.get("clusterId", _token, DEFAULT_CLUSTER_ID)
    # ztunnel's uid format; lets small hand-written configs omit it.
    uid = m.get("uid", _free_text, f"{cluster_id}//v1/Pod/{namespace}/{name}")
    locs = _WorkloadLocs(node, path, m.loc("uid"))

    if m.has("workloadIps"):
        try:
            items = _list(ctx, m.items["workloadIps"], m.sub("workloadIps"))
            if not items:
                ctx.error(m.items["workloadIps"], m.sub("workloadIps"), "must list at least one IP")
            for loc in items:
                with contextlib.suppress(_Invalid):
                    locs.ips.append((_ip(ctx, loc.node, loc.path), loc))
        except _Invalid:
            pass
    seen_ips: set[IPAddress] = set()
    for ip, loc in locs.ips:
        if ip in seen_ips:
            ctx.error(loc.node, loc.path, f"IP {ip} is listed twice")
        seen_ips.add(ip)

    services: list[tuple[str, PortMap]] = []
    if m.has("services"):
        try:
            for key_node, value_node, sub in _pairs(ctx, m.items["services"], m.sub("services")):
                try:
                    key = _service_key(ctx, key_node, sub)
                except _Invalid:
                    continue
                port_locs: list[tuple[int, _Loc]] = []
                ports: list[tuple[int, int]] = []
                if not _is_null(value_node):
                    try:
                        for pk, pv, psub in _pairs(ctx, value_node, sub):
                            try:
                                port, target = _port(ctx, pk, psub), _port(ctx, pv, psub)
                            except _Invalid:
                                continue
                            ports.append((port, target))
                            port_locs.append((port, _Loc(pk, psub)))
                    except _Invalid:
                        pass
                services.append((key, tuple(ports)))
                locs.services.append((key, _Loc(key_node, sub), port_locs))
        except _Invalid:
            pass

    waypoint = m.get("waypoint", _waypoint_ref, None)
    if waypoint is not None:
        locs.waypoint = m.loc("waypoint")
    netns = m.get("netns", _free_text, None)
    if netns is not None and not netns.startswith("/"):
        ctx.error(m.items["netns"], m.sub("netns"), f"{netns!r} must be an absolute path")
    workload = Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        service_account=service_account,
        workload_ips=tuple(ip for ip, _ in locs.ips),
        node=m.get("node", _node_name, ""),
        protocol=m.get("protocol", _enum(Protocol, "protocol"), Protocol.HBONE),
        netns=netns,
        waypoint=waypoint,
        services=tuple(services),
        canonical_name=m.get("canonicalName", _token, name),
        canonical_revision=m.get("canonicalRevision", _token, DEFAULT_CANONICAL_REVISION),
        trust_domain=td,
        cluster_id=cluster_id,
        healthy=m.get("healthy", _bool, True),
        labels=m.get("labels", _labels, ()),
    )
    return workload, locs


def _subject_alt_name(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    try:
        SpiffeId.parse(value)
    except NodeproxyError as exc:
        ctx.fail(node, path, exc.message)
    return value


def _service(ctx: _Ctx, node: yaml.Node, path: str) -> tuple[Service, _ServiceLocs]:
    m = _Map(
        ctx,
        node,
        path,
        ["name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint"],
        required=["name", "namespace"],
    )
    name = m.get("name", _name("service name"), "")
    namespace = m.get("namespace", _name("namespace"), "")
    hostname = m.get("hostname", _free_text, f"{name}.{namespace}.svc.cluster.local")
    if "/" in hostname:
        ctx.error(m.items["hostname"], m.sub("hostname"), f"{hostname!r} must not contain '/'")
    locs = _ServiceLocs(node, path)
    if m.has("vips"):
        try:
            for loc in _list(ctx, m.items["vips"], m.sub("vips")):
                with contextlib.suppress(_Invalid):
                    locs.vips.append((_vip(ctx, loc.node, loc.path), loc))
        except _Invalid:
            pass
    waypoint = m.get("waypoint", _waypoint_ref, None)
    if waypoint is not None:
        locs.waypoint = m.loc("waypoint")
    service = Service(
        name=name,
        namespace=namespace,
        hostname=hostname,
        vips=tuple(ip for ip, _ in locs.vips),
        ports=m.get("ports", _port_map, ()),
        subject_alt_names=m.get("subjectAltNames", _list_of(_subject_alt_name), ()),
        waypoint=waypoint,
    )
    return service, locs


def _string_match(kind: str) -> Conv[StringMatch]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> StringMatch:
        value = _str(ctx, node, path)
        if value == "*":
            return StringMatch(value)
        core = value[:-1] if value.endswith("*") else value[1:] if value.startswith("*") else value
        if "*" in core or not core:
            ctx.fail(
                node, path, f"{value!r}: '*' is allowed only alone, at the start or at the end"
            )
        if any(c.isspace() for c in core):
            ctx.fail(node, path, f"{value!r} must not contain whitespace")
        if kind == "principal":
            if value.endswith("*"):
                if not value.startswith("spiffe://"):
                    ctx.fail(
                        node, path, f"{value!r}: a principal prefix must start with 'spiffe://'"
                    )
            elif value.startswith("*"):
                if not _WILDCARD_TAIL.match(core):
                    ctx.fail(node, path, f"{value!r} is not a valid principal suffix")
            else:
                try:
                    SpiffeId.parse(value)
                except NodeproxyError as exc:
                    ctx.fail(
                        node,
                        path,
                        f"{exc.message} (principals are full SPIFFE IDs, "
                        "optionally with a leading or trailing '*')",
                    )
        elif not value.startswith("*") and not value.endswith("*") and not _NAME.match(value):
            ctx.fail(node, path, f"{value!r} is not a valid {kind}")
        return StringMatch(value)

    return conv


_MATCH_FIELDS: dict[str, tuple[str, Conv[object]]] = {}
for _yaml_key, _attr, _conv in [
    ("namespaces", "namespaces", _string_match("namespace")),
    ("serviceAccounts", "service_accounts", _string_match("service account")),
    ("principals", "principals", _string_match("principal")),
    ("sourceIps", "source_ips", _cidr),
    ("destinationIps", "destination_ips", _cidr),
    ("destinationPorts", "destination_ports", _port),
]:
    _neg = "not" + _yaml_key[0].upper() + _yaml_key[1:]
    _MATCH_FIELDS[_yaml_key] = (_attr, _conv)
    _MATCH_FIELDS[_neg] = ("not_" + _attr, _conv)

_RULES_SHAPE = (
    "rules is a list of rules; a rule is a list of clauses (ANDed); a clause is a list of "
    "matches (ORed), e.g. rules: [[[{namespaces: [default]}]]]"
)


def _match(ctx: _Ctx, node: yaml.Node, path: str) -> Match:
    if isinstance(node, yaml.SequenceNode):
        ctx.fail(node, path, f"expected a match (a mapping), got a list ({_RULES_SHAPE})")
    m = _Map(ctx, node, path, list(_MATCH_FIELDS))
    values = {
        attr: m.get(key, _list_of(conv), _EMPTY) for key, (attr, conv) in _MATCH_FIELDS.items()
    }
    return Match(**values)


def _clause(ctx: _Ctx, node: yaml.Node, path: str) -> Clause:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(
            node,
            path,
            f"expected a clause (a list of matches), got "
            f"{_describe(ctx, node, path)} ({_RULES_SHAPE})",
        )
    return _list_of(_match)(ctx, node, path)


def _rule(ctx: _Ctx, node: yaml.Node, path: str) -> Rule:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(
            node,
            path,
            f"expected a rule (a list of clauses), got "
            f"{_describe(ctx, node, path)} ({_RULES_SHAPE})",
        )
    return _list_of(_clause)(ctx, node, path)


@dataclass
class _SelectorLocs:
    uids: list[tuple[str, _Loc]] = field(default_factory=list)


def _selector(m: _Map, locs: _SelectorLocs) -> tuple[Labels, tuple[str, ...]]:
    selector: Labels = m.get("selector", _labels, _EMPTY)
    uids: list[str] = []
    if m.has("workloadUids"):
        try:
            for loc in _list(m.ctx, m.items["workloadUids"], m.sub("workloadUids")):
                try:
                    uid = _free_text(m.ctx, loc.node, loc.path)
                except _Invalid:
                    continue
                uids.append(uid)
                locs.uids.append((uid, loc))
        except _Invalid:
            pass
    return selector, tuple(uids)


def _policy(ctx: _Ctx, node: yaml.Node, path: str) -> tuple[Policy, _SelectorLocs]:
    m = _Map(
        ctx,
        node,
        path,
        ["name", "namespace", "scope", "action", "rules", "selector", "workloadUids"],
        required=["name", "namespace", "scope", "action"],
    )
    locs = _SelectorLocs()
    scope = m.get("scope", _enum(Scope, "scope"), None)
    selector, uids = _selector(m, locs)
    if scope is Scope.WORKLOAD_SELECTOR and not (m.has("selector") or m.has("workloadUids")):
        ctx.error(
            m.items.get("scope", node),
            m.sub("scope"),
            "scope WorkloadSelector needs 'selector' or 'workloadUids'",
        )
    if scope not in (None, Scope.WORKLOAD_SELECTOR):
        for key in ("selector", "workloadUids"):
            if m.has(key):
                ctx.error(
                    m.items[key],
                    m.sub(key),
                    f"{key!r} is only valid with scope WorkloadSelector (scope is {scope.value})",
                )
    policy = Policy(
        name=m.get("name", _name("policy name"), ""),
        namespace=m.get("namespace", _name("namespace"), ""),
        scope=scope or Scope.NAMESPACE,
        action=m.get("action", _enum(Action, "action"), Action.ALLOW),
        rules=m.get("rules", _list_of(_rule), ()),
        selector=selector,
        workload_uids=uids,
    )
    return policy, locs


def _peer_auth(ctx: _Ctx, node: yaml.Node, path: str) -> tuple[PeerAuthentication, _SelectorLocs]:
    m = _Map(
        ctx,
        node,
        path,
        ["name", "namespace", "selector", "workloadUids", "mode"],
        required=["mode"],
    )
    locs = _SelectorLocs()
    selector, uids = _selector(m, locs)
    namespace = m.get("namespace", _name("namespace"), None)
    if (selector or uids) and not m.has("namespace"):
        ctx.error(node, path, "a workload-specific peerAuthentication needs a 'namespace'")
    pa = PeerAuthentication(
        mode=m.get("mode", _enum(MtlsMode, "mTLS mode"), MtlsMode.PERMISSIVE),
        namespace=namespace,
        name=m.get("name", _token, ""),
        selector=selector,
        workload_uids=uids,
    )
    return pa, locs


def _waypoint_config(ctx: _Ctx, node: yaml.Node, path: str) -> WaypointConfig:
    m = _Map(
        ctx,
        node,
        path,
        ["name", "namespace", "service", "trafficType"],
        required=["name", "namespace", "service"],
    )
    return WaypointConfig(
        name=m.get("name", _name("waypoint name"), ""),
        namespace=m.get("namespace", _name("namespace"), ""),
        service=m.get("service", _service_key, ""),
        traffic_type=m.get("trafficType", _enum(TrafficType, "traffic type"), TrafficType.SERVICE),
    )


def _path_value(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _free_text(ctx, node, path)
    if not value.startswith("/"):
        ctx.fail(node, path, f"{value!r} must start with '/'")
    return value


def _method(ctx: _Ctx, node: yaml.Node, path: str) -> str:
    value = _str(ctx, node, path)
    if not _HTTP_METHOD.match(value):
        ctx.fail(node, path, f"{value!r} is not an HTTP method (upper case, e.g. GET)")
    return value


def _headers(ctx: _Ctx, node: yaml.Node, path: str) -> Labels:
    out = []
    for key_node, value_node, sub in _pairs(ctx, node, path):
        try:
            key = _str(ctx, key_node, sub).lower()
            if not _HEADER_NAME.match(key):
                ctx.fail(key_node, sub, f"{key!r} is not a valid header name")
            value = _value(ctx, value_node, sub)
            if not isinstance(value, str):
                ctx.fail(
                    value_node, sub, f"expected a string, got {_describe(ctx, value_node, sub)}"
                )
            out.append((key, value))
        except _Invalid:
            pass
    return tuple(out)


def _route_match(ctx: _Ctx, node: yaml.Node, path: str) -> RouteMatch:
    m = _Map(ctx, node, path, ["pathPrefix", "path", "method", "headers"])
    if m.has("pathPrefix") and m.has("path"):
        ctx.error(node, path, "use either 'pathPrefix' or 'path', not both")
    return RouteMatch(
        path_prefix=m.get("pathPrefix", _path_value, None),
        path_exact=m.get("path", _path_value, None),
        method=m.get("method", _method, None),
        headers=m.get("headers", _headers, ()),
    )


def _backend(locs: list[tuple[str, _Loc]]) -> Conv[Backend]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> Backend:
        m = _Map(ctx, node, path, ["service", "port", "weight"], required=["service", "port"])
        service = m.get("service", _service_key, "")
        if service:
            locs.append((service, m.loc("service")))
        weight = m.get("weight", _int, 1)
        if not 0 <= weight <= 1_000_000:
            ctx.error(
                m.items["weight"], m.sub("weight"), f"weight {weight} is out of range (0-1000000)"
            )
        return Backend(service, m.get("port", _port, 0), weight)

    return conv


def _retries(ctx: _Ctx, node: yaml.Node, path: str) -> RouteRetries:
    m = _Map(ctx, node, path, ["attempts", "perTryTimeout"], required=["attempts"])
    attempts = m.get("attempts", _int, 0)
    if not 0 <= attempts <= 100:
        ctx.error(
            m.items["attempts"], m.sub("attempts"), f"attempts {attempts} is out of range (0-100)"
        )
    return RouteRetries(attempts, m.get("perTryTimeout", _seconds, None))


def _route_rule(locs: list[tuple[str, _Loc]]) -> Conv[RouteRule]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> RouteRule:
        m = _Map(
            ctx, node, path, ["matches", "backends", "timeout", "retries"], required=["backends"]
        )
        backends: tuple[Backend, ...] = m.get("backends", _list_of(_backend(locs)), _EMPTY)
        node_b = m.items.get("backends")
        if isinstance(node_b, yaml.SequenceNode) and not node_b.value:
            ctx.error(node_b, m.sub("backends"), "must list at least one backend")
        return RouteRule(
            matches=m.get("matches", _list_of(_route_match), ()),
            backends=backends,
            timeout=m.get("timeout", _seconds, None),
            retries=m.get("retries", _retries, None),
        )

    return conv


def _route(locs: list[tuple[str, _Loc]]) -> Conv[HttpRoute]:
    def conv(ctx: _Ctx, node: yaml.Node, path: str) -> HttpRoute:
        m = _Map(
            ctx,
            node,
            path,
            ["name", "namespace", "parent", "rules"],
            required=["name", "namespace", "parent"],
        )
        parent = m.get("parent", _service_key, "")
        if parent:
            locs.append((parent, m.loc("parent")))
        return HttpRoute(
            name=m.get("name", _name("route name"), ""),
            namespace=m.get("namespace", _name("namespace"), ""),
            parent=parent,
            rules=m.get("rules", _list_of(_route_rule(locs)), ()),
        )

    return conv


# --- document -----------------------------------------------------------------------------

_TOP_KEYS = [
    "trustDomain",
    "workloads",
    "services",
    "policies",
    "waypoints",
    "routes",
    "peerAuthentication",
]


def _items(m: _Map, key: str) -> list[_Loc]:
    if not m.has(key):
        return []
    try:
        return _list(m.ctx, m.items[key], m.sub(key))
    except _Invalid:
        return []


# Removing every workload un-enrols every pod, so it must be written out, never implied by an
# empty or half-written file.
_WRITE_EMPTY_EXPLICITLY = "to remove every workload write `workloads: []`"


def _empty_document(filename: str) -> ConfigIssue:
    # Line 1, column 1: an empty file has no better position, and editors can jump there.
    return ConfigIssue(
        filename,
        1,
        1,
        "",
        f"config {filename} is empty (nothing but whitespace, comments or null): "
        f"{_WRITE_EMPTY_EXPLICITLY}",
    )


def _parse_document(ctx: _Ctx, root: yaml.Node | None) -> Config:
    if root is None or _is_null(root):
        ctx.issues.append(_empty_document(ctx.file))
        raise _Invalid
    if not isinstance(root, yaml.MappingNode):
        ctx.fail(
            root,
            "",
            f"the document must be a mapping with keys {', '.join(_TOP_KEYS)}; "
            f"got {_describe(ctx, root, '')}",
        )
    top = _Map(ctx, root, "", _TOP_KEYS)
    if not top.has("workloads"):
        ctx.error(
            top.items.get("workloads", root),
            "workloads",
            f"config {ctx.file} has no top-level 'workloads' list: {_WRITE_EMPTY_EXPLICITLY}",
        )
    trust_domain = top.get("trustDomain", _trust_domain, DEFAULT_TRUST_DOMAIN)

    workloads: list[tuple[Workload, _WorkloadLocs]] = []
    for loc in _items(top, "workloads"):
        with contextlib.suppress(_Invalid):
            workloads.append(_workload(ctx, loc.node, loc.path, trust_domain))
    services: list[tuple[Service, _ServiceLocs]] = []
    for loc in _items(top, "services"):
        with contextlib.suppress(_Invalid):
            services.append(_service(ctx, loc.node, loc.path))
    policies: list[tuple[Policy, _SelectorLocs, _Loc]] = []
    for loc in _items(top, "policies"):
        with contextlib.suppress(_Invalid):
            policies.append((*_policy(ctx, loc.node, loc.path), loc))
    peer_auths: list[tuple[PeerAuthentication, _SelectorLocs, _Loc]] = []
    for loc in _items(top, "peerAuthentication"):
        with contextlib.suppress(_Invalid):
            peer_auths.append((*_peer_auth(ctx, loc.node, loc.path), loc))
    waypoints: list[tuple[WaypointConfig, _Loc]] = []
    for loc in _items(top, "waypoints"):
        with contextlib.suppress(_Invalid):
            waypoints.append((_waypoint_config(ctx, loc.node, loc.path), loc))
    route_refs: list[tuple[str, _Loc]] = []
    routes: list[tuple[HttpRoute, _Loc]] = []
    for loc in _items(top, "routes"):
        with contextlib.suppress(_Invalid):
            routes.append((_route(route_refs)(ctx, loc.node, loc.path), loc))

    _cross_check(ctx, workloads, services, policies, peer_auths, waypoints, routes, route_refs)
    return Config(
        workloads=tuple(w for w, _ in workloads),
        services=tuple(s for s, _ in services),
        policies=tuple(p for p, _, _ in policies),
        waypoints=tuple(w for w, _ in waypoints),
        routes=tuple(r for r, _ in routes),
        peer_authentications=tuple(p for p, _, _ in peer_auths),
        trust_domain=trust_domain,
    )


def _cross_check(
    ctx: _Ctx,
    workloads: list[tuple[Workload, _WorkloadLocs]],
    services: list[tuple[Service, _ServiceLocs]],
    policies: list[tuple[Policy, _SelectorLocs, _Loc]],
    peer_auths: list[tuple[PeerAuthentication, _SelectorLocs, _Loc]],
    waypoints: list[tuple[WaypointConfig, _Loc]],
    routes: list[tuple[HttpRoute, _Loc]],
    route_refs: list[tuple[str, _Loc]],
) -> None:
    by_uid: dict[str, str] = {}
    by_ip: dict[IPAddress, str] = {}
    for workload, wl in workloads:
        if workload.uid in by_uid:
            ctx.error(
                wl.uid.node,
                wl.uid.path,
                f"duplicate uid {workload.uid!r} (first used by {by_uid[workload.uid]})",
            )
        else:
            by_uid[workload.uid] = wl.path
        for ip, loc in wl.ips:
            if ip in by_ip and by_ip[ip] != wl.path:
                ctx.error(loc.node, loc.path, f"IP {ip} is already used by {by_ip[ip]}")
            by_ip.setdefault(ip, wl.path)

    by_key: dict[str, Service] = {}
    by_vip: dict[tuple[IPAddress, int], str] = {}
    for service, sl in services:
        if service.key in by_key:
            ctx.error(sl.node, sl.path, f"duplicate service {service.key!r}")
            continue
        by_key[service.key] = service
        for ip, loc in sl.vips:
            for port, _target in service.ports:
                owner = by_vip.setdefault((ip, port), service.key)
                if owner != service.key:
                    ctx.error(
                        loc.node,
                        loc.path,
                        f"VIP {ip} port {port} is already used by service {owner!r}",
                    )

    def check_service(key: str, loc: _Loc, what: str) -> Service | None:
        if key not in by_key:
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ctx.error(loc.node, loc.path, f"{what} {key!r} is not a known service{hint}")
            return None
        return by_key[key]

    for workload, wl in workloads:
        for key, loc, port_locs in wl.services:
            known = check_service(key, loc, "service")
            if known is None:
                continue
            for port, port_loc in port_locs:
                if known.target_port(port) is None:
                    ctx.error(port_loc.node, port_loc.path, f"service {key!r} has no port {port}")
        if workload.waypoint is not None and wl.waypoint is not None:
            check_service(workload.waypoint.destination, wl.waypoint, "waypoint")
    for service, sl in services:
        if service.waypoint is not None and sl.waypoint is not None:
            check_service(service.waypoint.destination, sl.waypoint, "waypoint")
    for waypoint, loc in waypoints:
        if waypoint.service:
            check_service(
                waypoint.service, _Loc(loc.node, f"{loc.path}.service"), "waypoint service"
            )
    for key, loc in route_refs:
        check_service(key, loc, "service")

    seen: dict[str, str] = {}
    for policy, sel, loc in policies:
        if policy.key in seen:
            ctx.error(
                loc.node, loc.path, f"duplicate policy {policy.key!r} (see {seen[policy.key]})"
            )
        seen.setdefault(policy.key, loc.path)
        _check_uids(ctx, sel, by_uid)
    seen_routes: dict[str, str] = {}
    for route, loc in routes:
        if route.key in seen_routes:
            ctx.error(
                loc.node, loc.path, f"duplicate route {route.key!r} (see {seen_routes[route.key]})"
            )
        seen_routes.setdefault(route.key, loc.path)
    seen_pa: dict[tuple[str | None, Labels, tuple[str, ...]], str] = {}
    for pa, sel, loc in peer_auths:
        _check_uids(ctx, sel, by_uid)
        target = (pa.namespace, pa.selector, pa.workload_uids)
        if target in seen_pa:
            where = f"namespace {pa.namespace!r}" if pa.namespace else "the whole mesh"
            ctx.error(
                loc.node,
                loc.path,
                f"a peerAuthentication for {where} with the same selector is already "
                f"defined at {seen_pa[target]}",
            )
        seen_pa.setdefault(target, loc.path)


def _check_uids(ctx: _Ctx, sel: _SelectorLocs, by_uid: dict[str, str]) -> None:
    for uid, loc in sel.uids:
        if uid not in by_uid:
            ctx.error(loc.node, loc.path, f"workload uid {uid!r} is not a known workload")


# --- entry points -------------------------------------------------------------------------


def _syntax_issue(filename: str, exc: BaseException) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    if isinstance(exc, RecursionError):
        message = "the document is nested too deeply"
    else:
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        message = "; ".join(p for p in parts if p) or str(exc) or type(exc).__name__
    return ConfigIssue(filename, line, column, "", f"YAML syntax error: {message}")


def load_config_text(text: str | bytes, filename: str = "<string>") -> Config:
    """Parse and validate a config document.  Raises :class:`ConfigError` listing every issue."""
    ctx = _Ctx(filename)
    if not text.strip():  # before YAML, which rejects a tab-only "document" as a syntax error
        raise ConfigError([_empty_document(filename)])
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        raise ConfigError([_syntax_issue(filename, exc)]) from None
    try:
        config = _parse_document(ctx, root)
    except _Invalid:
        config = Config()
    except RecursionError:  # self-referencing aliases reaching a recursive walk
        ctx.error(root, "", "the document is nested too deeply (recursive alias?)")
        config = Config()
    if ctx.issues:
        # Reading order; issues without a position (none today) go last.
        raise ConfigError(sorted(ctx.issues, key=lambda i: (i.line or 1 << 30, i.column or 0)))
    return config


def load_config_file(path: str | Path) -> Config:
    """Read and load ``path``; unreadable files are reported as a :class:`ConfigError` too."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigIssue(name, None, None, "", f"cannot read config file: {reason}")]
        ) from None
    return load_config_text(data, name)
