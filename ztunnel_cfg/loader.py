"""Strict YAML loader: every problem in a document, located by file, line, column and key path.

The document is composed into YAML nodes (which carry marks) and turned into plain data, which
the models of :mod:`ztunnel_cfg.model` validate.  Each pydantic error location is mapped back
to its node (:func:`locate`).  When a document has errors, the bad values are pruned and the
rest validated again so the cross-reference checks (unknown service, duplicate uid, duplicate
address...) still run and everything is reported in one pass.  Whatever the input, the only
exception that escapes is :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import gc
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError
from yaml.constructor import SafeConstructor

from ztunnel_cfg.errors import ConfigError, ConfigIssue
from ztunnel_cfg.model import (
    Config,
    Doc,
    HttpRoute,
    IPAddress,
    PeerAuthentication,
    Policy,
    Service,
    TargetKind,
    TrafficPolicyConfig,
    TrafficType,
    WaypointConfig,
    Workload,
    describe,
)

__all__ = [
    "LoadResult",
    "load_config_file",
    "load_config_text",
    "locate",
    "validate_config_data",
    "validate_config_entries",
    "validate_config_text",
    "validate_entry",
]

# libyaml's composer is ~10x faster than the pure-Python one; nodes carry marks too.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"


# Removing every workload un-enrols every pod, so it must be written out, never implied by an
# empty or half-written file.
_WRITE_EMPTY_EXPLICITLY = "to remove every workload write `workloads: []`"


class _Unreadable:
    """A scalar YAML could not construct (reported once; errors about it are not repeated)."""


@dataclass(frozen=True, slots=True)
class Key:
    """A location step naming a mapping entry by its key (pair indices shift when pruning)."""

    value: object


Loc = tuple[str | int | Key, ...]


@dataclass
class _Doc:
    """The composed document: its data, and for each mapping node the entries kept."""

    file: str
    root: yaml.Node
    issues: list[ConfigIssue] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)
    # id(mapping node) -> [(key node, value node, key)], duplicates and bad keys left out.
    entries: dict[int, list[tuple[yaml.Node, yaml.Node, object]]] = field(default_factory=dict)
    constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def issue(self, node: yaml.Node | None, path: str, message: str) -> ConfigIssue:
        mark = getattr(node, "start_mark", None)
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        return ConfigIssue(self.file, line, column, path, message)

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        self.issues.append(self.issue(node, path, message))


# --- nodes -> data ------------------------------------------------------------------------


def _sub(path: str, key: object) -> str:
    return f"{path}[{_shown(key)}]" if path else str(key)


def _shown(key: object) -> str:
    return f'"{key}"' if isinstance(key, str) else str(key)


def _to_data(doc: _Doc, node: yaml.Node, path: str, memo: dict[int, Any]) -> Any:
    """Plain data for ``node``; problems that are YAML's (duplicate keys...) are reported here."""
    if isinstance(node, yaml.ScalarNode):
        tag = node.tag
        if tag == _STR:  # fast path: construct_object's bookkeeping dominated load time
            return node.value
        try:
            if tag == _INT:
                return doc.constructor.construct_yaml_int(node)
            return doc.constructor.construct_object(node, deep=True)
        except Exception as exc:  # any constructor failure (bad tag, timestamp...) is the input's
            problem = getattr(exc, "problem", None) or str(exc)
            doc.error(node, path, f"cannot read value {node.value!r}: {problem}")
            return _Unreadable()
    done = memo.get(id(node))
    if done is not None:  # an alias: share, as PyYAML does (and anchor bombs stay small)
        return done
    if isinstance(node, yaml.SequenceNode):
        items: list[Any] = []
        memo[id(node)] = items
        for index, item in enumerate(node.value):
            items.append(_to_data(doc, item, f"{path}[{index}]", memo))
        return items
    if not isinstance(node, yaml.MappingNode):  # the composer only makes the three kinds
        doc.error(node, path, "unsupported YAML node")
        return _Unreadable()
    out: dict[Any, Any] = {}
    memo[id(node)] = out
    kept = doc.entries[id(node)] = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            doc.error(key_node, path, "a mapping key must be a plain value, not a list or mapping")
            continue
        key = _to_data(doc, key_node, path, memo)
        if isinstance(key, _Unreadable):
            continue
        sub = (f"{path}.{key}" if path else key) if isinstance(key, str) else _sub(path, key)
        if key in out:
            doc.error(key_node, _sub(path, key) if path else str(key), f"duplicate key {key!r}")
            continue
        out[key] = _to_data(doc, value_node, str(sub), memo)
        kept.append((key_node, value_node, key))
    return out


