"""install / verify / remove / show for the eBPF backend (one pod: a netns and a cgroup).

install converges: it reads what is in the kernel, and when that differs from the plan in
any way it removes our objects and installs the whole set afresh (programs are small and
loading is cheap next to a half-right state); a second install is a no-op.  Any failure
removes what this install added, so a pod never keeps half the programs.  Capture outlives
the agent: programs and maps are pinned under ``<bpffs>/nodeproxy/<pod>/``, cgroup and tc
attachments are held by the kernel, so a dead agent leaves its pods redirected to ports
nobody listens on (connections are refused, SYNs to the pod dropped): fail closed.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from redirect.ebpf import bpfsys
from redirect.ebpf import fastpath as fast
from redirect.ebpf.bpfsys import detected_cgroup_root
from redirect.ebpf.errors import EbpfError, EbpfUnsupportedError
from redirect.ebpf.loader import load
from redirect.ebpf.plan import (
    CGROUP_ATTACH,
    CONFIG_SIZE,
    FASTPATH_PREFIX,
    MAPS,
    PIN_SUBDIR,
    PROGRAMS,
    Observed,
    PodConfig,
    check_cgroup,
    drift,
    pod_config,
    pod_key,
    unsupported_spec,
)
from redirect.errors import RedirectError
from redirect.netns import run_in_netns
from redirect.ops import Drift, InstallReport, RemoveReport
from redirect.routing import Pyroute2Routing, Routing, RoutingState, routing_plan
from redirect.runner import Runner, run_in, subprocess_runner
from redirect.spec import RedirectSpec

SO_NETNS_COOKIE = 71
NAME = "ebpf"


@dataclass(frozen=True, slots=True)
class EbpfPaths:
    """File roots (injected: tests and other machines may differ).  The cgroup v2 root is
    where this machine mounts it."""

    bpffs: str = "/sys/fs/bpf"
    cgroup_root: str = field(default_factory=detected_cgroup_root)

    def pod_dir(self, netns: str) -> str:
        return os.path.join(self.bpffs, PIN_SUBDIR, pod_key(netns))


@dataclass(frozen=True, slots=True)
class NetnsFacts:
    cookie: int
    pod_ip4: str
    interfaces: tuple[str, ...]  # lo first
    pod_ip6: str | None = None  # first global IPv6 address outside lo


def netns_facts(netns: str) -> NetnsFacts:
    """The namespace's cookie, its first IPv4 (and IPv6, if any) pod address and its
    interfaces."""

    def job() -> NetnsFacts:
        from pyroute2 import IPRoute

        with socket.socket() as s:
            try:
                raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            except OSError as exc:
                raise EbpfUnsupportedError("SO_NETNS_COOKIE (Linux 5.14+)",
                                           str(exc.strerror), netns=netns) from None
        (cookie,) = struct.unpack("=Q", raw)
        ipr = IPRoute()
        try:
            links = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}
            addrs = [(int(m["index"]), str(m.get_attr("IFA_ADDRESS")))
                     for m in ipr.get_addr(family=socket.AF_INET)]
            addrs6 = [(int(m["index"]), str(m.get_attr("IFA_ADDRESS")))
                      for m in ipr.get_addr(family=socket.AF_INET6)]
        finally:
            ipr.close()
        pod_ips = [a for i, a in addrs if links.get(i) != "lo" and not a.startswith("127.")]
        if not pod_ips:
            raise EbpfError(f"netns {netns} has no IPv4 address outside lo", netns=netns,
                            hint="eBPF capture redirects to the pod's own address: configure "
                                 "the pod's interface first")
        pod_ips6 = [a for i, a in addrs6 if links.get(i) != "lo"
                    and not ipaddress.IPv6Address(a).is_link_local]
        ifaces = ["lo", *sorted(n for n in links.values() if n != "lo")]
        return NetnsFacts(cookie, pod_ips[0], tuple(ifaces), pod_ips6[0] if pod_ips6 else None)

    return run_in_netns(netns, job)


def _sysctl(netns: str, runner: Runner, value: int | None = None) -> int:
    key = "net.ipv4.tcp_fwmark_accept"
    if value is not None:
        run_in(runner, netns, ["sysctl", "-q", "-w", f"{key}={value}"])
        return value
    return int(run_in(runner, netns, ["sysctl", "-n", key]).strip() or 0)


def _read_config(pin: str) -> PodConfig | None:
    try:
        fd = bpfsys.obj_get(pin)
    except EbpfError:
        return None
    try:
        raw = bpfsys.map_lookup(fd, struct.pack("=I", 0), CONFIG_SIZE)
    finally:
        os.close(fd)
    if raw is None or raw == bytes(CONFIG_SIZE):
        return None
    return PodConfig.unpack(raw)


def observe(netns: str, cgroup: str | None, facts: NetnsFacts | None, paths: EbpfPaths,
            runner: Runner) -> Observed:
    pod_dir = paths.pod_dir(netns)
    pins = frozenset(os.listdir(pod_dir)) if os.path.isdir(pod_dir) else frozenset()
    ids: dict[str, int] = {}
    for name in PROGRAMS:
        if name in pins:
            prog_id = bpfsys.pinned_id(os.path.join(pod_dir, name))
            if prog_id is not None:
                ids[name] = prog_id
    cg_progs = (bpfsys.cgroup_programs(cgroup, runner)
                if cgroup and os.path.isdir(cgroup) else ())
    tc: list[tuple[str, int, str]] = []
    ifaces = facts.interfaces if facts else ()
    for iface in ifaces:
        tc += [(iface, i, n) for i, n in bpfsys.tc_programs(netns, iface, runner)]
    config = _read_config(os.path.join(pod_dir, "config")) if "config" in pins else None
    fwmark = bool(_sysctl(netns, runner)) if facts else False
    return Observed(pins, ids, cg_progs, tuple(tc), ifaces, config, fwmark)


def _check(netns: str) -> bool:
    return os.path.exists(netns)


def _preflight(netns: str, runner: Runner) -> list[str]:
    """Rule backends' leftovers in the namespace (they would capture before our programs)."""
    from redirect.iptables import IptablesBackend
    from redirect.nftables import NftablesBackend

    return [f"unexpected: rules of the {be.name} backend are installed too"
            for be in (IptablesBackend("auto", runner), NftablesBackend(runner))
            if be.present(netns)]


