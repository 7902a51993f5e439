"""Helpers for the real-agent scenarios (tests/netns/test_mesh_*.py).

A :class:`MeshEnv` is one lab cluster with a CA service and one real ``nodeproxy run`` agent
per node (``meshlab.mesh.Mesh``), plus what the scenarios need around it: echo servers
on fresh ports with record files, config edits that wait for every agent to reload, metric
lookups, rule snapshots of a namespace, and bounded polling whose failure message carries the
agents' log tails.  Everything is torn down by :meth:`MeshEnv.close` (agents, CA, cluster),
which the fixtures call in finalizers.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlab import (
    Cluster,
    ClusterSpec,
    PodRole,
    ServiceDef,
    cgroups,
    plan_cluster,
    random_prefix,
    render_config,
    sweep,
)
from meshlab.build import is_lab_netns, list_netns
from meshlab.cgroups import BPF_PINS, pod_cgroup
from meshlab.mesh import Mesh

NODEPROXY = [sys.executable, "-m", "cli.main"]
BACKENDS = ["iptables", "nftables", "ebpf"]

# The shared topology: 2 nodes x 3 pods.
#   n1p1 client (default/client)      n2p1 server (shop/server)
#   n1p2 web endpoint (default/web)   n2p2 web endpoint (default/web)
#   n1p3 outside the mesh (legacy)    n2p3 outside the mesh (legacy)
ROLES: dict[str, PodRole] = {
    "n1p1": PodRole("default", "client"),
    "n1p2": PodRole("default", "web"),
    "n1p3": PodRole("legacy", "legacy", mesh=False),
    "n2p1": PodRole("shop", "server"),
    "n2p2": PodRole("default", "web"),
    "n2p3": PodRole("legacy", "legacy", mesh=False),
}
WEB_VIP = "10.96.0.10"
WEB_PORT = 80
WEB_TARGET_PORT = 9080
SERVICES = [ServiceDef("web", WEB_VIP, {WEB_PORT: WEB_TARGET_PORT}, ["n1p2", "n2p2"])]

_ports = itertools.count(20000)


def fresh_port() -> int:
    """A port no other scenario of this run uses (servers of a test may outlive it briefly)."""
    return next(_ports)


# -- polling and metrics ----------------------------------------------------------------------

def poll(check: Callable[[], bool], timeout: float, describe: Callable[[], str],
         interval: float = 0.1) -> None:
    """Wait until ``check()`` is true; fail with ``describe()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {describe()}")
        time.sleep(interval)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# -- namespace state snapshots ----------------------------------------------------------------

_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTERS = re.compile(r"counter packets \d+ bytes \d+")


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)


def netns_state(netns_path: str) -> dict[str, str]:
    """What capture rules can change in a namespace, normalized (no counters, no timestamps):
    ``iptables-save`` (the nft flavour, Debian's default), ``iptables-legacy-save``,
    ``nft list ruleset``, ``ip rule`` and every routing table."""
    name = Path(netns_path).name
    views = {
        "iptables-save": ["iptables-save"],
        "iptables-legacy-save": ["iptables-legacy-save"],
        "nft list ruleset": ["nft", "list", "ruleset"],
        "ip rule": ["ip", "rule", "show"],
        "ip route show table all": ["ip", "route", "show", "table", "all"],
    }
    state = {}
    for key, argv in views.items():
        proc = _run(["ip", "netns", "exec", name, *argv])
        text = proc.stdout
        if key.startswith("iptables"):
            text = "\n".join(
                _COUNTERS.sub("[-]", ln) for ln in text.splitlines() if not ln.startswith("#")
            )
        text = _NFT_COUNTERS.sub("counter", text)
        state[key] = text.strip() + (f"\n[exit {proc.returncode}: {proc.stderr.strip()}]"
                                     if proc.returncode else "")
    state.update(ebpf_state(netns_path))
    return state


def ebpf_state(netns_path: str) -> dict[str, str]:
    """What eBPF capture can change for a pod: tc qdiscs and ingress filters of every
    interface, the fwmark_accept sysctl, the pod's pins and its cgroup's programs."""
    name = Path(netns_path).name
    links = _run(["ip", "-n", name, "-o", "link", "show"]).stdout
    ifaces = sorted(ln.split(":")[1].strip().split("@")[0]
                    for ln in links.splitlines() if ":" in ln)
    tc = [_run(["ip", "netns", "exec", name, "tc", "qdisc", "show"]).stdout.strip()]
    for iface in ifaces:
        out = _run(["ip", "netns", "exec", name, "tc", "filter", "show", "dev", iface, "ingress"])
        tc.append(f"{iface}: {out.stdout.strip()}")
    pins = Path(BPF_PINS) / name
    cgroup = pod_cgroup(name)
    progs = _run(["bpftool", "cgroup", "show", cgroup]).stdout.strip() \
        if Path(cgroup).is_dir() else "(no cgroup)"
    sysctl = _run(["ip", "netns", "exec", name, "sysctl", "-n", "net.ipv4.tcp_fwmark_accept"])
    return {
        "tc": "\n".join(tc),
        "tcp_fwmark_accept": sysctl.stdout.strip(),
        "bpf pins": " ".join(sorted(p.name for p in pins.iterdir())) if pins.is_dir() else "",
        "cgroup programs": progs,
    }


def state_diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """Human-readable difference between two :func:`netns_state` results ("" when equal)."""
    import difflib

    parts = []
    for key in before:
        if before[key] != after.get(key):
            diff = difflib.unified_diff(before[key].splitlines(), after.get(key, "").splitlines(),
                                        "before", "after", lineterm="")
            parts.append(f"== {key} ==\n" + "\n".join(diff))
    return "\n".join(parts)