# --- locations ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Located:
    node: yaml.Node
    key_node: yaml.Node | None  # the key of the last mapping entry reached, if any
    path: str
    rest: int  # location steps that did not match the document


def locate(
    doc_entries: dict[int, list[tuple[yaml.Node, yaml.Node, object]]], root: yaml.Node, loc: Loc
) -> Located:
    """The node and key path of a pydantic error location (or a cross-check location).

    A string step selects a model key (``.key``); an int step on a mapping selects the n-th
    entry of a map held as pairs (``[key]``), then 0/1 its key or value; a :class:`Key` step
    selects an entry by key; an int step on a sequence selects an item (``[n]``).
    """
    node, key_node, path = root, None, ""
    steps = list(loc)
    while steps:
        step = steps[0]
        if isinstance(node, yaml.MappingNode):
            entries = doc_entries.get(id(node), [])
            if isinstance(step, str):
                found = next((e for e in entries if e[2] == step), None)
                if found is None:
                    break
                key_node, node = found[0], found[1]
                path = f"{path}.{step}" if path else step
                steps.pop(0)
                continue
            if isinstance(step, Key):
                found = next((e for e in entries if str(e[2]) == str(step.value)), None)
            else:
                found = entries[step] if 0 <= step < len(entries) else None
            if found is None:
                break
            key_node, node = found[0], found[1]
            path = _sub(path, found[2])
            steps.pop(0)
            # Inside a (key, value) pair: 0 is the key, 1 the value.
            if steps and steps[0] in (0, 1) and steps.pop(0) == 0:
                node = key_node
            continue
        if isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if not 0 <= step < len(node.value):
                break
            node, key_node = node.value[step], None
            path = f"{path}[{step}]"
            steps.pop(0)
            continue
        break
    return Located(node, key_node, path, len(steps))


# --- pydantic errors -> issues ------------------------------------------------------------


def _unwrap_doc(annotation: Any) -> type[Doc] | None:
    """The document class a field holds (through Optional, Annotated and tuples)."""
    if isinstance(annotation, type) and issubclass(annotation, Doc):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Annotated, typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(annotation):
            found = _unwrap_doc(arg)
            if found is not None:
                return found
    return None


def _fields(cls: type[Doc]) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(cls, "__pydantic_fields__", {})
    return fields


def _field_by_alias(cls: type[Doc], alias: str) -> tuple[str, Any] | None:
    for name, info in _fields(cls).items():
        if (info.alias or name) == alias:
            return name, info
    return None


def _model_at(loc: Loc) -> type[Doc] | None:
    """The document class whose mapping is at ``loc`` (int steps are list items)."""
    cls: type[Doc] | None = Config
    for step in loc:
        if cls is None:
            return None
        if isinstance(step, str):
            found = _field_by_alias(cls, step)
            cls = _unwrap_doc(found[1].annotation) if found else None
    return cls


def _aliases(cls: type[Doc]) -> list[str]:
    return [info.alias or name for name, info in _fields(cls).items()]