def install(netns: str, spec: RedirectSpec, cgroup: str | None, *,
            paths: EbpfPaths | None = None, routing: Routing | None = None,
            runner: Runner | None = None, fastpath: bool = False) -> InstallReport:
    """Converge the pod's capture; with ``fastpath`` also put the node's fast path sock_ops
    on the pod's cgroup (:mod:`redirect.ebpf.fastpath` must be installed)."""
    report = _install(netns, spec, cgroup, paths=paths, routing=routing, runner=runner)
    if fastpath and fast.attach_pod(check_cgroup(cgroup, (paths or EbpfPaths()).cgroup_root,
                                                 netns), runner=runner):
        return InstallReport(report.netns, report.backend, True, report.rules, report.routing)
    return report


def _install(netns: str, spec: RedirectSpec, cgroup: str | None, *,
             paths: EbpfPaths | None = None, routing: Routing | None = None,
             runner: Runner | None = None) -> InstallReport:
    paths = paths or EbpfPaths()
    run = runner or subprocess_runner
    route_be = routing or Pyroute2Routing()
    if not _check(netns):
        raise RedirectError(f"network namespace {netns} does not exist", netns=netns,
                            hint="pass an existing namespace path")
    cg = check_cgroup(cgroup, paths.cgroup_root, netns)
    if not os.path.isdir(cg):
        raise EbpfError(f"cgroup {cg} does not exist", netns=netns,
                        hint="create the pod's cgroup v2 directory and move its processes in")
    bad = unsupported_spec(spec)
    if bad:
        raise EbpfError(f"the eBPF backend does not implement: {', '.join(bad)}", netns=netns,
                        hint="use --redirect iptables or nftables for these options")
    others = _preflight(netns, run)
    if others:
        raise RedirectError(f"netns {netns} holds nodeproxy rules of another backend",
                            netns=netns, hint=f"run 'nodeproxy redirect remove --netns {netns}' "
                                              "first")
    bpfsys.ensure_bpffs(paths.bpffs, run)
    facts = netns_facts(netns)
    if spec.ipv6 and facts.pod_ip6 is None:
        raise EbpfError(f"netns {netns} has no IPv6 address outside lo (IPv6 capture "
                        "redirects to the pod's own address)", netns=netns,
                        hint="configure the pod's IPv6 address first, or capture IPv4 only")
    want = pod_config(spec, facts.cookie, facts.pod_ip4, facts.pod_ip6)
    want_routes = routing_plan(spec)
    seen = observe(netns, cg, facts, paths, run)
    skip = (*spec.exclude_inbound_ports,)
    problems = (*drift(want, seen), *want_routes.diff(route_be.capture(netns)))
    if not problems and _maps_match(paths.pod_dir(netns), skip, spec.exclude_uids):
        return InstallReport(netns, NAME, False, len(PROGRAMS), want_routes.describe())
    _teardown(netns, cg, facts, paths, run)
    loaded = load(want, skip, spec.exclude_uids)
    try:
        _put(netns, cg, facts, paths, run, loaded.prog_fds, loaded.map_fds)
        route_be.restore(netns, want_routes)
        _sysctl(netns, run, 1)
        after = (*drift(want, observe(netns, cg, facts, paths, run)),
                 *want_routes.diff(route_be.capture(netns)))
        if after:
            raise EbpfError(f"after install in netns {netns} the eBPF capture differs from the "
                            "plan: " + "; ".join(after), netns=netns,
                            hint="another program changed the attachments concurrently?")
    except Exception as exc:
        try:
            _teardown(netns, cg, facts, paths, run)
            route_be.restore(netns, RoutingState())
        except Exception as undo_exc:
            raise EbpfError(f"{exc}; rolling back also failed: {undo_exc}", netns=netns,
                            hint=f"run 'nodeproxy redirect remove --backend ebpf --netns "
                                 f"{netns}'") from exc
        raise
    finally:
        loaded.close()
    return InstallReport(netns, NAME, True, len(PROGRAMS), want_routes.describe())