def redirect_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([*NODEPROXY, "redirect", *args])


# -- the environment --------------------------------------------------------------------------

@dataclass
class Server:
    pod: str
    port: int
    record: Path
    proc: subprocess.Popen[str]

    def received(self) -> bytes:
        return self.record.read_bytes() if self.record.exists() else b""


@dataclass
class MeshEnv:
    cluster: Cluster
    mesh: Mesh
    backend: str
    base_doc: dict[str, Any]
    workdir: Path
    current_doc: dict[str, Any] | None = None
    servers: list[Server] = field(default_factory=list)

    # -- lookup
    def ip(self, pod: str) -> str:
        return self.cluster.pod(pod).ip

    def addr(self, pod: str, port: int) -> str:
        return f"{self.ip(pod)}:{port}"

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.cluster.nodes)

    def logs(self, *nodes: str) -> str:
        return "\n".join(self.mesh.log_tail(n, 40) for n in (nodes or self.node_names))

    # -- apps
    def serve(self, pod: str, port: int | None = None, tag: str | None = None) -> Server:
        port = port or fresh_port()
        record = self.workdir / f"rx-{pod}-{port}-{len(self.servers)}.bin"
        proc = self.cluster.serve(pod, port, tag=tag or pod, record=str(record))
        server = Server(pod, port, record, proc)
        self.servers.append(server)
        return server

    def connect(self, pod: str, target: str, text: str, *, count: int = 1,
                timeout: float = 5.0) -> list[dict[str, Any]]:
        return self.cluster.connect(pod, target, text, count=count, timeout=timeout)

    def stop_servers(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in self.servers:
            try:
                server.proc.wait(5)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
            for stream in (server.proc.stdout, server.proc.stderr):
                if stream is not None:
                    stream.close()
        self.servers.clear()

    # -- config
    def reload_counts(self, node: str) -> tuple[int, int]:
        reloads = self.mesh.config_dump(node).get("configReloads", {})
        return int(reloads.get("ok", 0)), int(reloads.get("failed", 0))

    def _edit(self, write: Callable[[], None], *, expect_ok: bool, timeout: float) -> None:
        before = {n: self.reload_counts(n) for n in self.node_names}
        write()
        idx = 0 if expect_ok else 1
        what = "loaded" if expect_ok else "rejected"
        for node in self.node_names:
            def done(n: str = node) -> bool:
                return self.reload_counts(n)[idx] > before[n][idx]

            def why(n: str = node) -> str:
                return (f"agent on {n} never {what} the edited config (counts ok/failed before "
                        f"{before[n]}, now {self.reload_counts(n)})\n{self.mesh.log_tail(n)}")

            poll(done, timeout, why)

    def apply_config(self, doc: Mapping[str, Any], timeout: float = 10.0) -> None:
        """Write ``doc`` and wait until every agent has loaded it (no restart)."""
        self.current_doc = copy.deepcopy(dict(doc))
        self._edit(lambda: self.mesh.write_config(doc), expect_ok=True, timeout=timeout)

    def apply_raw_config(self, text: str, timeout: float = 10.0) -> None:
        """Write an invalid config and wait until every agent has rejected it."""
        self.current_doc = None
        self._edit(lambda: self.mesh.write_raw_config(text), expect_ok=False, timeout=timeout)

    def doc(self, *, policies: Sequence[Mapping[str, Any]] = (),
            peer_authentication: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The base config with ``policies`` / ``peerAuthentication`` set."""
        doc = copy.deepcopy(self.base_doc)
        doc["policies"] = [dict(p) for p in policies]
        if peer_authentication is not None:
            doc["peerAuthentication"] = [dict(p) for p in peer_authentication]
        return doc

    # -- between tests
    def reset(self) -> None:
        """Back to the base state: every agent running and ready, the base config loaded."""
        self.stop_servers()
        for node in self.node_names:
            proc = self.mesh.agents.get(node)
            if proc is None or proc.poll() is not None:
                if proc is not None:
                    self.mesh.stop_agent(node)
                self.mesh.start_agent(node)
        self.mesh.wait_ready(30)
        if self.current_doc != self.base_doc:
            self.apply_config(self.base_doc)

    def close(self) -> None:
        try:
            self.stop_servers()
        finally:
            try:
                self.mesh.stop()
            finally:
                destroy_cluster(self.cluster)


def destroy_cluster(cluster: Cluster) -> None:
    try:
        cluster.destroy()
    except Exception:
        sweep(cluster.prefix)
        raise
    left = [n for n in list_netns() if is_lab_netns(n, cluster.prefix)]
    assert not left, f"lab namespaces left behind: {left}"
    state = cgroups.leftovers(cluster.prefix)
    assert not state, f"lab cgroups / eBPF pins left behind: {state}"


@contextlib.contextmanager
def mesh_env(workdir: Path, backend: str, *, nodes: int = 2, pods_per_node: int = 3,
             roles: Mapping[str, PodRole] | None = None,
             services: Sequence[ServiceDef] = (),
             start: bool = True) -> Iterator[MeshEnv]:
    """A cluster plus a started mesh; everything is torn down on exit, also on failure."""
    plan = plan_cluster(ClusterSpec(random_prefix(), nodes=nodes, pods_per_node=pods_per_node))
    cluster = Cluster.create(plan)
    env: MeshEnv | None = None
    try:
        base = render_config(plan, roles, services)
        mesh = Mesh(cluster, workdir, backend=backend)
        env = MeshEnv(cluster, mesh, backend, base, workdir)
        if start:
            mesh.start(base)
            env.current_doc = copy.deepcopy(base)
        yield env
    finally:
        if env is not None:
            env.close()
        else:
            destroy_cluster(cluster)