def _issues_of(doc: _Doc, errors: list[Any]) -> Iterator[tuple[ConfigIssue, Loc]]:
    for err in errors:
        loc: Loc = tuple(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        value = err.get("input")
        if isinstance(value, _Unreadable):
            continue  # already reported as unreadable
        if kind == "nodeproxy":
            loc = loc + tuple(ctx.get("sub", ()))
            where = locate(doc.entries, doc.root, loc)
            node = where.node if where.rest == 0 or where.key_node is None else where.key_node
            yield doc.issue(node, where.path, str(ctx["message"])), loc
        elif kind == "missing":
            if loc == ("workloads",):
                continue  # reported before validation, with what to write instead
            where = locate(doc.entries, doc.root, loc[:-1])
            yield doc.issue(where.node, where.path, f"missing required key {loc[-1]!r}"), loc
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
            where = locate(doc.entries, doc.root, loc)
            cls = _model_at(loc[:-1])
            allowed = _aliases(cls) if cls is not None else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
            yield (
                doc.issue(
                    where.key_node or where.node, where.path, f"unknown key {loc[-1]!r} ({hint})"
                ),
                loc,
            )
        elif kind == "invalid_key":
            where = locate(doc.entries, doc.root, loc[:-1])
            bad = next((e for e in doc.entries.get(id(where.node), []) if e[2] == loc[-1]), None)
            yield (
                doc.issue(
                    bad[0] if bad else where.node,
                    _sub(where.path, loc[-1]),
                    f"keys must be strings, got {describe(loc[-1])}",
                ),
                loc,
            )
        else:
            where = locate(doc.entries, doc.root, loc)
            if kind in ("tuple_type", "list_type"):
                message = f"expected a list, got {describe(value)}"
            elif kind in ("dict_type", "dataclass_type", "dataclass_args_type"):
                message = f"expected a mapping, got {describe(value)}"
            else:
                message = str(err["msg"])
            yield doc.issue(where.node, where.path, message), loc


# --- salvage: prune what is wrong, keep checking the rest ----------------------------------

_DROP = object()
_PLACEHOLDERS: tuple[Any, ...] = (
    "x",
    "x/x",
    "/x",
    1,
    True,
    ["192.0.2.1"],
    [{"service": "x/x", "port": 1}],
    "Global",
    "Allow",
    "PERMISSIVE",
)
_placeholder_cache: dict[tuple[type[Doc], str], Any] = {}


def _placeholder(cls: type[Doc] | None, alias: object) -> Any:
    """A value a missing required key can take so the rest is checked (never reported)."""
    if cls is None or not isinstance(alias, str):
        return _DROP
    key = (cls, alias)
    if key not in _placeholder_cache:
        found = _field_by_alias(cls, alias)
        chosen: Any = _DROP
        if found is not None:
            info = found[1]
            annotation: Any = info.annotation
            if info.metadata:
                annotation = typing.Annotated[annotation, *info.metadata]
            adapter: TypeAdapter[Any] = TypeAdapter(annotation)
            for candidate in _PLACEHOLDERS:
                try:
                    adapter.validate_python(candidate)
                except ValidationError:
                    continue
                chosen = candidate
                break
        _placeholder_cache[key] = chosen
    return _placeholder_cache[key]


def _prune(data: Any, loc: Loc, missing: bool) -> Loc:
    """Remove (or, when missing, fill) the value at ``loc``; returns the location touched."""
    container: Any = None
    slot: Any = None
    current = data
    steps = list(loc)
    done: list[Any] = []
    while steps:
        step = steps.pop(0)
        if isinstance(current, dict):
            if isinstance(step, int):  # n-th entry of a map held as pairs
                keys = list(current)
                if not 0 <= step < len(keys):
                    break
                container, slot = current, keys[step]
                done.append(step)
                if steps and steps[0] in (0, 1):
                    if steps.pop(0) == 0:
                        break  # the key itself is bad: drop the entry
                    done.append(1)
                current = current[slot]
                continue
            if step not in current:
                if missing and not steps:
                    value = _placeholder(_model_at(tuple(done)), step)
                    if value is not _DROP:
                        current[step] = value
                        return (*done, step)
                    break
                break
            container, slot = current, step
        elif isinstance(current, list) and isinstance(step, int) and 0 <= step < len(current):
            container, slot = current, step
        else:
            break
        done.append(step)
        current = container[slot]
    if container is None:
        return ()
    if isinstance(container, dict):
        container.pop(slot, None)
    else:
        container[slot] = _DROP
    return tuple(done)


def _compact(data: Any, seen: set[int]) -> Any:
    if id(data) in seen:
        return data
    if isinstance(data, dict):
        seen.add(id(data))
        for key, value in data.items():
            data[key] = _compact(value, seen)
    elif isinstance(data, list):
        seen.add(id(data))
        data[:] = [_compact(v, seen) for v in data if v is not _DROP]
    return data


def _salvage(
    doc: _Doc, data: dict[str, Any], first: ValidationError
) -> tuple[Config | None, set[Loc], dict[str, list[int]]]:
    """Validate what is left once every bad value is pruned (or a missing one filled in).

    Errors that appear only then (a model check that pydantic skips while a field of the
    model is invalid) are reported unless they concern what was pruned or filled in.
    Returns the config, the locations touched (cross-checks skip them) and, per top-level
    section, the original index of each item kept.
    """
    tainted: set[Loc] = set()
    filled: set[Loc] = set()
    order = {k: list(range(len(v))) for k, v in data.items() if isinstance(v, list)}
    pending: list[tuple[Loc, bool]] = [
        (tuple(e["loc"]), e["type"] == "missing") for e in first.errors()
    ]
    for _round in range(4):
        for loc, missing in pending:
            touched = _prune(data, loc, missing)
            if touched:
                tainted.add(_original(touched, order))
                if missing and touched == loc:
                    filled.add(_original(touched, order))
        for section, items in data.items():
            if isinstance(items, list) and section in order:
                order[section] = [
                    i for i, v in zip(order[section], items, strict=False) if v is not _DROP
                ]
        _compact(data, set())
        try:
            return _validate(data), tainted, order
        except ValidationError as exc:
            pending = [(tuple(e["loc"]), e["type"] == "missing") for e in exc.errors()]
            late = []
            for err in exc.errors(include_url=False):
                late_loc = _original(tuple(err["loc"]), order)
                sub = tuple((err.get("ctx") or {}).get("sub", ()))
                if (
                    err["type"] == "nodeproxy"
                    and sub
                    and _clear(late_loc + sub, tainted)
                    and _clear(late_loc, filled)
                ):
                    late.append({**err, "loc": late_loc})
            doc.issues.extend(issue for issue, _ in _issues_of(doc, late))
        except (RecursionError, ValueError, TypeError):
            break
    return None, tainted, order


def _clear(loc: Loc, touched: set[Loc]) -> bool:
    """True when nothing at, above or below ``loc`` was touched."""
    for t in touched:
        n = min(len(t), len(loc))
        if t[:n] == loc[:n]:
            return False
    return True


def _original(loc: Loc, order: dict[str, list[int]]) -> Loc:
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
        indices = order.get(loc[0])
        if indices is not None and loc[1] < len(indices):
            return (loc[0], indices[loc[1]], *loc[2:])
    return loc


_CONFIG: TypeAdapter[Config] = TypeAdapter(Config)


def _validate(data: Any) -> Config:
    return _CONFIG.validate_python(data, by_alias=True, by_name=False)


# --- cross-reference checks ----------------------------------------------------------------


class _Checker:
    def __init__(
        self, doc: _Doc, config: Config, tainted: set[Loc], order: dict[str, list[int]]
    ) -> None:
        self.doc, self.config, self.tainted, self.order = doc, config, tainted, order

    def at(self, section: str, index: int) -> tuple[str, int]:
        indices = self.order.get(section)
        return (section, indices[index] if indices is not None else index)

    def ok(self, *locs: Loc) -> bool:
        """True when nothing at, above or below these locations was pruned or filled in."""
        return all(_clear(loc, self.tainted) for loc in locs)

    def error(self, loc: Loc, message: str, *, key: bool = False) -> None:
        where = locate(self.doc.entries, self.doc.root, loc)
        node = where.key_node if key and where.key_node is not None else where.node
        self.doc.error(node, where.path, message)

    def warn(self, loc: Loc, message: str) -> None:
        where = locate(self.doc.entries, self.doc.root, loc)
        self.doc.warnings.append(self.doc.issue(where.node, where.path, f"warning: {message}"))

    def run(self) -> None:
        c = self.config
        by_uid: dict[str, str] = {}
        by_ip: dict[IPAddress, str] = {}
        for i, w in enumerate(c.workloads):
            loc = self.at("workloads", i)
            path = f"workloads[{loc[1]}]"
            # An explicit uid stands alone; the default one is made of three other keys.
            derived = w.uid == f"{w.cluster_id}//v1/Pod/{w.namespace}/{w.name}"
            uid_keys = ("name", "namespace", "clusterId") if derived else ("uid",)
            uid_deps = [(*loc, k) for k in uid_keys]
            if self.ok(*uid_deps):
                if w.uid in by_uid:
                    self.error(
                        (*loc, "uid"), f"duplicate uid {w.uid!r} (first used by {by_uid[w.uid]})"
                    )
                else:
                    by_uid[w.uid] = path
            if self.ok((*loc, "workloadIps")):
                for j, ip in enumerate(w.workload_ips):
                    if ip in by_ip and by_ip[ip] != path:
                        self.error(
                            (*loc, "workloadIps", j), f"IP {ip} is already used by {by_ip[ip]}"
                        )
                    by_ip.setdefault(ip, path)

        by_key: dict[str, Any] = {}
        by_vip: dict[tuple[IPAddress, int], str] = {}
        for i, s in enumerate(c.services):
            loc = self.at("services", i)
            if not self.ok(*[(*loc, k) for k in ("name", "namespace", "hostname")]):
                continue
            if s.key in by_key:
                self.error(loc, f"duplicate service {s.key!r}")
                continue
            by_key[s.key] = s
            if not self.ok((*loc, "vips"), (*loc, "ports")):
                continue
            for j, ip in enumerate(s.vips):
                for port, _target in s.ports:
                    owner = by_vip.setdefault((ip, port), s.key)
                    if owner != s.key:
                        self.error(
                            (*loc, "vips", j),
                            f"VIP {ip} port {port} is already used by service {owner!r}",
                        )
        # Services pruned or partly invalid still count as known (no spurious "unknown").
        known = set(by_key)
        for i, s in enumerate(c.services):
            if not self.ok(self.at("services", i)):
                known.add(s.key)

        def check_service(key: str, loc: Loc, what: str, *, at_key: bool = False) -> bool:
            if key in known:
                return True
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(loc, f"{what} {key!r} is not a known service{hint}", key=at_key)
            return False

        for i, w in enumerate(c.workloads):
            loc = self.at("workloads", i)
            for key, ports in w.services:
                svc_loc = (*loc, "services", Key(key))
                if not self.ok((*loc, "services")):
                    break
                if not check_service(key, svc_loc, "service", at_key=True):
                    continue
                svc = by_key.get(key)
                for port, _t in ports:
                    if svc is not None and svc.target_port(port) is None:
                        self.error(
                            (*svc_loc, 1, Key(port)),
                            f"service {key!r} has no port {port}",
                            key=True,
                        )
            if w.waypoint is not None and self.ok((*loc, "waypoint")) and check_service(
                    w.waypoint.destination, (*loc, "waypoint"), "waypoint"):
                self._check_waypoint_use(c, w.waypoint.destination, (*loc, "waypoint"),
                                         f"workload {w.key}", TrafficType.WORKLOAD)
        for i, s in enumerate(c.services):
            loc = self.at("services", i)
            if s.waypoint is not None and self.ok((*loc, "waypoint")) and check_service(
                    s.waypoint.destination, (*loc, "waypoint"), "waypoint"):
                self._check_waypoint_use(c, s.waypoint.destination, (*loc, "waypoint"),
                                         f"service {s.key}", TrafficType.SERVICE)
        for i, wp in enumerate(c.waypoints):
            loc = self.at("waypoints", i)
            if self.ok((*loc, "service")):
                check_service(wp.service, (*loc, "service"), "waypoint service")
        endpoints: dict[str, list[Any]] = {}
        for w in c.workloads:
            for key, _ports in w.services:
                endpoints.setdefault(key, []).append(w)
        l7 = _L7Checks(self, check_service, by_key, endpoints)
        l7.routes()
        l7.traffic_policies()

        seen: dict[str, str] = {}
        for i, p in enumerate(c.policies):
            loc = self.at("policies", i)
            if self.ok((*loc, "name"), (*loc, "namespace")):
                if p.key in seen:
                    self.error(loc, f"duplicate policy {p.key!r} (see {seen[p.key]})")
                seen.setdefault(p.key, f"policies[{loc[1]}]")
            self._check_uids(loc, p.workload_uids, by_uid)
            l7.policy(p, loc)
        seen_pa: dict[tuple[Any, ...], str] = {}
        for i, pa in enumerate(c.peer_authentications):
            loc = self.at("peerAuthentication", i)
            self._check_uids(loc, pa.workload_uids, by_uid)
            if not self.ok(loc):
                continue
            target = (pa.namespace, pa.selector, pa.workload_uids)
            if target in seen_pa:
                where = f"namespace {pa.namespace!r}" if pa.namespace else "the whole mesh"
                self.error(
                    loc,
                    f"a peerAuthentication for {where} with the same selector is "
                    f"already defined at {seen_pa[target]}",
                )
            seen_pa.setdefault(target, f"peerAuthentication[{loc[1]}]")

    def _check_waypoint_use(self, c: Config, key: str, loc: Loc, user: str,
                            kind: TrafficType) -> None:
        """A ``waypoint:`` must name the service of a ``waypoints:`` entry whose trafficType
        covers this kind of traffic (Istio's istio.io/waypoint-for)."""
        declared = [wp for wp in c.waypoints if wp.service == key]
        if not declared:
            self.warn(loc, f"{user} names waypoint service {key!r}, but no 'waypoints:' entry "
                           "declares it: no waypoint proxy serves it, so traffic to "
                           f"{user} is refused until one does")
            return
        wp = declared[0]
        if wp.traffic_type not in (kind, TrafficType.ALL):
            self.error(loc, f"{user} uses waypoint {wp.key}, whose trafficType is "
                            f"{wp.traffic_type.value}: it handles no {kind.value} traffic; "
                            f"set trafficType: {kind.value} or all on the waypoint")

    def _check_uids(self, loc: Loc, uids: tuple[str, ...], by_uid: dict[str, str]) -> None:
        if not self.ok((*loc, "workloadUids")):
            return
        for j, uid in enumerate(uids):
            if uid not in by_uid:
                self.error(
                    (*loc, "workloadUids", j), f"workload uid {uid!r} is not a known workload"
                )


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _shown_labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in labels) + "}"