def _maps_match(pod_dir: str, skip: tuple[int, ...], uids: tuple[int, ...]) -> bool:
    for pin, keys, fmt in (("skip_inbound", skip, "=H"), ("skip_uid", uids, "=I")):
        try:
            fd = bpfsys.obj_get(os.path.join(pod_dir, pin))
        except EbpfError:
            return False
        try:
            if any(bpfsys.map_lookup(fd, struct.pack(fmt, k), 1) is None for k in keys):
                return False
        finally:
            os.close(fd)
    return True


def _put(netns: str, cgroup: str, facts: NetnsFacts, paths: EbpfPaths, run: Runner,
         prog_fds: dict[str, int], map_fds: dict[str, int]) -> None:
    pod_dir = paths.pod_dir(netns)
    os.makedirs(pod_dir, exist_ok=True)
    for name, fd in (*prog_fds.items(), *map_fds.items()):
        bpfsys.obj_pin(fd, os.path.join(pod_dir, name))
    for iface in facts.interfaces:
        pin = "lo_mark" if iface == "lo" else "ingress"
        bpfsys.tc_attach(netns, iface, os.path.join(pod_dir, pin), run)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for pin in CGROUP_ATTACH:
            bpfsys.prog_attach(prog_fds[pin], cg_fd, bpfsys.ATTACH_TYPES[pin],
                               f"{PROGRAMS[pin][0]} to cgroup {cgroup}")
    finally:
        os.close(cg_fd)


