"""The project's one ``host:port`` parser (pure; every package may import ``ztunnel_cfg``).

Rules, the same everywhere (flags, ``--listen``, HBONE ``:authority``, CLI targets):

- ``HOST:PORT``; an IPv6 address must be bracketed, ``[fd00::1]:80``, and the brackets must
  hold an IPv6 address (``fd00::1:80`` is ambiguous and refused);
- ``PORT`` is ASCII digits, 1-65535 (0 only with ``port_zero``, for "pick any port");
- an empty host is refused unless the caller names a ``default_host`` (``:15020``);
- ``ip_only`` refuses host names.

Errors are :class:`HostPortError` (a :class:`ValueError`): ``str()`` names what was parsed
(``authority '10.0.0.1:x': invalid port 'x' (want 1-65535)``) and ``reason`` is the bare
reason, so each caller words its own message (a click usage error, a 400, a CA error).
"""

from __future__ import annotations

import ipaddress

__all__ = ["HostPortError", "host_without_port", "parse_host_port"]


class HostPortError(ValueError):
    """``text`` is not a usable ``host:port``; ``reason`` says why."""

    def __init__(self, what: str, text: str, reason: str) -> None:
        super().__init__(f"{what} {text!r}: {reason}")
        self.what = what
        self.text = text
        self.reason = reason


def parse_host_port(
    text: str,
    what: str = "address",
    *,
    default_host: str | None = None,
    ip_only: bool = False,
    port_zero: bool = False,
) -> tuple[str, int]:
    """Split ``text`` into ``(host, port)``; the host comes back without brackets."""
    host, sep, port_text = text.rpartition(":")
    if not sep or (text.startswith("[") and text.endswith("]")):
        raise HostPortError(what, text, "no ':PORT'")
    if host.startswith("["):
        if not host.endswith("]"):
            raise HostPortError(what, text, "unterminated IPv6 literal (want [ADDR]:PORT)")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HostPortError(
                what, text, f"{host!r} in brackets is not an IPv6 address"
            ) from None
    elif ":" in host:
        raise HostPortError(what, text, "IPv6 addresses need [brackets], e.g. [fd00::1]:80")
    elif "]" in host:
        raise HostPortError(what, text, "unbalanced ']'")
    elif not host:
        if default_host is None:
            raise HostPortError(what, text, "no host")
        host = default_host
    elif ip_only:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise HostPortError(what, text, f"{host!r} is not an IP address") from None
    low = 0 if port_zero else 1
    if not (port_text.isascii() and port_text.isdigit()) or not low <= int(port_text) <= 65535:
        raise HostPortError(what, text, f"invalid port {port_text!r} (want {low}-65535)")
    return host, int(port_text)


def host_without_port(host: str) -> str:
    """An HTTP Host / :authority without its port: ``example:8080`` -> ``example``,
    ``[fd00::1]:80`` -> ``fd00::1``; a bare IPv6 address is returned as it is."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host