class _L7Checks:
    """Cross references of routes, trafficPolicies and policies' targetRefs."""

    def __init__(
        self,
        checker: _Checker,
        check_service: Callable[..., bool],
        services: dict[str, Any],
        endpoints: dict[str, list[Any]],
    ) -> None:
        self.checker = checker
        self.check_service = check_service
        self.services = services
        self.endpoints = endpoints

    def service_port(self, key: str, port: int | None, loc: Loc, what: str) -> bool:
        """The service is known and (when ``port`` is set) has that port."""
        if not self.check_service(key, (*loc, "service"), what):
            return False
        service = self.services.get(key)
        if port is not None and service is not None and service.target_port(port) is None:
            ports = ", ".join(str(p) for p, _t in service.ports) or "none"
            self.checker.error(
                (*loc, "port"), f"service {key!r} has no port {port} (its ports: {ports})"
            )
            return False
        return True

    def subset(self, key: str, subset: tuple[tuple[str, str], ...], loc: Loc) -> None:
        members = self.endpoints.get(key, [])
        if any(all(w.effective_labels().get(k) == v for k, v in subset) for w in members):
            return
        seen = []
        for k, _v in subset:
            values = sorted({w.effective_labels().get(k, "(none)") for w in members})
            seen.append(f"{k}: {', '.join(values)}")
        found = f"its workloads have {'; '.join(seen)}" if members else "it has no workloads"
        self.checker.error(
            loc,
            f"subset {_shown_labels(subset)} selects no workload of service {key!r} ({found})",
        )

    def routes(self) -> None:
        ck = self.checker
        seen: dict[str, str] = {}
        for i, r in enumerate(ck.config.routes):
            loc = ck.at("routes", i)
            for j, ref in enumerate(r.parent_refs):
                ref_loc = (*loc, "parentRefs", j)
                if ck.ok(ref_loc):
                    self.service_port(ref.service, ref.port, ref_loc, "parentRef service")
            for j, rule in enumerate(r.rules):
                rule_loc = (*loc, "rules", j)
                for k, backend in enumerate(rule.backend_refs):
                    b_loc = (*rule_loc, "backendRefs", k)
                    if not ck.ok(b_loc):
                        continue
                    known = self.service_port(backend.service, backend.port, b_loc, "service")
                    if known and backend.subset and backend.service in self.services:
                        self.subset(backend.service, backend.subset, (*b_loc, "subset"))
                for k, f in enumerate(rule.filters):
                    m_loc = (*rule_loc, "filters", k, "requestMirror", "backendRef")
                    if f.request_mirror is not None and ck.ok(m_loc):
                        mirror = f.request_mirror.backend_ref
                        self.service_port(mirror.service, mirror.port, m_loc, "mirror service")
            if ck.ok((*loc, "name"), (*loc, "namespace")):
                if r.key in seen:
                    ck.error(loc, f"duplicate route {r.key!r} (see {seen[r.key]})")
                seen.setdefault(r.key, f"routes[{loc[1]}]")

    def traffic_policies(self) -> None:
        ck = self.checker
        seen: dict[str, str] = {}
        by_service: dict[str, tuple[str, str]] = {}
        for i, tp in enumerate(ck.config.traffic_policies):
            loc = ck.at("trafficPolicies", i)
            where = f"trafficPolicies[{loc[1]}]"
            if ck.ok((*loc, "name"), (*loc, "namespace")):
                if tp.key in seen:
                    ck.error(loc, f"duplicate trafficPolicy {tp.key!r} (see {seen[tp.key]})")
                    continue
                seen[tp.key] = where
            if not ck.ok((*loc, "service")):
                continue
            if not self.check_service(tp.service, (*loc, "service"), "service"):
                continue
            if tp.service in by_service:
                first_key, first_where = by_service[tp.service]
                ck.error(
                    (*loc, "service"),
                    f"service {tp.service!r} already has trafficPolicy {first_key!r} "
                    f"({first_where}); {tp.key!r} is a second one: merge them (one "
                    "trafficPolicy per service)",
                )
                continue
            by_service[tp.service] = (tp.key, where)

    def policy(self, policy: Policy, loc: Loc) -> None:
        ck = self.checker
        if policy.target_refs and ck.ok((*loc, "targetRefs"), (*loc, "namespace")):
            waypoints = {w.name for w in ck.config.waypoints if w.namespace == policy.namespace}
            services = {s.name for s in ck.config.services if s.namespace == policy.namespace}
            for j, ref in enumerate(policy.target_refs):
                if ref.kind is TargetKind.GATEWAY and ref.name not in waypoints:
                    ck.error(
                        (*loc, "targetRefs", j, "name"),
                        f"no waypoint {ref.name!r} in namespace {policy.namespace!r} "
                        f"(kind Gateway names an entry of 'waypoints:' in the policy's "
                        f"namespace){_did_you_mean(ref.name, waypoints)}",
                    )
                elif ref.kind is TargetKind.SERVICE and ref.name not in services:
                    ck.error(
                        (*loc, "targetRefs", j, "name"),
                        f"no service {ref.name!r} in namespace {policy.namespace!r} "
                        f"(kind Service names a service of the policy's namespace)"
                        f"{_did_you_mean(ref.name, services)}",
                    )
        if not ck.ok(loc):
            return
        if policy.target_refs:
            return  # enforced by the waypoints it names
        fields = policy.http_fields()
        if fields:
            ck.warn(
                loc,
                f"policy {policy.key} has HTTP fields that a node agent cannot check "
                f"({', '.join(fields)}): it applies to workloads (no targetRefs), so node "
                "agents enforce it fail-closed: an ALLOW match with these fields never "
                "matches and a DENY ignores them (denying whole connections); add targetRefs "
                "to enforce it at a waypoint",
            )