def _teardown(netns: str, cgroup: str | None, facts: NetnsFacts | None, paths: EbpfPaths,
              run: Runner) -> list[str]:
    """Detach and unpin everything of this pod's; returns what was removed, in words."""
    removed: list[str] = []
    pod_dir = paths.pod_dir(netns)
    pins = sorted(os.listdir(pod_dir)) if os.path.isdir(pod_dir) else []
    by_id: dict[int, str] = {}
    for name in PROGRAMS:
        if name in pins:
            prog_id = bpfsys.pinned_id(os.path.join(pod_dir, name))
            if prog_id is not None:
                by_id[prog_id] = name
    if by_id:
        attached = bpfsys.cgroups_with(set(by_id), paths.cgroup_root, run)
        for path, kind, prog_id in attached:
            _detach_cgroup(os.path.join(pod_dir, by_id[prog_id]), path, by_id[prog_id])
            removed.append(f"{PROGRAMS[by_id[prog_id]][0]} from cgroup {path} ({kind})")
    if cgroup and os.path.isdir(cgroup):
        # np_ programs on the pod's cgroup whose pins are gone (an install interrupted
        # between attach and pin, or pins removed by hand): detach by id.
        for kind, prog_id, name in bpfsys.cgroup_programs(cgroup, run):
            if name.startswith("np_") and not name.startswith(FASTPATH_PREFIX) \
                    and prog_id not in by_id:
                bpfsys.detach_by_id(cgroup, kind, prog_id, run)
                removed.append(f"stale {name} (id {prog_id}) from cgroup {cgroup}")
    if facts is not None:
        for iface in facts.interfaces:
            if bpfsys.tc_detach(netns, iface, run):
                removed.append(f"tc ingress filter on {iface}")
    bpfsys.remove_pin_dir(pod_dir)
    if pins:
        removed.append(f"{len(pins)} pins under {pod_dir}")
    return removed


def _detach_cgroup(pin: str, cgroup: str, name: str) -> None:
    prog_fd = bpfsys.obj_get(pin)
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpfsys.prog_detach(prog_fd, cg_fd, bpfsys.ATTACH_TYPES[name],
                               f"{PROGRAMS[name][0]} from cgroup {cgroup}")
        finally:
            os.close(cg_fd)
    finally:
        os.close(prog_fd)


def verify(netns: str, spec: RedirectSpec, cgroup: str | None, *,
           paths: EbpfPaths | None = None, routing: Routing | None = None,
           runner: Runner | None = None) -> Drift:
    paths = paths or EbpfPaths()
    run = runner or subprocess_runner
    route_be = routing or Pyroute2Routing()
    if not _check(netns):
        raise RedirectError(f"network namespace {netns} does not exist", netns=netns)
    if cgroup is None:
        cgroup = attached_cgroup(netns, paths, run)
    problems = []
    if cgroup is None:
        problems.append("missing program: np_connect4 is attached to no cgroup")
        cg = None
    else:
        cg = check_cgroup(cgroup, paths.cgroup_root, netns)
    facts = netns_facts(netns)
    if spec.ipv6 and facts.pod_ip6 is None:
        raise EbpfError(f"netns {netns} has no IPv6 address outside lo (IPv6 capture "
                        "redirects to the pod's own address)", netns=netns,
                        hint="configure the pod's IPv6 address first, or capture IPv4 only")
    want = pod_config(spec, facts.cookie, facts.pod_ip4, facts.pod_ip6)
    seen = observe(netns, cg, facts, paths, run)
    problems += [*drift(want, seen), *routing_plan(spec).diff(route_be.capture(netns)),
                *_preflight(netns, run)]
    if not problems and not _maps_match(paths.pod_dir(netns), spec.exclude_inbound_ports,
                                        spec.exclude_uids):
        problems.append("skip maps differ from the exclusions asked for")
    return Drift(netns, NAME, tuple(problems))


