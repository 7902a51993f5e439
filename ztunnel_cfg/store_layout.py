"""The config as resources in a key-value store: key layout, split, join, diff (pure).

One key per resource, under a versioned prefix::

    /nodeproxy/v1/<kind>/<namespace>/<name>      value: the resource as compact JSON

``kind`` is the lower-case name of the config section (``workloads``, ``services``,
``policies``, ``peerauthentications``, ``waypoints``, ``routes``, ``trafficpolicies``); a
cluster-wide resource (a mesh-wide peerAuthentication) has namespace ``-``; the document's
trust domain, when not the default, is ``/nodeproxy/v1/meshconfig/-/default``.

:func:`join_resources` turns stored values back into a :class:`Config` with the very loader a
file goes through (schema and cross-reference checks), one resource per line of a synthetic
document, so every issue is reported against the key (or file) the resource came from.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.errors import ConfigError, ConfigIssue
from ztunnel_cfg.loader import (
    LoadResult,
    validate_config_data,
    validate_config_entries,
    validate_config_text,
    validate_entry,
)
from ztunnel_cfg.model import Config, Doc

__all__ = [
    "CONFIG_PREFIX",
    "KINDS",
    "ConfigDiff",
    "EntryCache",
    "Item",
    "ResourceKey",
    "config_to_resources",
    "decode_value",
    "diff_resources",
    "items_from_document",
    "join_resources",
    "parse_key",
]

CONFIG_PREFIX = "/nodeproxy/v1/"
CLUSTER_SCOPE = "-"  # the namespace segment of a resource that has none
MESHCONFIG = "meshconfig"

# kind segment -> config section (document alias), in document order.
KINDS: dict[str, str] = {
    "workloads": "workloads",
    "services": "services",
    "policies": "policies",
    "peerauthentications": "peerAuthentication",
    "waypoints": "waypoints",
    "routes": "routes",
    "trafficpolicies": "trafficPolicies",
}
_SECTION_KIND = {section: kind for kind, section in KINDS.items()}
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$|^-$")


@dataclass(frozen=True, slots=True, order=True)
class ResourceKey:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{CONFIG_PREFIX}{self.kind}/{self.namespace}/{self.name}"


def parse_key(key: str) -> ResourceKey:
    """The parts of a resource key; ``ValueError`` (saying what is wrong) for anything else."""
    if not key.startswith(CONFIG_PREFIX):
        raise ValueError(f"not under {CONFIG_PREFIX}")
    parts = key[len(CONFIG_PREFIX):].split("/")
    if len(parts) != 3 or not all(_SEGMENT.match(p) for p in parts):
        raise ValueError(f"want {CONFIG_PREFIX}<kind>/<namespace>/<name>")
    kind, namespace, name = parts
    if kind not in KINDS and kind != MESHCONFIG:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join([*KINDS, MESHCONFIG])})")
    return ResourceKey(kind, namespace, name)


def _key_of(kind: str, data: Mapping[str, Any]) -> ResourceKey:
    namespace = data.get("namespace") or CLUSTER_SCOPE
    name = data.get("name") or ("default" if kind == "peerauthentications" else "")
    return ResourceKey(kind, str(namespace), str(name))


@dataclass(frozen=True, slots=True)
class Item:
    """One resource: its plain data, and where it came from (a key, or file:line)."""

    key: str
    data: Any
    source: str  # shown in issues: the store key, or "FILE" for a file being applied
    line: int | None = None


def encode(data: Any) -> bytes:
    """The canonical stored value of a resource (stable, so unchanged resources compare equal)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


_NOT_JSON = object()


def decode_value(key: str, raw: bytes) -> Item | ConfigIssue:
    """A stored value as an item, or the issue (naming the key) that makes it unreadable."""
    try:
        rk = parse_key(key)
    except ValueError as exc:
        return ConfigIssue(key, None, None, "", f"bad key: {exc}")
    try:
        data = json.loads(raw)  # what apply writes; YAML (a hand-made edit) otherwise
    except ValueError:
        data = _NOT_JSON
    try:
        if data is _NOT_JSON:
            data = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        return ConfigIssue(key, mark.line + 1 if mark else None, mark.column + 1 if mark else None,
                           "", f"value is not JSON/YAML: {getattr(exc, 'problem', None) or exc}")
    if not isinstance(data, dict):
        return ConfigIssue(key, None, None, "", "value must be a mapping (one resource)")
    if rk.kind == MESHCONFIG:
        if rk != ResourceKey(MESHCONFIG, CLUSTER_SCOPE, "default"):
            return ConfigIssue(key, None, None, "",
                               f"the only meshconfig key is {CONFIG_PREFIX}meshconfig/-/default")
        extra = sorted(set(data) - {"trustDomain"})
        if extra:
            return ConfigIssue(key, None, None, extra[0], "unknown key (meshconfig holds "
                               "trustDomain only)")
        return Item(key, data, key)
    expected = _key_of(rk.kind, data)
    if expected != rk:
        return ConfigIssue(key, None, None, "",
                           f"the key does not match the resource: its namespace/name say "
                           f"{expected}")
    return Item(key, data, key)


