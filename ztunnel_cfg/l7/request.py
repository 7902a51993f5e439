"""What the L7 decisions see of an HTTP request (the waypoint builds it from h11/h2 events)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["HeaderList", "Request", "TargetError", "header_value", "normalize_path",
           "normalize_path_and_query", "normalize_target"]

# (lowercase name, value) pairs in arrival order; a name may repeat.
HeaderList = tuple[tuple[str, str], ...]


def header_value(headers: HeaderList, name: str) -> str | None:
    """All values of ``name`` joined with ',' (as Envoy matches them); None when absent."""
    values = [v for n, v in headers if n == name]
    if not values:
        return None
    return values[0] if len(values) == 1 else ",".join(values)


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as routing sees it.

    ``path`` is the raw request target in origin form, query included (``/a/b?x=1``);
    ``host`` is the authority without its port; header names are lower case.
    """

    method: str
    path: str
    host: str
    headers: HeaderList = ()

    @property
    def path_only(self) -> str:
        """The path without the query: what path matches compare."""
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


# -- request-target normalization ---------------------------------------------------------------
# Policies and routes compare paths; a client must not reach /admin past a DENY on "/admin*" by
# writing /x/../admin, /%61dmin or http://host/admin.  Envoy's normalize_path (Istio's default
# pathNormalization BASE) does RFC 3986 normalization before any filter or route sees the path,
# and the normalized path is what goes upstream; so do we.

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


@dataclass(frozen=True, slots=True)
class TargetError:
    """A request target that cannot be normalized: answer 400."""

    reason: str


def normalize_path(path: str) -> str | TargetError:
    """RFC 3986 normalization of an origin-form path (no query): percent-encoded unreserved
    characters decoded, other escapes upper-cased (section 6.2.2.1-2), dot segments removed
    (section 5.2.4).  Slashes are not merged (as Istio's BASE)."""
    if not path.startswith("/"):
        return TargetError(f"request path {path[:80]!r} does not start with '/'")
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            escape = part[:2]
            if len(escape) < 2 or not _HEX.issuperset(escape):
                return TargetError(f"bad percent-encoding in request path {path[:80]!r}")
            char = chr(int(escape, 16))
            if char == "\0" or char in "\r\n":
                return TargetError(f"control character escaped in request path {path[:80]!r}")
            out.append((char if char in _UNRESERVED else "%" + escape.upper()) + part[2:])
        path = "".join(out)
    if "/." not in path:
        return path  # no dot segment possible: the common case stops here
    segments = path[1:].split("/")
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
            continue
        if last:
            kept.append("")  # "/a/b/.." is "/a/", a directory
    return "/" + "/".join(kept)


def normalize_target(target: str) -> tuple[str, str | None] | TargetError:
    """An HTTP/1.1 request target (or an HTTP/2 ``:path``) as ``(origin-form path with its
    query, host of an absolute-form target or None)``.  ``*`` (OPTIONS) is kept."""
    if target == "*":
        return target, None
    host: str | None = None
    if not target.startswith("/"):
        split = urlsplit(target)
        if split.scheme.lower() not in ("http", "https") or not split.netloc:
            return TargetError(f"request target {target[:80]!r} is neither a path nor an "
                               "http(s) URL")
        host = split.netloc.rpartition("@")[2]
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    if "#" in target:
        return TargetError(f"request target {target[:80]!r} carries a fragment")
    path, mark, query = target.partition("?")
    normalized = normalize_path(path)
    if isinstance(normalized, TargetError):
        return normalized
    return normalized + mark + query, host


def normalize_path_and_query(path: str) -> str | TargetError:
    """An HTTP/2 ``:path`` (origin form or ``*``; never a URL) normalized."""
    if path != "*" and not path.startswith("/"):
        return TargetError(f":path {path[:80]!r} does not start with '/'")
    normalized = normalize_target(path)
    return normalized if isinstance(normalized, TargetError) else normalized[0]