def pinned(netns: str, paths: EbpfPaths | None = None) -> bool:
    """Whether this pod has a pin directory (something of the eBPF backend's)."""
    return os.path.isdir((paths or EbpfPaths()).pod_dir(netns))


def attached_cgroup(netns: str, paths: EbpfPaths, run: Runner) -> str | None:
    """The cgroup the pod's pinned connect4 program is attached to, if any."""
    prog_id = bpfsys.pinned_id(os.path.join(paths.pod_dir(netns), "connect4"))
    if prog_id is None:
        return None
    found = bpfsys.cgroups_with({prog_id}, paths.cgroup_root, run)
    return found[0][0] if found else None


def remove(netns: str, cgroup: str | None = None, *, paths: EbpfPaths | None = None,
           routing: Routing | None = None, runner: Runner | None = None) -> RemoveReport:
    """Detach and unpin everything of this pod's (found by the pinned programs' ids, so the
    cgroup need not be known); the policy routing and the sysctl go back to defaults."""
    paths = paths or EbpfPaths()
    run = runner or subprocess_runner
    route_be = routing or Pyroute2Routing()
    alive = _check(netns)
    facts = netns_facts(netns) if alive else None
    cgroup = cgroup or attached_cgroup(netns, paths, run)
    removed = _teardown(netns, cgroup, facts, paths, run)
    if cgroup and fast.detach_pod(cgroup, runner=run):
        removed.append(f"np_fast_sockops from cgroup {cgroup}")
    if alive:
        routes = route_be.capture(netns)
        if routes:
            route_be.restore(netns, RoutingState())
            removed.extend(routes.describe())
        if removed and _sysctl(netns, run):
            _sysctl(netns, run, 0)
    return RemoveReport(netns, tuple(removed))


def show(netns: str, cgroup: str | None = None, *, paths: EbpfPaths | None = None,
         runner: Runner | None = None) -> str:
    paths = paths or EbpfPaths()
    run = runner or subprocess_runner
    facts = netns_facts(netns) if _check(netns) else None
    seen = observe(netns, cgroup, facts, paths, run)
    if not seen.pins:
        return f"{netns}: no nodeproxy eBPF programs pinned"
    lines = [f"== ebpf ({paths.pod_dir(netns)}) ==",
             "pins: " + ", ".join(sorted(seen.pins))]
    lines += [f"program {n} id {i}" for n, i in sorted(seen.pinned_ids.items())]
    attached = bpfsys.cgroups_with(set(seen.pinned_ids.values()), paths.cgroup_root, run)
    lines += [f"cgroup {p}: {k} id {i}" for p, k, i in attached]
    lines += [f"tc ingress {ifc}: {n} id {i}" for ifc, i, n in seen.tc_progs]
    if seen.config is not None:
        lines.append(f"config: {seen.config}")
    return "\n".join(lines)


__all__ = ["MAPS", "EbpfPaths", "install", "pinned", "preflight", "remove", "show", "verify"]


def preflight(paths: EbpfPaths | None = None, runner: Runner | None = None) -> None:
    """Start-up check: bpffs, cgroup v2, bcc, headers and every program through the verifier
    (loaded, not attached).  Raises an error naming what is missing."""
    paths = paths or EbpfPaths()
    if not os.path.exists(os.path.join(paths.cgroup_root, "cgroup.procs")):
        raise EbpfUnsupportedError("a cgroup v2 hierarchy",
                                   f"{paths.cgroup_root} is not a mounted cgroup2",
                                   hint="mount a cgroup2 hierarchy (e.g. "
                                        "mount -t cgroup2 none /sys/fs/cgroup/unified)")
    bpfsys.ensure_bpffs(paths.bpffs, runner or subprocess_runner)
    load(PodConfig(0, "0.0.0.0", 1, 2, 3, None, 0, 0, 0)).close()