def items_from_document(data: Any, source: str,
                        lines: Mapping[tuple[str, int], int] | None = None
                        ) -> tuple[list[Item], list[ConfigIssue]]:
    """Split a plain config document (from a file) into items keyed as they would be stored."""
    issues: list[ConfigIssue] = []
    items: list[Item] = []
    if not isinstance(data, dict):
        return [], [ConfigIssue(source, None, None, "", "the document must be a mapping")]
    for section, value in data.items():
        if section == "trustDomain":
            items.append(Item(f"{CONFIG_PREFIX}meshconfig/-/default", {"trustDomain": value},
                              source, (lines or {}).get(("trustDomain", 0))))
            continue
        kind = _SECTION_KIND.get(str(section))
        if kind is None:
            issues.append(ConfigIssue(source, None, None, str(section),
                                      f"unknown section (known: trustDomain, "
                                      f"{', '.join(_SECTION_KIND)})"))
            continue
        if value is None:
            continue
        if not isinstance(value, list):
            issues.append(ConfigIssue(source, None, None, str(section), "must be a list"))
            continue
        for index, entry in enumerate(value):
            line = (lines or {}).get((str(section), index))
            if not isinstance(entry, dict):
                issues.append(ConfigIssue(source, line, None, f"{section}[{index}]",
                                          "must be a mapping"))
                continue
            key = str(_key_of(kind, entry))
            items.append(Item(key, entry, source, line))
    return items, issues


def config_to_resources(config: Config) -> dict[str, bytes]:
    """A validated config as ``{key: value}``."""
    items, issues = items_from_document(config_to_document(config), "<config>")
    assert not issues  # a Config's document has known sections only
    return {item.key: encode(item.data) for item in items}


_INDEXED = re.compile(r"\b(" + "|".join(map(re.escape, _SECTION_KIND)) + r")\[(\d+)\]")


