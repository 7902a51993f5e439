"""The one host:port parser (ztunnel_cfg.hostport) and the callers that word its errors."""

from __future__ import annotations

import ipaddress

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.run_cmd import _hostport
from nodeproxy.errors import IdentityError, ProxyError
from nodeproxy.hbone.protocol import parse_authority
from nodeproxy.identity.ca_service import parse_listen
from nodeproxy.proxy.inbound import parse_authority as _parse_authority
from ztunnel_cfg.hostport import HostPortError, parse_host_port

GOOD = [
    ("10.1.2.3:15008", {}, ("10.1.2.3", 15008)),
    ("[fd00::1]:80", {}, ("fd00::1", 80)),
    ("[fe80::1%eth0]:80", {}, ("fe80::1%eth0", 80)),
    ("localhost:15000", {}, ("localhost", 15000)),
    ("echo.default.svc:80", {}, ("echo.default.svc", 80)),
    (":15020", {"default_host": "0.0.0.0"}, ("0.0.0.0", 15020)),
    ("127.0.0.1:0", {"port_zero": True}, ("127.0.0.1", 0)),
    ("1.2.3.4:65535", {"ip_only": True}, ("1.2.3.4", 65535)),
    ("[::]:1", {"ip_only": True}, ("::", 1)),
]

BAD = [
    ("10.1.2.3", {}, "no ':PORT'"),
    ("[fd00::1]", {}, "no ':PORT'"),
    ("", {}, "no ':PORT'"),
    (":80", {}, "no host"),
    ("fd00::1:80", {}, "IPv6 addresses need [brackets]"),
    ("[fd00::1:80", {}, "unterminated IPv6 literal"),
    ("[10.0.0.1]:80", {}, "'10.0.0.1' in brackets is not an IPv6 address"),
    ("[]:80", {}, "'' in brackets is not an IPv6 address"),
    ("fd00]:80", {}, "unbalanced ']'"),
    ("10.1.2.3:", {}, "invalid port '' (want 1-65535)"),
    ("10.1.2.3:0", {}, "invalid port '0' (want 1-65535)"),
    ("10.1.2.3:65536", {}, "invalid port '65536' (want 1-65535)"),
    ("10.1.2.3:65536", {"port_zero": True}, "invalid port '65536' (want 0-65535)"),
    ("10.1.2.3:-1", {}, "invalid port '-1'"),
    ("10.1.2.3:+80", {}, "invalid port '+80'"),
    ("10.1.2.3:8²", {}, "invalid port '8²'"),
    ("10.1.2.3: 80", {}, "invalid port ' 80'"),
    ("example.com:80", {"ip_only": True}, "'example.com' is not an IP address"),
    ("10.1.2:80", {"ip_only": True}, "'10.1.2' is not an IP address"),
]


@pytest.mark.parametrize(("text", "kw", "expected"), GOOD, ids=[g[0] or "empty" for g in GOOD])
def test_accepts(text: str, kw: dict[str, object], expected: tuple[str, int]) -> None:
    assert parse_host_port(text, **kw) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "kw", "reason"), BAD, ids=[b[0] or "empty" for b in BAD])
def test_refuses_with_the_reason(text: str, kw: dict[str, object], reason: str) -> None:
    with pytest.raises(HostPortError) as info:
        parse_host_port(text, "--thing", **kw)  # type: ignore[arg-type]
    assert reason in info.value.reason
    assert str(info.value) == f"--thing {text!r}: {info.value.reason}"
    assert isinstance(info.value, ValueError)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert parse_host_port(text, ip_only=True) == (str(ip), port)


# -- the callers keep their own error families and wording --------------------------------


def test_hbone_authority_is_a_value_error_with_the_reason() -> None:
    assert parse_authority("[fd00::1]:80") == ("fd00::1", 80)
    with pytest.raises(ValueError, match=r"authority 'fd00::1:80': IPv6 addresses need \["):
        parse_authority("fd00::1:80")


def test_inbound_connect_authority_is_a_400() -> None:
    assert _parse_authority("10.0.0.5:8080") == ("10.0.0.5", 8080)
    assert _parse_authority("[fd00::5]:8080") == ("fd00::5", 8080)
    for bad in ("echo:80", "fd00::5:80", "10.0.0.5:0"):
        with pytest.raises(ProxyError) as info:
            _parse_authority(bad)
        assert (info.value.status, info.value.flags) == (400, "NR")
        assert info.value.message.startswith(f"bad CONNECT authority {bad!r}: ")
        assert info.value.message.endswith("; want IP:PORT")


def test_ca_listen() -> None:
    assert parse_listen(":15012") == ("0.0.0.0", 15012)
    assert parse_listen("[::]:15012") == ("::", 15012)
    with pytest.raises(IdentityError) as info:
        parse_listen("0.0.0.0")
    assert info.value.message == "--listen '0.0.0.0' is not ADDR:PORT: no ':PORT'"
    assert "0.0.0.0:15012" in str(info.value.hint)


def test_run_flags() -> None:
    assert _hostport(":15020", "--metrics-addr") == ("0.0.0.0", 15020)
    assert _hostport("127.0.0.1:0", "--admin-addr") == ("127.0.0.1", 0)
    with pytest.raises(click.BadParameter) as info:
        _hostport("127.0.0.1:x", "--admin-addr")
    assert info.value.format_message() == (
        "Invalid value for --admin-addr: '127.0.0.1:x': invalid port 'x' (want 0-65535); "
        "want HOST:PORT")
