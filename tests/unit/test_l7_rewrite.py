"""Filters applied purely: header modifiers, URLRewrite, RequestRedirect (Gateway API)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from ztunnel_cfg.l7 import (
    Redirect,
    Request,
    apply_header_modifier,
    mirrors,
    redirect_location,
    replace_prefix,
    response_headers,
    rewrite_request,
)
from ztunnel_cfg.model import HeaderModifier, RouteRule

BACKEND = "backendRefs: [{service: a/b, port: 80}]"


def parse(cls: type[Any], text: str) -> Any:
    return TypeAdapter(cls).validate_python(yaml.safe_load(text), by_alias=True, by_name=False)


def rule(text: str) -> RouteRule:
    result: RouteRule = parse(RouteRule, text)
    return result


# --- ReplacePrefixMatch: the Gateway API table -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "result"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "", "/xyz", "/xyz/foo"),
        ("/", "", "/xyz", "/xyz/"),
    ],
    ids=lambda v: repr(v),
)
def test_replace_prefix(path: str, prefix: str, replacement: str, result: str) -> None:
    assert replace_prefix(path, prefix, replacement) == result


# --- header modifiers -------------------------------------------------------------------------

HEADERS = (("x-a", "1"), ("x-b", "2"), ("x-a", "3"), ("host", "reviews"))


@pytest.mark.parametrize(
    ("modifier", "result"),
    [
        pytest.param("{}", HEADERS, id="nothing"),
        pytest.param(
            "{set: [{name: X-A, value: new}]}",
            (("x-b", "2"), ("host", "reviews"), ("x-a", "new")),
            id="set-replaces-every-value",
        ),
        pytest.param(
            "{set: [{name: x-c, value: c}]}", (*HEADERS, ("x-c", "c")), id="set-absent-adds"
        ),
        pytest.param(
            "{add: [{name: x-a, value: '4'}]}", (*HEADERS, ("x-a", "4")), id="add-appends"
        ),
        pytest.param(
            "{remove: [X-A, x-none]}",
            (("x-b", "2"), ("host", "reviews")),
            id="remove-every-value-case-insensitively",
        ),
        pytest.param(
            "{remove: [x-b], add: [{name: x-b, value: again}]}",
            (("x-a", "1"), ("x-a", "3"), ("host", "reviews"), ("x-b", "again")),
            id="remove-before-add",
        ),
        pytest.param(
            "{set: [{name: x-b, value: s}], add: [{name: x-b, value: t}]}",
            (("x-a", "1"), ("x-a", "3"), ("host", "reviews"), ("x-b", "s"), ("x-b", "t")),
            id="set-before-add",
        ),
    ],
)
def test_apply_header_modifier(modifier: str, result: tuple[tuple[str, str], ...]) -> None:
    assert apply_header_modifier(parse(HeaderModifier, modifier), HEADERS) == result


def test_response_headers_apply_only_response_modifiers() -> None:
    r = rule(f"""
        {BACKEND}
        filters:
        - {{type: RequestHeaderModifier, requestHeaderModifier: {{remove: [x-a]}}}}
        - {{type: ResponseHeaderModifier, responseHeaderModifier: {{remove: [x-b]}}}}
    """)
    assert response_headers(r, HEADERS) == (("x-a", "1"), ("x-a", "3"), ("host", "reviews"))
    assert response_headers(rule(BACKEND), HEADERS) == HEADERS


# --- rewrite_request -------------------------------------------------------------------------

REQUEST = Request("GET", "/api/v1/items?id=7", "reviews", HEADERS)


@pytest.mark.parametrize(
    ("filters", "prefix", "path", "host", "headers"),
    [
        pytest.param("[]", "/api", "/api/v1/items?id=7", "reviews", HEADERS, id="no-filters"),
        pytest.param(
            "[{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, "
            "replaceFullPath: /all}}}]",
            "/api",
            "/all?id=7",
            "reviews",
            HEADERS,
            id="full-path-keeps-query",
        ),
        pytest.param(
            "[{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, "
            "replacePrefixMatch: /v2}}}]",
            "/api",
            "/v2/v1/items?id=7",
            "reviews",
            HEADERS,
            id="prefix-replaced",
        ),
        pytest.param(
            "[{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, "
            "replacePrefixMatch: /v2}}}]",
            "",
            "/v2/api/v1/items?id=7",
            "reviews",
            HEADERS,
            id="prefix-of-slash-prepends",
        ),
        pytest.param(
            "[{type: URLRewrite, urlRewrite: {hostname: other.example}}]",
            "/api",
            "/api/v1/items?id=7",
            "other.example",
            (("x-a", "1"), ("x-b", "2"), ("x-a", "3"), ("host", "other.example")),
            id="hostname-also-replaces-the-host-header",
        ),
        pytest.param(
            "[{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: host, "
            "value: h}]}}, {type: URLRewrite, urlRewrite: {hostname: other.example}}]",
            "/api",
            "/api/v1/items?id=7",
            "other.example",
            (("x-a", "1"), ("x-b", "2"), ("x-a", "3"), ("host", "other.example")),
            id="filters-in-order",
        ),
        pytest.param(
            "[{type: ResponseHeaderModifier, responseHeaderModifier: {remove: [x-a]}},"
            " {type: RequestMirror, requestMirror: {backendRef: {service: a/m, port: 80}}}]",
            "/api",
            "/api/v1/items?id=7",
            "reviews",
            HEADERS,
            id="response-modifier-and-mirror-leave-the-request",
        ),
    ],
)
def test_rewrite_request(
    filters: str,
    prefix: str,
    path: str,
    host: str,
    headers: tuple[tuple[str, str], ...],
) -> None:
    r = rule(f"{{{BACKEND}, filters: {filters}}}")
    rewritten = rewrite_request(r, REQUEST, prefix)
    assert rewritten == Request("GET", path, host, headers)


def test_rewrite_without_a_prefix_treats_it_as_slash() -> None:
    r = rule(
        f"{{{BACKEND}, filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: "
        "ReplacePrefixMatch, replacePrefixMatch: /v2}}}]}"
    )
    assert rewrite_request(r, Request("GET", "/a", "h"), None).path == "/v2/a"


def test_mirrors_in_order() -> None:
    r = rule(f"""
        {BACKEND}
        filters:
        - {{type: RequestMirror, requestMirror: {{backendRef: {{service: a/m1, port: 80}}}}}}
        - {{type: RequestMirror, requestMirror: {{backendRef: {{service: a/m2, port: 81}},
            percent: 5}}}}
    """)
    assert [(m.backend_ref.service, m.percent) for m in mirrors(r)] == [("a/m1", 100), ("a/m2", 5)]
    assert mirrors(rule(BACKEND)) == ()


# --- redirect_location -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("redirect", "port", "prefix", "status", "location"),
    [
        pytest.param("{}", 80, "/api", 302, "http://reviews/api/v1?id=7", id="defaults"),
        pytest.param(
            "{}", 9080, "/api", 302, "http://reviews:9080/api/v1?id=7", id="keeps-the-port"
        ),
        pytest.param(
            "{scheme: https}",
            9080,
            "/api",
            302,
            "https://reviews/api/v1?id=7",
            id="scheme-takes-its-well-known-port",
        ),
        pytest.param(
            "{scheme: https, port: 8443, statusCode: 301}",
            80,
            "/api",
            301,
            "https://reviews:8443/api/v1?id=7",
            id="explicit-port",
        ),
        pytest.param(
            "{port: 80}",
            9080,
            "/api",
            302,
            "http://reviews/api/v1?id=7",
            id="well-known-port-left-out",
        ),
        pytest.param(
            "{hostname: x.example, statusCode: 308}",
            80,
            "/api",
            308,
            "http://x.example/api/v1?id=7",
            id="hostname",
        ),
        pytest.param(
            "{path: {type: ReplaceFullPath, replaceFullPath: /new}}",
            80,
            "/api",
            302,
            "http://reviews/new?id=7",
            id="full-path",
        ),
        pytest.param(
            "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}, statusCode: 307}",
            80,
            "/api",
            307,
            "http://reviews/v2/v1?id=7",
            id="prefix",
        ),
        pytest.param(
            "{hostname: 'fd00::1', port: 8080}",
            80,
            "/api",
            302,
            "http://[fd00::1]:8080/api/v1?id=7",
            id="ipv6-host-bracketed",
        ),
    ],
)
def test_redirect_location(
    redirect: str, port: int, prefix: str, status: int, location: str
) -> None:
    r = rule(f"{{filters: [{{type: RequestRedirect, requestRedirect: {redirect}}}]}}")
    request = Request("GET", "/api/v1?id=7", "reviews")
    assert redirect_location(r, request, prefix, port=port) == Redirect(status, location)


def test_redirect_keeps_an_https_request_scheme() -> None:
    r = rule("{filters: [{type: RequestRedirect, requestRedirect: {hostname: b}}]}")
    found = redirect_location(r, Request("GET", "/x", "a"), "", port=443, scheme="https")
    assert found == Redirect(302, "https://b/x")


def test_no_redirect_without_the_filter() -> None:
    assert redirect_location(rule(BACKEND), Request("GET", "/", "a"), "", port=80) is None
