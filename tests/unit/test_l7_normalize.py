"""Request-target normalization before policy and routing (Envoy normalize_path, Istio BASE)."""

from __future__ import annotations

import pytest

from ztunnel_cfg.l7.request import (
    TargetError,
    normalize_path,
    normalize_path_and_query,
    normalize_target,
)

PATHS = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/x/../admin/users", "/admin/users"),
    ("/./admin", "/admin"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/../../etc", "/etc"),
    ("/%61dmin/users", "/admin/users"),
    ("/%7euser", "/~user"),
    ("/a%2fb", "/a%2Fb"),  # an encoded slash stays encoded (not a separator)
    ("/a%2e%2e/b", "/a../b"),
    ("/x/%2e%2e/admin", "/admin"),  # decoded dots are dot segments too
    ("/a//b", "/a//b"),  # slashes are not merged
    ("/a/..b/c", "/a/..b/c"),
    ("/files/.hidden", "/files/.hidden"),
]


@pytest.mark.parametrize(("raw", "want"), PATHS, ids=[p for p, _ in PATHS])
def test_normalize_path(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


@pytest.mark.parametrize("raw", ["admin", "/a%zz", "/a%4", "/a%00b", "/a%0d%0a"])
def test_bad_paths_are_errors(raw: str) -> None:
    assert isinstance(normalize_path(raw), TargetError)


TARGETS = [
    ("/a/../b?x=/../y", ("/b?x=/../y", None)),  # the query is left alone
    ("*", ("*", None)),
    ("http://echo/admin/users", ("/admin/users", "echo")),
    ("http://echo:8080", ("/", "echo:8080")),
    ("HTTPS://user@echo/%61?q=1", ("/a?q=1", "echo")),
]


@pytest.mark.parametrize(("raw", "want"), TARGETS, ids=[t for t, _ in TARGETS])
def test_normalize_target(raw: str, want: tuple[str, str | None]) -> None:
    assert normalize_target(raw) == want


@pytest.mark.parametrize("raw", ["ftp://x/a", "echo:80", "/a#frag", "http:///nohost"])
def test_bad_targets_are_errors(raw: str) -> None:
    assert isinstance(normalize_target(raw), TargetError)


def test_h2_path_is_origin_form_only() -> None:
    assert normalize_path_and_query("/x/../a?b") == "/a?b"
    assert normalize_path_and_query("*") == "*"
    assert isinstance(normalize_path_and_query("http://echo/a"), TargetError)