# --- entry points -------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class LoadResult:
    config: Config
    # Not errors: things the user should know (keys accepted but not implemented yet).
    warnings: tuple[ConfigIssue, ...] = ()


def _check(doc: _Doc) -> Config:
    root = doc.root
    if isinstance(root, yaml.ScalarNode) and root.tag == _NULL:
        raise ConfigError([_empty_document(doc.file)])
    data = _to_data(doc, root, "", {})
    if not isinstance(data, dict):
        doc.error(
            root,
            "",
            "the document must be a mapping with keys "
            f"{', '.join(_aliases(Config))}; got {describe(data)}",
        )
        return Config()
    if data.get("workloads") is None:
        entry = next((e for e in doc.entries.get(id(root), []) if e[2] == "workloads"), None)
        doc.error(
            entry[1] if entry else root,
            "workloads",
            f"config {doc.file} has no top-level 'workloads' list: {_WRITE_EMPTY_EXPLICITLY}",
        )
    try:
        config = _validate(data)
        tainted: set[Loc] = set()
        order: dict[str, list[int]] = {}
    except ValidationError as exc:
        for issue, _loc in _issues_of(doc, exc.errors(include_url=False)):
            doc.issues.append(issue)
        salvaged, tainted, order = _salvage(doc, data, exc)
        if salvaged is None:
            return Config()
        config = salvaged
    _Checker(doc, config, tainted, order).run()
    return config


