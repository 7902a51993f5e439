"""What to capture in a pod namespace: ports, marks and exclusions (DESIGN §2, §3)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from redirect.errors import RedirectError

# Ports and marks shared with ztunnel (DESIGN §2).
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
PROXY_MARK = 0x539
CONNMARK = 0x111
MARK_MASK = 0xFFF
ROUTE_TABLE = 133
RULE_PRIORITY = 32764
# Kubelet probes are SNAT'd from this link-local address on the node so they bypass capture.
PROBE_SOURCE_IP = "169.254.7.127"


def _net(value: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise RedirectError(f"invalid {what} {value!r}: {exc}", hint="use CIDR notation") from exc


@dataclass(frozen=True, slots=True)
class RedirectSpec:
    """Immutable description of the capture rules for one pod namespace.

    ``mark_mask`` applies to both marks: ``proxy_mark`` (SO_MARK on every agent socket, which
    capture skips) and ``connmark`` (connections the agent opened with a spoofed source, whose
    replies policy routing sends back to the agent's socket via ``route_table``).
    """

    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    hbone_port: int = HBONE_PORT
    dns_port: int = DNS_PORT
    capture_dns: bool = False
    proxy_mark: int = PROXY_MARK
    connmark: int = CONNMARK
    mark_mask: int = MARK_MASK
    route_table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY
    exclude_uids: tuple[int, ...] = ()
    exclude_gids: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    probe_source_ip: str | None = PROBE_SOURCE_IP
    ipv6: bool = False

    def __post_init__(self) -> None:
        ports = {
            "outbound_port": self.outbound_port,
            "inbound_port": self.inbound_port,
            "hbone_port": self.hbone_port,
            "dns_port": self.dns_port,
        }
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise RedirectError(f"{name} {port} is not a TCP port (1..65535)")
        for port in self.exclude_inbound_ports:
            if not 1 <= port <= 65535:
                raise RedirectError(f"exclude_inbound_ports: {port} is not a TCP port")
        if not 0 < self.mark_mask <= 0xFFFFFFFF:
            raise RedirectError(f"mark_mask {self.mark_mask:#x} must be a non-zero 32-bit mask")
        for name, mark in (("proxy_mark", self.proxy_mark), ("connmark", self.connmark)):
            if mark <= 0 or mark & ~self.mark_mask:
                raise RedirectError(
                    f"{name} {mark:#x} must be non-zero and inside mark_mask {self.mark_mask:#x}"
                )
        if self.proxy_mark == self.connmark:
            raise RedirectError("proxy_mark and connmark must differ")
        if not 1 <= self.route_table <= 0xFFFFFFFF or self.route_table in (253, 254, 255):
            raise RedirectError(
                f"route_table {self.route_table} is reserved or out of range",
                hint="pick an unused table id such as 133",
            )
        if not 1 <= self.rule_priority < 32766:
            raise RedirectError(
                f"rule_priority {self.rule_priority} must be in 1..32765 (before the main table)"
            )
        for ident in (*self.exclude_uids, *self.exclude_gids):
            if ident < 0:
                raise RedirectError(f"uid/gid {ident} must not be negative")
        cidrs = tuple(
            str(_net(c, "exclude_outbound_cidrs entry")) for c in self.exclude_outbound_cidrs
        )
        object.__setattr__(self, "exclude_outbound_cidrs", cidrs)
        if self.probe_source_ip is not None:
            try:
                probe = ipaddress.ip_address(self.probe_source_ip)
            except ValueError as exc:
                raise RedirectError(f"invalid probe_source_ip {self.probe_source_ip!r}") from exc
            object.__setattr__(self, "probe_source_ip", str(probe))
        for name in ("exclude_uids", "exclude_gids", "exclude_inbound_ports"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def families(self) -> tuple[int, ...]:
        """IP versions captured: (4,) or (4, 6)."""
        return (4, 6) if self.ipv6 else (4,)
