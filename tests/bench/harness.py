"""The benchmark's moving parts: lab cluster, certificates, servers, proxies, measurements.

Topology (docs/bench.md): a lab cluster of 2 nodes x 2 pods.  Pod A (``n1p1`` on node1) is the
client side, pod B (``n2p1`` on node2) the server side, pod W (``n2p2`` on node2) the waypoint
(L7 cases); ``n1p2`` stays idle and out of the mesh.  Servers (iperf3, the tcpload echo
server, the HTTP/1.1 and h2c servers) run in B for the whole run; each case only changes what
sits in between:

- direct:         client in A -> B_ip:port.
- haproxy:        client in A -> 127.0.0.1 (haproxy A) =TLS 1.3 + client cert=> B_ip (haproxy
                  B, verify required) -> 127.0.0.1:port in B.  Like a sidecar pair.
- nodeproxy:      client in A -> B_ip:port, captured by REDIRECT in A's netns -> agent node1
                  =HBONE=> B_ip:15008 (agent node2) -> B_ip:port.
- haproxy-http1:  wrk in A -> haproxy A (``mode http``) =TLS, client cert=> haproxy B
                  (``mode http``, verify required) -> HTTP/1.1 server in B.
- l4-http1:       wrk in A -> service VIP:80, agents only (like nodeproxy) -> HTTP/1.1 server.
- waypoint-http1: wrk in A -> service VIP:80 -> agent node1 =HBONE=> waypoint in W (L7) =HBONE
                  (its own identity)=> agent node2 -> HTTP/1.1 server in B.
- waypoint-http2: the same with h2load (h2c, prior knowledge) -> VIP:81 -> h2c server in B.

CPU pinning: everything on the client side (client programs, haproxy A, agent node1) runs on
CPU 0 and everything on the server side (servers, haproxy B, agent node2, the waypoint) on
CPU 1, so each proxy competes with exactly the application it serves, like a sidecar or a node
agent would (the waypoint is the server's: it runs on the server's node).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from linuxns import setns
from meshlab import (
    Cluster,
    ClusterPlan,
    ClusterSpec,
    PodRole,
    ServiceDef,
    cgroups,
    dump_config,
    plan_cluster,
    render_config,
)
from meshlab.build import write_sysctls
from tests.bench import httpload
from tests.bench.errors import BenchError
from tests.bench.httpload import HttpLoad
from tests.bench.report import BULK_MAY_FAIL, EBPF_CASES

__all__ = ["BenchError"]  # the package's error family lives in errors.py; harness re-exports

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
TCPLOAD = str(Path(__file__).with_name("tcpload.py"))
HTTPSERVER = str(Path(__file__).with_name("httpserver.py"))
IPERF_PORT = 5201
ECHO_PORT = 8080
HTTP1_PORT = 8081  # HTTP/1.1 keep-alive server in pod B
H2_PORT = 8082  # h2c (prior knowledge) server in pod B
# haproxy ports: A's plaintext frontends on 127.0.0.1, B's TLS frontends on B's pod IP.
HAPROXY_A = {IPERF_PORT: 25201, ECHO_PORT: 28080, HTTP1_PORT: 28081}
HAPROXY_B = {IPERF_PORT: 26201, ECHO_PORT: 26080, HTTP1_PORT: 26081}
CLIENT_SA = "bench-client"
SERVER_SA = "bench-server"
WAYPOINT_SA = "bench-waypoint"
# The L7 cases address a service (as applications do in a mesh): VIP:80 is the HTTP/1.1
# server, VIP:81 the h2c server.  Only the waypoint config names a waypoint for it.
HTTP_SERVICE = "bench-http"
HTTP_VIP = "10.96.0.20"
HTTP_SERVICE_PORTS = {80: HTTP1_PORT, 81: H2_PORT}
WAYPOINT_NAME = "bench-waypoint"
WAYPOINT_VIP = "10.96.0.99"
CLIENT_POD, SERVER_POD, WAYPOINT_POD, IDLE_POD = "n1p1", "n2p1", "n2p2", "n1p2"
# Pod sysctls: the connections/s test opens tens of thousands of short connections; reuse
# TIME_WAIT ports for new outgoing connections and widen the ephemeral range so no case runs
# out of source ports (the same settings apply to every case).
POD_SYSCTLS = (
    ("net/ipv4/tcp_tw_reuse", "1"),
    ("net/ipv4/ip_local_port_range", "20000\t60999"),
)


@dataclass(frozen=True, slots=True)
class Params:
    quick: bool
    iperf_seconds: int
    iperf_omit: int
    rr_count: int
    rr_warmup: int
    cps_seconds: float
    http_seconds: int  # each HTTP load: the saturating run and the paced run
    http_warmup_seconds: int = 1  # untimed, paced: opens pools and connections first
    cps_workers: int = 4
    size: int = 100
    client_cpu: int = 0
    server_cpu: int = 1
    http_body: int = 1024
    http_connections: int = 16  # wrk -c; also the paced run's (Istio's benchmark uses 16)
    h2_clients: int = 4  # h2load -c
    h2_streams: int = 10  # h2load -m: concurrent streams per connection
    paced_rate: int = 1000  # requests/s of the fixed-rate run

    @classmethod
    def for_mode(cls, quick: bool, http_seconds: int | None = None) -> Params:
        if quick:
            return cls(quick=True, iperf_seconds=2, iperf_omit=0, rr_count=1000, rr_warmup=100,
                       cps_seconds=1.5, http_seconds=http_seconds or 2)
        return cls(quick=False, iperf_seconds=5, iperf_omit=1, rr_count=2000, rr_warmup=200,
                   cps_seconds=3.0, http_seconds=http_seconds or 5)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread that entered the netns at ``path`` (sockets it opens
    live there); re-raises its exception."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            setns(path)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="bench-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def http_get(netns_path: str, url: str, timeout: float = 2.0) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:  # readiness says why in the body
            return exc.code, exc.read().decode(errors="replace")
    return in_netns(netns_path, get)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(status_text: str) -> float | None:
    """VmRSS of a ``/proc/<pid>/status`` text, in MiB (None for a zombie or kernel thread)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) / 1024
    return None