class EntryCache:
    """Entries validated one by one, kept while their item is the same object (a watcher
    decodes each changed value once), so a rebuild re-validates only what changed."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, str | None, Doc]] = {}

    def entry(self, item: Item, section: str, trust_domain: str | None) -> Doc | None:
        cached = self._entries.get(item.key)
        if cached is not None and cached[0] is item.data and cached[1] == trust_domain:
            return cached[2]
        entry = validate_entry(section, item.data, trust_domain)
        if entry is not None:
            self._entries[item.key] = (item.data, trust_domain, entry)
        return entry

    def keep_only(self, keys: Iterable[str]) -> None:
        wanted = set(keys)
        for key in [k for k in self._entries if k not in wanted]:
            del self._entries[key]


def _from_entries(by_section: Mapping[str, list[Item]], trust: Item | None,
                  cache: EntryCache) -> LoadResult | None:
    td = trust.data.get("trustDomain") if trust is not None else None
    if td is not None and not isinstance(td, str):
        return None
    sections: dict[str, list[Doc]] = {}
    for section, members in by_section.items():
        entries = []
        for item in sorted(members, key=lambda i: i.key):
            entry = cache.entry(item, section, td)
            if entry is None:
                return None
            entries.append(entry)
        if entries:
            sections[section] = entries
    cache.keep_only(item.key for members in by_section.values() for item in members)
    return validate_config_entries(sections, td)


def join_resources(items: Iterable[Item], cache: EntryCache | None = None) -> LoadResult:
    """Validate resources together (schema + cross references) into one :class:`Config`.

    Raises :class:`ConfigError` whose issues name each offending resource's key (and file:line
    for a file).  Two resources with the same key, and an empty set, are errors too (an empty
    store must never mean "no workloads": pods would be un-enrolled).
    """
    by_section: dict[str, list[Item]] = {section: [] for section in _SECTION_KIND}
    issues: list[ConfigIssue] = []
    seen: dict[str, Item] = {}
    trust: Item | None = None
    count = 0
    for item in items:
        count += 1
        first = seen.get(item.key)
        if first is not None:
            issues.append(ConfigIssue(item.source, item.line, None, "",
                                      f"{item.key} is defined twice (also in {_where(first)})"))
            continue
        seen[item.key] = item
        kind = parse_key(item.key).kind
        if kind == MESHCONFIG:
            trust = item
        else:
            by_section[KINDS[kind]].append(item)
    if count == 0:
        issues.append(ConfigIssue(CONFIG_PREFIX, None, None, "",
                                  "no config resources (an empty store never means \"no "
                                  "workloads\"; apply a config with `nodeproxy config apply`)"))
    if issues:
        raise ConfigError(issues)
    # Fast paths: entries validated one by one (cached), or the data as it is; on any issue,
    # the text below locates it.
    if cache is not None:
        joined = _from_entries(by_section, trust, cache)
        if joined is not None:
            return joined
    fast: dict[str, Any] = {"workloads": []}
    if trust is not None:
        fast["trustDomain"] = trust.data.get("trustDomain")
    for section, members in by_section.items():
        if members:
            fast[section] = [item.data for item in sorted(members, key=lambda i: i.key)]
    result = validate_config_data(fast)
    if result is not None:
        return result
    # One resource per line: line n of the text maps to rows[n].
    lines: list[str] = []
    rows: list[tuple[Item, str, int] | None] = []
    if trust is not None:
        lines.append("trustDomain: " + json.dumps(trust.data.get("trustDomain")))
        rows.append((trust, "trustDomain", 0))
    for section, members in by_section.items():
        if not members and section != "workloads":
            continue
        lines.append(f"{section}:" if members else f"{section}: []")
        rows.append(None)
        for index, item in enumerate(sorted(members, key=lambda i: i.key)):
            lines.append("- " + json.dumps(item.data, separators=(", ", ": ")))
            rows.append((item, section, index))
    text = "\n".join(lines) + "\n"
    try:
        return validate_config_text(text, "<store>")
    except ConfigError as exc:
        raise ConfigError([_relocate(issue, rows) for issue in exc.issues]) from None


def _where(item: Item) -> str:
    return f"{item.source}:{item.line}" if item.line is not None else item.source


def _relocate(issue: ConfigIssue, rows: list[tuple[Item, str, int] | None]) -> ConfigIssue:
    index = (issue.line or 0) - 1
    row = rows[index] if 0 <= index < len(rows) else None

    def name(match: re.Match[str]) -> str:
        found = _row_for(rows, match.group(1), int(match.group(2)))
        return found.key if found is not None else match.group(0)

    message = _INDEXED.sub(name, issue.message)
    if row is None:
        return ConfigIssue(issue.file, None, None, _INDEXED.sub(name, issue.path), message)
    item, section, position = row
    prefix = f"{section}[{position}]" if section != "trustDomain" else "trustDomain"
    path = issue.path
    if path.startswith(prefix):
        path = path[len(prefix):].lstrip(".")
    label = item.key if item.source == item.key else f"{item.source} {item.key}"
    return ConfigIssue(label, item.line, None, path, message)


def _row_for(rows: list[tuple[Item, str, int] | None], section: str, index: int) -> Item | None:
    for row in rows:
        if row is not None and row[1] == section and row[2] == index:
            return row[0]
    return None


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.changed)} changed, "
                f"{len(self.removed)} removed")


def diff_resources(current: Mapping[str, bytes], desired: Mapping[str, bytes]) -> ConfigDiff:
    """Which keys a write of ``desired`` (the whole state) adds, changes and removes."""
    added = sorted(k for k in desired if k not in current)
    removed = sorted(k for k in current if k not in desired)
    changed = sorted(k for k in desired if k in current and _same(current[k], desired[k]) is False)
    return ConfigDiff(tuple(added), tuple(changed), tuple(removed))


def _same(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False


def _pretty(raw: bytes | None) -> list[str]:
    if raw is None:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").splitlines()
    return str(yaml.safe_dump(data, sort_keys=True, default_flow_style=False)).splitlines()


def render_diff(diff: ConfigDiff, current: Mapping[str, bytes],
                desired: Mapping[str, bytes]) -> str:
    """A unified diff, one section per key (YAML of each side), like ``kubectl diff``."""
    out: list[str] = []
    for key in sorted([*diff.added, *diff.changed, *diff.removed]):
        before, after = _pretty(current.get(key)), _pretty(desired.get(key))
        out.extend(difflib.unified_diff(before, after,
                                        fromfile=key if key in current else "/dev/null",
                                        tofile=key if key in desired else "/dev/null",
                                        lineterm=""))
    return "\n".join(out) + ("\n" if out else "")