def validate_config_text(text: str | bytes, filename: str = "<string>") -> LoadResult:
    """Parse and validate a config document, with warnings.  Raises :class:`ConfigError`."""
    if not text.strip():  # before YAML, which rejects a tab-only "document" as a syntax error
        raise ConfigError([_empty_document(filename)])
    # The node tree and data are many small acyclic objects: the cyclic GC only slows their
    # creation (a 10,000-workload file: ~3x), so it is paused while loading.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            root = yaml.compose(text, Loader=_YAML_LOADER)
        except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
            raise ConfigError([_syntax_issue(filename, exc)]) from None
        if root is None:
            raise ConfigError([_empty_document(filename)])
        doc = _Doc(filename, root)
        try:
            config = _check(doc)
        except RecursionError:  # self-referencing aliases reaching a recursive walk
            doc.error(root, "", "the document is nested too deeply (recursive alias?)")
            config = Config()
    finally:
        if was_enabled:
            gc.enable()
    if doc.issues:
        # Reading order; issues without a position (none today) go last.
        raise ConfigError(sorted(doc.issues, key=lambda i: (i.line or 1 << 30, i.column or 0)))
    warnings = sorted(doc.warnings, key=lambda i: (i.line or 1 << 30, i.column or 0))
    return LoadResult(config, tuple(warnings))


