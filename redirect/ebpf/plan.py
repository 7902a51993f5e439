"""Pure part of the eBPF backend: names, the config record, the desired attachments and the
drift between what is wanted and what the kernel shows (table-tested in tests/unit).

Per pod (network namespace) everything lives under ``<bpffs>/nodeproxy/<pod>/``: one pin per
program and map.  The programs attach to the pod's cgroup (connect4, sock_ops, with
BPF_F_ALLOW_MULTI) and to tc ingress of the pod's interfaces (a filter with our preference
number, ``TC_PREF``), so each of our attachments can be found, and told from other
software's, by program id.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
from dataclasses import dataclass

from redirect.ebpf.errors import EbpfError
from redirect.spec import RedirectSpec

PIN_SUBDIR = "nodeproxy"
TC_PREF = 0x539  # our tc filters' preference (priority) number on each interface
TC_HANDLE = 1

# program pin name -> (function in bpf/nodeproxy_redirect.c, where it attaches)
PROGRAMS: dict[str, tuple[str, str]] = {
    "connect4": ("np_connect4", "cgroup:connect4"),
    "connect6": ("np_connect6", "cgroup:connect6"),
    "sockops": ("np_sockops", "cgroup:sock_ops"),
    "ingress": ("np_ingress", "tc:ingress"),
    "lo_mark": ("np_lo_mark", "tc:lo"),
}
# map pin name -> table in the C source
MAPS: dict[str, str] = {
    "config": "np_config",
    "by_cookie": "np_by_cookie",
    "origdst": "np_origdst",
    "by_cookie6": "np_by_cookie6",
    "origdst6": "np_origdst6",
    "skip_inbound": "np_skip_inbound",
    "skip_uid": "np_skip_uid",
}
# pin -> attach type as bpftool names it
CGROUP_ATTACH = {"connect4": "cgroup_inet4_connect", "connect6": "cgroup_inet6_connect",
                 "sockops": "cgroup_sock_ops"}

FASTPATH_PREFIX = "np_fast_"  # the node's fast path programs (redirect/ebpf/fastpath.py)

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def pod_key(netns_path: str) -> str:
    """Directory name for a pod's pins: the netns name for /run/netns/NAME paths, else a
    stable hash of the path."""
    for base in ("/var/run/netns/", "/run/netns/"):
        if netns_path.startswith(base) and "/" not in netns_path[len(base):]:
            name = netns_path[len(base):]
            if name and not _SAFE.search(name):
                return name
    return "ns-" + hashlib.sha256(netns_path.encode()).hexdigest()[:16]


def cgroup2_root(mounts_text: str, default: str = "/sys/fs/cgroup/unified") -> str:
    """Where the cgroup v2 hierarchy is mounted (``/proc/self/mounts`` text): /sys/fs/cgroup
    on a systemd host in unified mode, /sys/fs/cgroup/unified in hybrid mode."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1]
    return default


def check_cgroup(cgroup: str | None, cgroup_root: str, netns: str) -> str:
    """The pod's cgroup v2 directory; never the root of the hierarchy (that would capture the
    whole machine, agent included)."""
    if not cgroup:
        raise EbpfError(f"no cgroup given for netns {netns}", netns=netns,
                        hint="eBPF capture attaches to the pod's cgroup v2: set `cgroup:` on "
                             "the workload (or --cgroup)")
    path = cgroup.rstrip("/") or "/"
    root = cgroup_root.rstrip("/") or "/"
    if path == root or not path.startswith(root + "/"):
        raise EbpfError(f"cgroup {cgroup} is not below the cgroup v2 root {cgroup_root}",
                        netns=netns,
                        hint="name the pod's own cgroup (never the root cgroup)")
    return path


CONFIG_SIZE = 56  # sizeof(struct np_cfg)


@dataclass(frozen=True, slots=True)
class PodConfig:
    """The record in the ``config`` map (struct np_cfg).  ``pod_ip6`` None: no IPv6 capture
    (np_connect6 then only captures IPv4-mapped destinations)."""

    netns_cookie: int
    pod_ip4: str
    proxy_mark: int
    connmark: int
    mark_mask: int
    probe_ip4: str | None
    outbound_port: int
    inbound_port: int
    hbone_port: int
    pod_ip6: str | None = None

    _FORMAT = "<Q4sIII4sHHHH16s"

    def pack(self) -> bytes:
        probe = ipaddress.IPv4Address(self.probe_ip4).packed if self.probe_ip4 else bytes(4)
        raw = struct.pack(self._FORMAT, self.netns_cookie,
                          ipaddress.IPv4Address(self.pod_ip4).packed, self.proxy_mark,
                          self.connmark, self.mark_mask, probe, self.outbound_port,
                          self.inbound_port, self.hbone_port, 0,
                          ipaddress.IPv6Address(self.pod_ip6).packed if self.pod_ip6
                          else bytes(16))
        return raw + bytes(-len(raw) % 8)

    @classmethod
    def unpack(cls, raw: bytes) -> PodConfig:
        (cookie, pod, proxy, conn, mask, probe, out, inb, hbone,
         _pad, pod6) = struct.unpack_from(cls._FORMAT, raw)
        return cls(cookie, str(ipaddress.IPv4Address(pod)), proxy, conn, mask,
                   None if probe == bytes(4) else str(ipaddress.IPv4Address(probe)),
                   out, inb, hbone,
                   None if pod6 == bytes(16) else str(ipaddress.IPv6Address(pod6)))


