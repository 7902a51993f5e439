"""Pure application of a rule's filters: header modifiers, URLRewrite, RequestRedirect.

Gateway API semantics.  ``ReplacePrefixMatch`` replaces the prefix that matched, by whole
segments, ignoring trailing slashes on both sides:

    request /foo/bar, prefix /foo, replacement /xyz  -> /xyz/bar
    request /foo,     prefix /foo, replacement /xyz  -> /xyz
    request /foo/,    prefix /foo, replacement /xyz  -> /xyz/
    request /foo/bar, prefix /foo, replacement /     -> /bar
    request /foo,     prefix /,    replacement /xyz  -> /xyz/foo
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_cfg.l7.request import HeaderList, Request
from ztunnel_cfg.model import (
    HeaderModifier,
    HttpPathModifier,
    PathModifierType,
    RequestMirror,
    RouteRule,
)

__all__ = [
    "Redirect",
    "apply_header_modifier",
    "mirrors",
    "redirect_location",
    "replace_prefix",
    "response_headers",
    "rewrite_request",
]

_WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def apply_header_modifier(modifier: HeaderModifier, headers: HeaderList) -> HeaderList:
    """``remove``, then ``set`` (replaces every value of the name), then ``add`` (appends)."""
    drop = set(modifier.remove_headers)
    drop.update(h.name for h in modifier.set_headers)
    kept = [(n, v) for n, v in headers if n not in drop]
    kept.extend((h.name, h.value) for h in modifier.set_headers)
    kept.extend((h.name, h.value) for h in modifier.add_headers)
    return tuple(kept)


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """``path`` (which matched PathPrefix ``prefix``) with that prefix replaced."""
    rest = path[len(prefix.rstrip("/")) :]  # "" or starting with '/'
    return replacement.rstrip("/") + rest or "/"


def _new_path(modifier: HttpPathModifier, path: str, matched_prefix: str | None) -> str:
    if modifier.type is PathModifierType.REPLACE_FULL_PATH:
        return modifier.replacement
    # The loader allows ReplacePrefixMatch only with PathPrefix matches, so a selection
    # always has the prefix; None is treated as the '/' prefix.
    return replace_prefix(path, matched_prefix or "", modifier.replacement)


def _with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def rewrite_request(rule: RouteRule, request: Request, matched_prefix: str | None) -> Request:
    """The request as sent to the backend: RequestHeaderModifier and URLRewrite, in order.

    A rewritten hostname also replaces a ``host`` header (HTTP/1.1), if there is one.
    """
    method, target, host, headers = request.method, request.path, request.host, request.headers
    for f in rule.filters:
        if f.request_header_modifier is not None:
            headers = apply_header_modifier(f.request_header_modifier, headers)
        elif f.url_rewrite is not None:
            rewrite = f.url_rewrite
            if rewrite.hostname is not None:
                host = rewrite.hostname
                headers = tuple((n, host if n == "host" else v) for n, v in headers)
            if rewrite.path is not None:
                path, _, query = target.partition("?")
                target = _with_query(_new_path(rewrite.path, path, matched_prefix), query)
    return Request(method, target, host, headers)


def response_headers(rule: RouteRule, headers: HeaderList) -> HeaderList:
    """Response headers after the rule's ResponseHeaderModifier filters."""
    for f in rule.filters:
        if f.response_header_modifier is not None:
            headers = apply_header_modifier(f.response_header_modifier, headers)
    return headers


def mirrors(rule: RouteRule) -> tuple[RequestMirror, ...]:
    return tuple(f.request_mirror for f in rule.filters if f.request_mirror is not None)


@dataclass(frozen=True, slots=True)
class Redirect:
    status_code: int
    location: str


def _authority(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return shown if port is None else f"{shown}:{port}"


def redirect_location(
    rule: RouteRule,
    request: Request,
    matched_prefix: str | None,
    *,
    port: int,
    scheme: str = "http",
) -> Redirect | None:
    """The redirect the rule answers with, or None when it has no RequestRedirect filter.

    ``port`` and ``scheme`` are the request's own (the service port it came to).  Gateway API
    port rules: the filter's ``port`` if set; else the well-known port of the filter's
    ``scheme`` if set; else the request's port.  A well-known port is left out of Location.
    """
    redirect = rule.redirect
    if redirect is None:
        return None
    new_scheme = redirect.scheme.value if redirect.scheme is not None else scheme
    if redirect.port is not None:
        new_port: int | None = redirect.port
    elif redirect.scheme is not None:
        new_port = _WELL_KNOWN_PORTS.get(new_scheme, port)
    else:
        new_port = port
    if new_port == _WELL_KNOWN_PORTS.get(new_scheme):
        new_port = None
    path, _, query = request.path.partition("?")
    if redirect.path is not None:
        path = _new_path(redirect.path, path, matched_prefix)
    host = redirect.hostname or request.host
    location = f"{new_scheme}://{_authority(host, new_port)}{_with_query(path, query)}"
    return Redirect(redirect.status_code, location)