class _Unclean(Exception):
    """The fast path met an issue or a warning: the caller takes the located path."""


class _FastDoc(_Doc):
    """A document without YAML nodes: any issue aborts (no position to report it at)."""

    def issue(self, node: yaml.Node | None, path: str, message: str) -> ConfigIssue:
        raise _Unclean(message)


def validate_config_data(data: dict[str, Any]) -> LoadResult | None:
    """Validate plain data (e.g. JSON) with the same schema and cross-reference checks as
    :func:`validate_config_text`, without composing YAML (several times faster); ``None``
    when anything is wrong or worth a warning: the caller then validates the text form,
    which locates every issue."""
    if data.get("workloads") is None:
        return None
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        config = _validate(data)
        doc = _FastDoc("<data>", yaml.MappingNode("tag:yaml.org,2002:map", []))
        _Checker(doc, config, set(), {}).run()
    except (ValidationError, _Unclean):
        return None
    finally:
        if was_enabled:
            gc.enable()
    return LoadResult(config, ())


# Config section (document key) -> the model of one entry.
SECTION_MODELS: dict[str, type[Doc]] = {
    "workloads": Workload,
    "services": Service,
    "policies": Policy,
    "peerAuthentication": PeerAuthentication,
    "waypoints": WaypointConfig,
    "routes": HttpRoute,
    "trafficPolicies": TrafficPolicyConfig,
}