def pod_config(spec: RedirectSpec, netns_cookie: int, pod_ip4: str,
               pod_ip6: str | None = None) -> PodConfig:
    """``pod_ip6`` (the pod's IPv6 address, the target of captured IPv6 connects) counts only
    with ``spec.ipv6``, as the rule modes capture IPv6 only then."""
    probe = spec.probe_source_ip
    if probe is not None and ipaddress.ip_address(probe).version != 4:
        probe = None
    if spec.ipv6 and pod_ip6 is None:
        raise EbpfError("IPv6 capture needs the pod's IPv6 address (none outside lo)",
                        hint="configure the pod's IPv6 address first, or capture IPv4 only")
    return PodConfig(netns_cookie, pod_ip4, spec.proxy_mark, spec.connmark, spec.mark_mask,
                     probe, spec.outbound_port, spec.inbound_port, spec.hbone_port,
                     pod_ip6 if spec.ipv6 else None)


def unsupported_spec(spec: RedirectSpec) -> tuple[str, ...]:
    """Spec options the eBPF programs do not implement (install refuses them)."""
    out = []
    if spec.capture_dns:
        out.append("capture_dns")
    if spec.exclude_gids:
        out.append("exclude_gids")
    if spec.exclude_outbound_cidrs:
        out.append("exclude_outbound_cidrs")
    return tuple(out)


def origdst_key(ip: str, port: int) -> int:
    """Key of the ``origdst`` map: the IPv4 address's bytes as the kernel's u32, then port."""
    raw = int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")
    return (raw << 16) | port


def origdst_value(raw: bytes) -> tuple[str, int]:
    ip, port = struct.unpack_from("!4sH", raw)
    return str(ipaddress.IPv4Address(ip)), port


def origdst6_key(ip: str, port: int) -> bytes:
    """Key of the ``origdst6`` map (struct np_key6): the IPv6 address in network order, then
    the port as a host-order u32."""
    return ipaddress.IPv6Address(ip).packed + struct.pack("=I", port)


def origdst6_value(raw: bytes) -> tuple[str, int]:
    ip, port = struct.unpack_from("!16sH", raw)
    return str(ipaddress.IPv6Address(ip)), port


@dataclass(frozen=True, slots=True)
class Observed:
    """What the kernel shows for one pod (ids are BPF program ids)."""

    pins: frozenset[str]  # names present in the pod's pin directory
    pinned_ids: dict[str, int]  # program pin name -> id
    cgroup_progs: tuple[tuple[str, int, str], ...]  # (attach type, id, name) on the cgroup
    tc_progs: tuple[tuple[str, int, str], ...]  # (interface, id, name) at our tc preference
    interfaces: tuple[str, ...]  # the pod's interfaces, lo included
    config: PodConfig | None
    fwmark_accept: bool


def drift(want: PodConfig | None, seen: Observed) -> tuple[str, ...]:
    """Differences between the desired capture (``want``; None = nothing) and ``seen``."""
    problems: list[str] = []
    if want is None:
        if seen.pins:
            problems.append(f"stale pins: {', '.join(sorted(seen.pins))}")
        for kind, prog_id, name in seen.cgroup_progs:
            if prog_id in seen.pinned_ids.values():
                problems.append(f"unexpected: {kind} program {name} (id {prog_id}) attached")
        return tuple(problems)
    expected = set(PROGRAMS) | set(MAPS)
    missing = sorted(expected - seen.pins)
    if missing:
        problems.append(f"missing pins: {', '.join(missing)}")
    ours = set(seen.pinned_ids.values())
    for pin, kind in CGROUP_ATTACH.items():
        want_id = seen.pinned_ids.get(pin)
        here = [(k, i) for k, i, _ in seen.cgroup_progs if k == kind]
        if want_id is None or (kind, want_id) not in here:
            problems.append(f"missing program: {PROGRAMS[pin][0]} not attached to the cgroup "
                            f"({kind})")
        for k, i, name in seen.cgroup_progs:
            if k == kind and i not in ours and name.startswith("np_") \
                    and not name.startswith(FASTPATH_PREFIX):
                problems.append(f"foreign program: {name} (id {i}) on the cgroup ({kind}) is "
                                "not the pinned one (left by an earlier install?)")
    for iface in seen.interfaces:
        pin = "lo_mark" if iface == "lo" else "ingress"
        tc_id = seen.pinned_ids.get(pin)
        at = [(i, name) for ifc, i, name in seen.tc_progs if ifc == iface]
        if tc_id is None or not any(i == tc_id for i, _ in at):
            problems.append(f"missing program: {PROGRAMS[pin][0]} not on tc ingress of {iface}")
        for i, name in at:
            if i != tc_id:
                problems.append(f"foreign program: {name} (id {i}) at our tc preference "
                                f"{TC_PREF} on {iface}")
    if seen.config is None:
        problems.append("config map is empty or unreadable")
    elif seen.config != want:
        problems.append(f"config differs: have {seen.config}, want {want}")
    if not seen.fwmark_accept:
        problems.append("net.ipv4.tcp_fwmark_accept is 0 (source-preserving replies break)")
    return tuple(problems)