def proc_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return rss_mib(fh.read())
    except OSError:
        return None


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
            else "?"
    return {
        "haproxy": first_line(["haproxy", "-v"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "cpus": str(os.cpu_count()),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
    }


def missing_tools(http_cases: bool = True) -> list[str]:
    """Tools the selected cases need that are not on PATH (``make deps`` installs them)."""
    needed = ["ip", "taskset", "haproxy", "iperf3"] + (["wrk", "h2load"] if http_cases else [])
    return [t for t in needed if shutil.which(t) is None]


# -- config (pure) ----------------------------------------------------------------------------


def bench_config(plan: ClusterPlan, *, waypoint: bool, same_node: bool = False
                 ) -> dict[str, Any]:
    """The agents' (and the waypoint's) config for ``plan``.  Both variants declare the HTTP
    service with the same VIP and ports, so l4-http1 and waypoint-http1 differ only in the
    waypoint; the pod-IP cases (nodeproxy) use the variant without one, since a service's
    waypoint also takes traffic addressed to its pods."""
    roles = {CLIENT_POD: PodRole(service_account=CLIENT_SA),
             SERVER_POD: PodRole(service_account=SERVER_SA),
             # Out of the mesh without a waypoint: an agent would enroll it and leave its
             # capture rules behind (fail closed), which would later catch the waypoint's
             # own connections to the endpoints.
             WAYPOINT_POD: PodRole(service_account=WAYPOINT_SA, name=WAYPOINT_NAME,
                                   mesh=waypoint),
             # The same-node cases' server (a mesh pod next to A on node1).
             IDLE_POD: PodRole(service_account=SERVER_SA, mesh=same_node)}
    waypoint_service = f"default/{WAYPOINT_NAME}.default.svc.cluster.local"
    services = [ServiceDef(HTTP_SERVICE, HTTP_VIP, HTTP_SERVICE_PORTS, [SERVER_POD],
                           extra={"waypoint": {"destination": waypoint_service}}
                           if waypoint else {})]
    extra: dict[str, Any] = {}
    if waypoint:
        services.append(ServiceDef(WAYPOINT_NAME, WAYPOINT_VIP, {15008: 15008},
                                   [WAYPOINT_POD]))
        extra["waypoints"] = [{"name": WAYPOINT_NAME, "namespace": "default",
                               "service": waypoint_service}]
    return render_config(plan, roles, services, extra=extra)


def exited_message(name: str, returncode: int | None, log_path: Path, log_tail: str) -> str:
    return (f"{name} exited with code {returncode} (log {log_path}): "
            f"{log_tail or '(empty log)'}")


def not_ready_message(name: str, timeout: float, last: str, log_path: Path,
                      log_tail: str) -> str:
    return (f"{name} not ready after {timeout:.0f}s ({last or 'no answer'}); log {log_path}: "
            f"{log_tail or '(empty log)'}")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text exposition whose labels include
    ``labels`` (exact values)."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue  # a longer metric name with this prefix
        series, _, value = line.rpartition(" ")
        if all(w in series for w in wanted):
            total += float(value)
    return total


# -- processes and measurements ---------------------------------------------------------------


@dataclass
class Proxy:
    """A proxy process of one case, with its side (pinning) and role (CPU accounting: the
    agents and haproxy count as their side, the waypoint as ``waypoint``)."""

    side: str  # "client" | "server"
    proc: subprocess.Popen[Any]
    log_path: Path
    role: str = ""
    description: str = ""

    @property
    def account(self) -> str:
        return self.role or self.side

    @property
    def name(self) -> str:
        return self.description or self.log_path.stem


@dataclass(frozen=True, slots=True)
class Usage:
    """What the proxies used while one client program ran."""

    wall: float
    cpu_seconds: Mapping[str, float]  # per account
    rss_peak_mib: Mapping[str, float]  # per account, sampled every 100 ms

    def cpu_percent(self) -> dict[str, float]:
        return {k: round(100 * v / self.wall, 1) for k, v in self.cpu_seconds.items()}


class RssSampler:
    """Samples the proxies' RSS from /proc in a thread while a measurement runs; keeps the
    peak per account."""

    def __init__(self, proxies: list[Proxy], interval: float = 0.1) -> None:
        self.proxies = list(proxies)
        self.interval = interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        per_account: dict[str, float] = {}
        for p in self.proxies:
            rss = proc_rss_mib(p.proc.pid)
            if rss is not None:
                per_account[p.account] = per_account.get(p.account, 0.0) + rss
        for account, rss in per_account.items():
            self.peak[account] = max(self.peak.get(account, 0.0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Bench:
    params: Params
    workdir: Path
    cluster: Cluster
    client: Any = None  # PodPlan of pod A
    server: Any = None  # PodPlan of pod B
    proxies: list[Proxy] = field(default_factory=list)
    profile_dir: Path | None = None  # set: profile the agents in extra, unmeasured passes
    py_spy: str = "py-spy"
    servers: list[subprocess.Popen[Any]] = field(default_factory=list)
    waypoint_extra_args: tuple[str, ...] = ()  # appended to `waypoint run` (fault injection)
    same_node_servers: bool = False  # servers also run in pod n1p2 (same-node cases)
    fastpath_used: bool = False  # the node-wide eBPF fast path was installed: remove it
    last_usage: Usage | None = None  # the proxies' usage during the last measure()

    # -- setup ------------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def create(cls, params: Params, workdir: Path, prefix: str) -> Iterator[Bench]:
        """Build the cluster; tear everything down on exit, also on error or Ctrl-C."""
        plan = plan_cluster(ClusterSpec(prefix, nodes=2, pods_per_node=2))
        log(f"building lab cluster {prefix} (2 nodes x 2 pods)")
        cluster = Cluster.create(plan)
        bench: Bench | None = None
        try:
            bench = cls(params, workdir, cluster, cluster.pod(CLIENT_POD),
                        cluster.pod(SERVER_POD))
            write_sysctls([(p.netns_path, POD_SYSCTLS) for p in plan.pods])
            yield bench
        finally:
            log(f"tearing down {prefix} (processes and namespaces)")
            try:
                cluster.destroy()
            finally:
                if bench is not None and bench.fastpath_used:
                    from redirect.ebpf import fastpath

                    fastpath.remove()

    @property
    def waypoint_pod(self) -> Any:
        return self.cluster.pod(WAYPOINT_POD)

    def pinned(self, side: str, argv: list[str]) -> list[str]:
        cpu = self.params.client_cpu if side == "client" else self.params.server_cpu
        return ["taskset", "-c", str(cpu), *argv]

    def nodeproxy_bin(self) -> str:
        exe = Path(sys.executable).with_name("nodeproxy")
        return str(exe) if exe.exists() else "nodeproxy"

    def make_pki(self) -> dict[str, Path]:
        """One CA (``nodeproxy ca init``) for the agents, and haproxy's certificates issued
        from it with ``nodeproxy ca issue`` (same key type, same profile)."""
        pki = self.workdir / "pki"
        ca = pki / "ca"
        pki.mkdir()
        self._run([self.nodeproxy_bin(), "ca", "init", "--dir", str(ca)], "ca init")
        out = {"ca_dir": ca, "bundle": pki / "bundle.pem"}
        for name, sa in (("client", CLIENT_SA), ("server", SERVER_SA)):
            cert, key = pki / f"{name}.crt", pki / f"{name}.key"
            argv = [self.nodeproxy_bin(), "ca", "issue", "--dir", str(ca),
                    "--spiffe-id", f"spiffe://cluster.local/ns/default/sa/{sa}",
                    "--out-cert", str(cert), "--out-key", str(key)]
            if name == "client":
                argv += ["--out-bundle", str(out["bundle"])]
            self._run(argv, f"ca issue {name}")
            combined = pki / f"{name}.pem"  # haproxy wants chain + key in one file
            combined.write_bytes(cert.read_bytes() + key.read_bytes())
            combined.chmod(0o600)
            out[name] = combined
        return out

    def _run(self, argv: list[str], what: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        return proc.stdout

    def start_servers(self, pod: str | None = None) -> None:
        """iperf3, echo and HTTP servers in pod B (or ``pod``), pinned to the server CPU."""
        b = pod or self.server.name
        self.servers.append(self.cluster.popen(
            b, self.pinned("server", ["iperf3", "-s", "-p", str(IPERF_PORT)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.servers.append(self.cluster.popen(
            b, self.pinned("server", [sys.executable, TCPLOAD, "server", "--port",
                                      str(ECHO_PORT)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.servers.append(self.cluster.popen(
            b, self.pinned("server", [sys.executable, HTTPSERVER, "--http1-port",
                                      str(HTTP1_PORT), "--h2-port", str(H2_PORT), "--size",
                                      str(self.params.http_body)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (IPERF_PORT, ECHO_PORT, HTTP1_PORT, H2_PORT):
            self.wait_port(self.cluster.pod(b).netns_path, "127.0.0.1", port,
                           f"server on port {port} in pod {b}")

    def wait_port(self, path: str, host: str, port: int, what: str,
                  timeout: float = 10.0) -> None:
        """Poll a TCP connect from inside the netns at ``path``; fail early if a proxy died."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_proxies()
            try:
                in_netns(path, lambda: socket.create_connection((host, port), timeout=1).close())
                return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise BenchError(f"{what} ({host}:{port}) is not accepting connections: {last}")

    # -- proxies ----------------------------------------------------------------------------

    def start_proxy(self, side: str, netns: str, argv: list[str], name: str, *,
                    role: str = "", description: str = "", host_mounts: bool = False) -> Proxy:
        log_path = self.workdir / f"{name}.log"
        fh = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed below
        try:
            proc = self.cluster.popen(netns, self.pinned(side, argv), stdout=fh,
                                      stderr=subprocess.STDOUT, cwd=str(REPO),
                                      host_mounts=host_mounts)
        finally:
            fh.close()
        proxy = Proxy(side, proc, log_path, role, description)
        self.proxies.append(proxy)
        return proxy

    def check_proxies(self) -> None:
        for p in self.proxies:
            if p.proc.poll() is not None:
                raise BenchError(exited_message(p.name, p.proc.returncode, p.log_path,
                                                tail(p.log_path)))

    def stop_proxies(self, grace: float = 3.0) -> None:
        for p in self.proxies:
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in self.proxies:
            try:
                p.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.proxies.clear()

    def proxy_cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.proxies:
            out[p.account] = out.get(p.account, 0.0) + proc_cpu_seconds(p.proc.pid)
        return out

    def haproxy_setup(self, pki: dict[str, Path], mode: str = "tcp") -> None:
        """haproxy A (client side) and B (server side).  ``mode tcp``: the iperf3 and echo
        ports (the L4 case); ``mode http``: the HTTP/1.1 port, parsed and forwarded as HTTP on
        both sides with keep-alive to the client, between the two haproxys and to the server
        (haproxy-http1)."""
        b_ip = self.server.ip
        ports = (IPERF_PORT, ECHO_PORT) if mode == "tcp" else (HTTP1_PORT,)
        common = ["global", "    nbthread 1", "    maxconn 4000",
                  "    ssl-default-bind-options ssl-min-ver TLSv1.3",
                  "    ssl-default-server-options ssl-min-ver TLSv1.3",
                  "defaults", f"    mode {mode}", "    timeout connect 5s",
                  "    timeout client 60s", "    timeout server 60s", ""]
        if mode == "http":
            common[-1:] = ["    option http-keep-alive", "    http-reuse safe", ""]
        a_cfg, b_cfg = list(common), list(common)
        for port in ports:
            a_cfg += [f"listen out_{port}", f"    bind 127.0.0.1:{HAPROXY_A[port]}",
                      f"    server b {b_ip}:{HAPROXY_B[port]} ssl crt {pki['client']} "
                      f"ca-file {pki['bundle']} verify required", ""]
            b_cfg += [f"listen in_{port}",
                      f"    bind {b_ip}:{HAPROXY_B[port]} ssl crt {pki['server']} "
                      f"ca-file {pki['bundle']} verify required",
                      f"    server app 127.0.0.1:{port}", ""]
        for side, pod, cfg in (("server", self.server, b_cfg), ("client", self.client, a_cfg)):
            path = self.workdir / f"haproxy-{mode}-{side}.cfg"
            path.write_text("\n".join(cfg))
            check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)],
                                   capture_output=True, text=True, check=False)
            if check.returncode != 0:
                raise BenchError(f"haproxy rejected {path}: {check.stderr.strip()[-400:]}")
            self.start_proxy(side, pod.name, ["haproxy", "-db", "-f", str(path)],
                             f"haproxy-{mode}-{side}")
        self.wait_port(self.server.netns_path, b_ip, HAPROXY_B[ports[-1]], "haproxy B")
        self.wait_port(self.client.netns_path, "127.0.0.1", HAPROXY_A[ports[-1]], "haproxy A")
        self.check_proxies()

    def write_config(self, waypoint: bool, same_node: bool = False) -> Path:
        name = "cluster-waypoint" if waypoint else "cluster-same-node" if same_node else "cluster"
        cfg = self.workdir / f"{name}.yaml"
        cfg.write_text(dump_config(bench_config(self.cluster.plan, waypoint=waypoint,
                                                same_node=same_node)))
        return cfg

    def nodeproxy_setup(self, pki: dict[str, Path], waypoint: bool = False, *,
                        redirect: str = "iptables", same_node: bool = False,
                        fastpath: bool = False) -> Path:
        """The two agents and, with ``waypoint``, the waypoint in pod W (server side: CPU 1).
        Returns the config file they run with."""
        cfg = self.write_config(waypoint, same_node)
        ebpf = redirect == "ebpf"
        if fastpath:  # the fast path's sock_ops attaches to the agents' own cgroups
            cgroups.create([n.netns for n in self.cluster.nodes])
        for side, node in (("server", "node2"), ("client", "node1")):
            self.start_proxy(side, node, [
                self.nodeproxy_bin(), "run", "--config", str(cfg), "--node", node,
                "--dev-ca-dir", str(pki["ca_dir"]), "--redirect", redirect,
                *(["--ebpf-fastpath"] if fastpath else []),
                "--readiness-addr", "127.0.0.1:15021", "--metrics-addr", "127.0.0.1:15020",
                "--admin-addr", "127.0.0.1:15000", "--drain-timeout", "1",
            ], f"agent-{node}", description=f"agent on {node}", host_mounts=ebpf)
        if waypoint:
            pod = self.waypoint_pod
            # Like the agents: the dev CA signs in-process, restricted to the node's
            # workloads (the waypoint workload is on node2).
            self.start_proxy("server", pod.name, [
                self.nodeproxy_bin(), "waypoint", "run", "--config", str(cfg),
                "--name", f"default/{WAYPOINT_NAME}", "--node", pod.node,
                "--listen-ip", pod.ip, "--dev-ca-dir", str(pki["ca_dir"]),
                "--readiness-addr", "127.0.0.1:15021", "--metrics-addr", "127.0.0.1:15020",
                "--admin-addr", "127.0.0.1:15000", "--drain-timeout", "1",
                *self.waypoint_extra_args,
            ], "waypoint", role="waypoint", description=f"waypoint (pod {pod.name})")
        for node in ("node1", "node2"):
            self.wait_ready(f"agent on {node}", self.cluster.node(node).netns_path)
        if waypoint:
            self.wait_ready(f"waypoint (pod {WAYPOINT_POD})", self.waypoint_pod.netns_path)
        return cfg

    def wait_ready(self, name: str, netns_path: str, timeout: float = 20.0) -> None:
        """Poll ``/healthz/ready`` on 127.0.0.1:15021 in ``netns_path``; a proxy that exits
        meanwhile, or never gets ready, fails with its log file named."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_proxies()
            try:
                status, body = http_get(netns_path, "http://127.0.0.1:15021/healthz/ready")
                if status == 200:
                    return
                last = f"HTTP {status} {body.strip()[:200]}".strip()
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        proxy = next((p for p in self.proxies if p.name == name), None)
        log_path = proxy.log_path if proxy else self.workdir
        raise BenchError(not_ready_message(name, timeout, last, log_path, tail(log_path)))

    def metrics_text(self, netns_path: str, what: str) -> str:
        status, text = http_get(netns_path, "http://127.0.0.1:15020/metrics")
        if status != 200:
            raise BenchError(f"metrics of {what} answered HTTP {status}")
        return text

    def mesh_connections(self, node: str) -> float:
        """Sum of istio_tcp_connections_opened_total on ``node``: proves traffic was captured."""
        return metric_sum(self.metrics_text(self.cluster.node(node).netns_path, node),
                          "istio_tcp_connections_opened_total")

    # -- measurements -----------------------------------------------------------------------

    def targets(self, case: str) -> tuple[str, int, int]:
        """(host, iperf port, echo port) the client in A connects to for ``case``."""
        if case == "haproxy":
            return "127.0.0.1", HAPROXY_A[IPERF_PORT], HAPROXY_A[ECHO_PORT]
        if case.startswith("same-node"):
            return self.cluster.pod(IDLE_POD).ip, IPERF_PORT, ECHO_PORT
        return self.server.ip, IPERF_PORT, ECHO_PORT

    def run_client(self, what: str, argv: list[str], timeout: float,
                   env: Mapping[str, str] | None = None
                   ) -> tuple[subprocess.CompletedProcess[str], Usage]:
        """Run one client program in A (pinned to the client CPU) and account the proxies'
        CPU and RSS meanwhile."""
        self.check_proxies()
        before, t0 = self.proxy_cpu(), time.monotonic()
        try:
            with RssSampler(self.proxies) as rss:
                out = self.cluster.exec(self.client.name, self.pinned("client", argv),
                                        timeout=timeout,
                                        env=None if env is None else {**os.environ, **env})
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} did not finish within {timeout:.0f}s") from None
        wall = time.monotonic() - t0
        after = self.proxy_cpu()
        usage = Usage(wall, {k: after[k] - before.get(k, 0.0) for k in after}, dict(rss.peak))
        self.check_proxies()
        return out, usage

    def measure(self, what: str, argv: list[str], timeout: float) -> tuple[dict[str, Any],
                                                                           dict[str, float]]:
        """Run one client program in A; returns its JSON and the proxies' CPU % meanwhile."""
        out, usage = self.run_client(what, argv, timeout)
        try:
            doc = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"{what}: no JSON result (exit {out.returncode}): "
                             f"{out.stderr.strip()[-400:] or out.stdout[-400:]}") from None
        if out.returncode != 0 or doc.get("error"):
            raise BenchError(f"{what} failed: {doc.get('error') or out.stderr.strip()[-400:]}")
        self.last_usage = usage
        return doc, usage.cpu_percent()

    def iperf(self, case: str, streams: int) -> tuple[dict[str, Any], dict[str, float]]:
        host, port, _ = self.targets(case)
        p = self.params
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(p.iperf_seconds),
                "-P", str(streams), "-J"]
        if p.iperf_omit:
            argv += ["-O", str(p.iperf_omit)]
        doc, cpu = self.measure(f"iperf3 -P {streams}", argv,
                                timeout=p.iperf_seconds + p.iperf_omit + 20)
        end = doc.get("end", {})
        received = end.get("sum_received", {}).get("bits_per_second")
        if not received:
            raise BenchError(f"iperf3 -P {streams}: no sum_received in its JSON")
        return {
            "gbps": received / 1e9,
            "sender_gbps": end.get("sum_sent", {}).get("bits_per_second", 0) / 1e9,
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
            "iperf_cpu": end.get("cpu_utilization_percent"),
        }, cpu

    def rr(self, case: str) -> tuple[dict[str, Any], dict[str, float]]:
        host, _, port = self.targets(case)
        p = self.params
        return self.measure("request/response", [
            sys.executable, TCPLOAD, "rr", "--connect", f"{host}:{port}", "--size", str(p.size),
            "--count", str(p.rr_count), "--warmup", str(p.rr_warmup)], timeout=60)

    def cps(self, case: str) -> tuple[dict[str, Any], dict[str, float]]:
        host, _, port = self.targets(case)
        p = self.params
        return self.measure("connections/s", [
            sys.executable, TCPLOAD, "cps", "--connect", f"{host}:{port}", "--size", str(p.size),
            "--seconds", str(p.cps_seconds), "--workers", str(p.cps_workers)],
            timeout=p.cps_seconds + 30)

    # -- HTTP measurements (L7 cases) -------------------------------------------------------

    def http_url(self, case: str) -> str:
        if case == "haproxy-http1":
            return f"http://127.0.0.1:{HAPROXY_A[HTTP1_PORT]}/"
        port = next(sp for sp, tp in HTTP_SERVICE_PORTS.items()
                    if tp == (H2_PORT if case.endswith("http2") else HTTP1_PORT))
        return f"http://{HTTP_VIP}:{port}/"

    def wrk(self, what: str, url: str, seconds: int, rate: int = 0) -> tuple[HttpLoad, Usage]:
        """wrk -t1 -c<http_connections>; ``rate`` > 0 paces it (wrk_bench.lua)."""
        argv = httpload.wrk_argv(url, self.params.http_connections, seconds)
        out, usage = self.run_client(what, argv, timeout=seconds + 30,
                                     env={"WRK_RATE": str(rate)})
        if out.returncode != 0:
            raise BenchError(f"{what}: wrk exited with {out.returncode}: "
                             f"{(out.stderr or out.stdout).strip()[-400:]}")
        load = httpload.parse_wrk(out.stdout)
        problems = httpload.load_problems(load, what, self.params.http_body)
        if problems:
            raise BenchError("; ".join(problems))
        return load, usage

    def h2load(self, what: str, url: str) -> tuple[HttpLoad, Usage]:
        p = self.params
        log_file = self.workdir / "h2load-requests.log"
        log_file.unlink(missing_ok=True)
        argv = httpload.h2load_argv(url, p.h2_clients, p.h2_streams, p.http_seconds,
                                    p.http_warmup_seconds, log_file)
        out, usage = self.run_client(what, argv,
                                     timeout=p.http_seconds + p.http_warmup_seconds + 30)
        if out.returncode != 0:
            raise BenchError(f"{what}: h2load exited with {out.returncode}: "
                             f"{(out.stderr or out.stdout).strip()[-400:]}")
        try:
            log_text = log_file.read_text()
        except OSError as exc:
            raise BenchError(f"{what}: h2load wrote no --log-file {log_file}: {exc}") from None
        load = httpload.parse_h2load(out.stdout, log_text)
        problems = httpload.load_problems(load, what, p.http_body)
        if problems:
            raise BenchError("; ".join(problems))
        return load, usage

    def waypoint_evidence(self, cfg: Path, url: str) -> dict[str, Any]:
        """What the waypoint did and had in force: its request and retry counters (metrics
        are always on) and, from the same pure plan the waypoint runs (explain --http), the
        route and retry policy for the bench's requests."""
        from ztunnel_cfg.explain import HttpQuery, explain
        from ztunnel_cfg.snapshot import load_snapshot

        text = self.metrics_text(self.waypoint_pod.netns_path, "the waypoint")
        target = url.removeprefix("http://").rstrip("/")
        plan = explain(load_snapshot(cfg), f"default/{CLIENT_POD}", target,
                       HttpQuery("GET", "/"))
        if plan.l7 is None:
            raise BenchError(f"explain says {target} from {CLIENT_POD} does not go through "
                             f"the waypoint (check bench_config's waypoint for {HTTP_SERVICE})")
        return {
            "requests_counted": metric_sum(text, "istio_requests_total",
                                           reporter="waypoint"),
            "requests_200": metric_sum(text, "istio_requests_total", reporter="waypoint",
                                       response_code="200"),
            "retries": metric_sum(text, "nodeproxy_waypoint_retries_total"),
            "route": plan.l7.route,
            "retry": plan.l7.retry,
            "timeout": plan.l7.timeout,
        }

    def run_http_case(self, case: str, pki: dict[str, Path], result: dict[str, Any]) -> None:
        """Set up the case's proxies and take its HTTP measurements into ``result``; a load
        that fails through the waypoint names the waypoint's log."""
        try:
            self._run_http_case(case, pki, result)
        except BenchError as exc:
            waypoint = next((p for p in self.proxies if p.role == "waypoint"), None)
            if waypoint is None or str(waypoint.log_path) in str(exc):
                raise
            raise BenchError(f"{exc} (waypoint log {waypoint.log_path}: "
                             f"{tail(waypoint.log_path, 300)})") from None

    def _run_http_case(self, case: str, pki: dict[str, Path], result: dict[str, Any]) -> None:
        p = self.params
        waypoint = case.startswith("waypoint-")
        cfg: Path | None = None
        if case == "haproxy-http1":
            log(f"{case}: haproxy (mode http) in pod A (CPU 0) and pod B (CPU 1)")
            self.haproxy_setup(pki, mode="http")
        else:
            where = ", waypoint in pod " + WAYPOINT_POD + " (CPU 1)" if waypoint else ""
            log(f"{case}: agents on node1 (CPU 0) and node2 (CPU 1){where}")
            cfg = self.nodeproxy_setup(pki, waypoint=waypoint)
        url = self.http_url(case)
        metrics, detail, cpu = result["metrics"], result["detail"], result["proxy_cpu_percent"]
        if waypoint:  # the baseline the load's RSS adds to: ready, no request served yet
            metrics["waypoint_rss_idle_mib"] = sum(
                proc_rss_mib(p.proc.pid) or 0.0 for p in self.proxies if p.role == "waypoint")
        if case.endswith("http1"):
            # Untimed, paced: opens the pooled connections before anything is measured.
            self.wrk(f"{case} warm-up", url, p.http_warmup_seconds, rate=p.paced_rate)
            # The paced run comes first, so its RSS is not the saturating run's high-water.
            load, usage = self.wrk(f"{case} at {p.paced_rate} req/s", url, p.http_seconds,
                                   rate=p.paced_rate)
            self._http_figures(case, "paced_", load, usage, metrics, detail, cpu)
            load, usage = self.wrk(f"{case} wrk -c{p.http_connections}", url, p.http_seconds)
        else:
            load, usage = self.h2load(f"{case} h2load -c{p.h2_clients} -m{p.h2_streams}", url)
        self._http_figures(case, "", load, usage, metrics, detail, cpu)
        if waypoint and self.profile_dir is not None:
            result["profile"] = self.profile_waypoint(case, url)
        if waypoint:
            assert cfg is not None
            evidence = self.waypoint_evidence(cfg, url)
            detail["waypoint"] = evidence
            measured = load.requests + detail.get("paced_load", {}).get("requests", 0)
            log(f"{case}: waypoint counted {evidence['requests_counted']:,.0f} requests "
                f"(metrics on), {evidence['retries']:,.0f} retries; retry policy in force: "
                f"{evidence['retry']}")
            if evidence["requests_counted"] < measured:
                raise BenchError(
                    f"the waypoint counted {evidence['requests_counted']:.0f} requests in "
                    f"istio_requests_total but the client completed {measured}: requests "
                    f"did not all go through it (log {self.workdir / 'waypoint.log'})")
        if cfg is not None:
            opened = self.mesh_connections("node1")
            detail["mesh_connections_opened_node1"] = opened
            if opened <= 0:
                raise BenchError("agent on node1 counted no connection: traffic was not "
                                 "captured (check the REDIRECT rules in pod A)")

    def _http_figures(self, case: str, prefix: str, load: HttpLoad, usage: Usage,
                      metrics: dict[str, Any], detail: dict[str, Any],
                      cpu: dict[str, Any]) -> None:
        percent = usage.cpu_percent()
        metrics[f"{prefix}rps"] = load.rps
        metrics[f"{prefix}p50_us"] = load.p50_us
        metrics[f"{prefix}p99_us"] = load.p99_us
        for account in ("client", "server"):
            if account in percent:
                metrics[f"{prefix}{account}_proxy_cpu"] = percent[account]
        if "waypoint" in percent:
            metrics[f"{prefix}waypoint_cpu"] = percent["waypoint"]
            metrics[f"{prefix}waypoint_rss_mib"] = usage.rss_peak_mib.get("waypoint")
            per_vcpu = httpload.per_cpu_second(load.requests, usage.cpu_seconds["waypoint"])
            if per_vcpu is not None:
                metrics[f"{prefix}rps_per_waypoint_vcpu"] = per_vcpu
        detail[f"{prefix}load"] = {**load.to_document(), "wall_seconds": usage.wall,
                                   "cpu_seconds": dict(usage.cpu_seconds),
                                   "rss_peak_mib": dict(usage.rss_peak_mib)}
        cpu[prefix.rstrip("_") or "load"] = percent
        rss = usage.rss_peak_mib.get("waypoint")
        log(f"{case}: {'paced ' if prefix else ''}{load.rps:,.0f} req/s, p50 "
            f"{load.p50_us:,.0f} us, p99 {load.p99_us:,.0f} us{_cpu_text(percent)}"
            + (f", waypoint RSS {rss:.1f} MiB" if rss is not None else ""))

    # -- profiling ----------------------------------------------------------------------------

    def profile_agents(self, case: str) -> dict[str, Any]:
        """Extra passes (not part of the figures: sampling costs CPU) of the 1-stream iperf3,
        the connections/s and the request/response tests, with py-spy recording both agents;
        returns the top self-time frames per agent and pass and leaves raw collapsed stacks in
        profile_dir."""
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        passes: dict[str, tuple[Callable[[], Any], float]] = {
            "tput1": (lambda: self.iperf(case, 1),
                      self.params.iperf_seconds + self.params.iperf_omit),
            "cps": (lambda: self.cps(case), self.params.cps_seconds),
            # ~0.6 ms per round trip through the mesh: sample a little past the last one.
            "rr": (lambda: self.rr(case),
                   (self.params.rr_count + self.params.rr_warmup) * 0.0006 + 1),
        }
        for name, (work, seconds) in passes.items():
            recorders = []
            for p in self.proxies:
                raw = self.profile_dir / f"{p.log_path.stem}-{name}.txt"
                recorders.append((p, raw, subprocess.Popen(
                    [self.py_spy, "record", "--pid", str(p.proc.pid), "--rate", "250",
                     "--duration", str(max(1, round(seconds))), "--format", "raw",
                     "--nonblocking", "--output", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            work()
            for p, raw, rec in recorders:
                try:
                    _, err = rec.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    rec.kill()
                    _, err = rec.communicate()
                key = f"{p.log_path.stem}/{name}"
                if rec.returncode != 0 or not raw.exists():
                    out[key] = {"error": err.strip()[-300:]}
                    continue
                out[key] = {"file": str(raw), "top_self": top_self_frames(raw.read_text())}
                log(f"profile {key}: " + "; ".join(
                    f"{pct:.0f}% {frame}" for frame, pct in out[key]["top_self"][:5]))
        return out

    def profile_waypoint(self, case: str, url: str) -> dict[str, Any]:
        """An extra, unmeasured pass of the case's saturating load (wrk or h2load) with
        py-spy recording the waypoint; returns its top self-time frames and leaves the raw
        collapsed stacks in profile_dir."""
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        p = self.params
        proc = next(x for x in self.proxies if x.role == "waypoint")
        raw = self.profile_dir / f"waypoint-{case}.txt"
        seconds = p.http_seconds
        rec = subprocess.Popen(
            [self.py_spy, "record", "--pid", str(proc.proc.pid), "--rate", "250",
             "--duration", str(max(1, round(seconds))), "--format", "raw", "--nonblocking",
             "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if case.endswith("http1"):
            self.wrk(f"{case} profiled", url, seconds)
        else:
            self.h2load(f"{case} profiled", url)
        try:
            _, err = rec.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            rec.kill()
            _, err = rec.communicate()
        if rec.returncode != 0 or not raw.exists():
            return {"error": err.strip()[-300:]}
        top = top_self_frames(raw.read_text())
        log(f"profile waypoint/{case}: " + "; ".join(f"{pct:.0f}% {frame}"
                                                    for frame, pct in top[:5]))
        return {"file": str(raw), "top_self": top}

    # -- cases --------------------------------------------------------------------------------

    def run_l4_case(self, case: str, pki: dict[str, Path], result: dict[str, Any]) -> None:
        if case == "haproxy":
            log("haproxy: starting haproxy in pod A (CPU 0) and pod B (CPU 1)")
            self.haproxy_setup(pki)
        elif case == "nodeproxy":
            log("nodeproxy: starting agents on node1 (CPU 0) and node2 (CPU 1)")
            self.nodeproxy_setup(pki)
        elif case in EBPF_CASES:
            self.ebpf_setup(case, pki)
        metrics, detail, cpu = result["metrics"], result["detail"], result["proxy_cpu_percent"]
        for streams in (1, 4):
            try:
                res, cpu[f"tput{streams}"] = self.iperf(case, streams)
            except BenchError as exc:
                if case not in BULK_MAY_FAIL:
                    raise
                detail[f"iperf_{streams}"] = {"error": str(exc)}
                log(f"{case}: iperf3 {streams} stream(s) FAILED (recorded): {exc}")
                continue
            metrics[f"tput{streams}_gbps"] = res["gbps"]
            if streams == 1:  # CPU per GiB moved, per agent (a regression shows as a number)
                gib_per_s = res["gbps"] * 1e9 / 8 / 2**30
                for account, pct in cpu["tput1"].items():
                    if pct > 0:  # an idle side (same-node cases) has no cost per GiB
                        metrics[f"tput1_cpu_s_per_gib_{account}"] = pct / 100 / gib_per_s
            detail[f"iperf_{streams}"] = res
            log(f"{case}: iperf3 {streams} stream(s): {res['gbps']:.2f} Gbit/s"
                f"{_cpu_text(cpu[f'tput{streams}'])}")
        res, cpu["rr"] = self.rr(case)
        metrics["rr_p50_us"], metrics["rr_p99_us"] = res["p50_us"], res["p99_us"]
        round_trips = self.params.rr_count + self.params.rr_warmup
        assert self.last_usage is not None
        for account, seconds in self.last_usage.cpu_seconds.items():
            if seconds > 0:
                metrics[f"rr_cpu_us_{account}"] = seconds / round_trips * 1e6
        detail["rr"] = res
        log(f"{case}: request/response p50 {res['p50_us']:.0f} us, "
            f"p99 {res['p99_us']:.0f} us{_cpu_text(cpu['rr'])}")
        res, cpu["cps"] = self.cps(case)
        metrics["cps"] = res["per_second"]
        assert self.last_usage is not None
        for account, seconds in self.last_usage.cpu_seconds.items():
            if res["connections"] and seconds > 0:
                metrics[f"cps_cpu_us_{account}"] = seconds / res["connections"] * 1e6
        detail["cps"] = res
        log(f"{case}: {res['per_second']:,.0f} connections/s "
            f"({res['errors']} errors){_cpu_text(cpu['cps'])}")
        if res["connections"] == 0:
            raise BenchError(f"no connection succeeded: {res['error_kinds']}")
        if case == "nodeproxy" and self.profile_dir is not None:
            result["profile"] = self.profile_agents(case)
        if case == "nodeproxy" or case in EBPF_CASES:
            opened = self.mesh_connections("node1")
            detail["mesh_connections_opened_node1"] = opened
            if opened <= 0:
                raise BenchError("agent on node1 counted no connection: traffic was not "
                                 "captured (check the REDIRECT rules in pod A)")

    def ebpf_setup(self, case: str, pki: dict[str, Path]) -> None:
        """Agents with --redirect ebpf (the rule modes' capture removed from the pods first);
        same-node cases serve from pod n1p2 (a mesh pod there); the fastpath case also
        starts the agents with --ebpf-fastpath (each agent in its own cgroup)."""
        from redirect import ops

        for pod in self.cluster.pods:  # rules of an earlier agent case stay (fail closed)
            ops.remove(pod.netns_path)
        same_node = case.startswith("same-node")
        fastpath = case == "same-node-fastpath"
        if same_node and not self.same_node_servers:
            self.start_servers(IDLE_POD)
            self.same_node_servers = True
        log(f"{case}: starting agents with --redirect ebpf"
            f"{' --ebpf-fastpath' if fastpath else ''}"
            f"{'; server in pod ' + IDLE_POD + ' on node1' if same_node else ''}")
        self.nodeproxy_setup(pki, redirect="ebpf", same_node=same_node, fastpath=fastpath)
        if fastpath:
            self.fastpath_used = True

    def run_case(self, case: str, pki: dict[str, Path]) -> dict[str, Any]:
        """Set the case up, take every measurement, tear its proxies down."""
        started = time.monotonic()
        result: dict[str, Any] = {"ok": False, "error": None, "metrics": {}, "detail": {},
                                  "proxy_cpu_percent": {}}
        try:
            if "http" in case:
                self.run_http_case(case, pki, result)
            else:
                self.run_l4_case(case, pki, result)
            result["ok"] = True
        except BenchError as exc:
            result["error"] = str(exc)
            log(f"{case}: FAILED: {exc}")
            for p in self.proxies:
                result.setdefault("logs", {})[p.log_path.stem] = tail(p.log_path, 1500)
                result.setdefault("log_files", {})[p.log_path.stem] = str(p.log_path)
        finally:
            self.stop_proxies()
            result["seconds"] = round(time.monotonic() - started, 1)
        return result


def _cpu_text(cpu: Mapping[str, float]) -> str:
    if not cpu:
        return ""
    return " [proxy CPU " + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items())) + "]"


def tail(path: Path, limit: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def top_self_frames(collapsed: str, limit: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the innermost frames in py-spy's raw (collapsed-stack) output:
    lines ``outer;...;inner count``.  Percentages of all samples."""
    counts: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        inner = stack.rsplit(";", 1)[-1]
        counts[inner] = counts.get(inner, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [(frame, 100.0 * n / total) for frame, n in ranked]