_ENTRY_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def validate_entry(section: str, data: Any, trust_domain: str | None = None) -> Doc | None:
    """One entry of ``section`` validated on its own (schema only); ``None`` if invalid.

    A workload without its own trustDomain gets the document's, as in a whole document.
    """
    if section == "workloads" and trust_domain is not None and isinstance(data, dict) \
            and "trustDomain" not in data:
        data = {**data, "trustDomain": trust_domain}
    adapter = _ENTRY_ADAPTERS.get(section)
    if adapter is None:
        adapter = _ENTRY_ADAPTERS[section] = TypeAdapter(SECTION_MODELS[section])
    try:
        entry: Doc = adapter.validate_python(data, by_alias=True, by_name=False)
    except ValidationError:
        return None
    return entry


def validate_config_entries(sections: dict[str, list[Doc]],
                            trust_domain: str | None = None) -> LoadResult | None:
    """A config from entries already validated one by one (:func:`validate_entry`): only the
    document-level and cross-reference checks run, so a change to one entry of a large
    config costs little.  ``None`` when anything is wrong (locate it with the text path)."""
    data: dict[str, Any] = {"workloads": [], **sections}
    if trust_domain is not None:
        data["trustDomain"] = trust_domain
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        config = _validate(data)
        doc = _FastDoc("<data>", yaml.MappingNode("tag:yaml.org,2002:map", []))
        _Checker(doc, config, set(), {}).run()
    except (ValidationError, _Unclean):
        return None
    finally:
        if was_enabled:
            gc.enable()
    return LoadResult(config, ())


def load_config_text(text: str | bytes, filename: str = "<string>") -> Config:
    """Parse and validate a config document.  Raises :class:`ConfigError` listing every issue."""
    return validate_config_text(text, filename).config


def validate_config_file(path: str | Path) -> LoadResult:
    """Read and validate ``path``; unreadable files are reported as a :class:`ConfigError`."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigIssue(name, None, None, "", f"cannot read config file: {reason}")]
        ) from None
    return validate_config_text(data, name)


def load_config_file(path: str | Path) -> Config:
    """Read and load ``path``; unreadable files are reported as a :class:`ConfigError` too."""
    return validate_config_file(path).config
