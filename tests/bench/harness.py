"""The benchmark's moving parts: lab cluster, certificates, servers, proxies, measurements.

Topology (docs/bench.md): a lab cluster of 2 nodes x 1 pod.  Pod A (``n1p1`` on node1) is the
client side, pod B (``n2p1`` on node2) the server side.  Servers (iperf3, the tcpload echo
server) run in B for the whole run; each case only changes what sits in between:

- direct:    client in A -> B_ip:port.
- haproxy:   client in A -> 127.0.0.1 (haproxy A) =TLS 1.3 + client cert=> B_ip (haproxy B,
             verify required) -> 127.0.0.1:port in B.  Like a sidecar pair.
- nodeproxy: client in A -> B_ip:port, captured by REDIRECT in A's netns -> agent node1
             =HBONE=> B_ip:15008 (agent node2) -> B_ip:port.

CPU pinning: everything on the client side (client programs, haproxy A, agent node1) runs on
CPU 0 and everything on the server side (servers, haproxy B, agent node2) on CPU 1, so each
proxy competes with exactly the application it serves, like a sidecar or a node agent would.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from linuxns import setns
from meshlab import Cluster, ClusterSpec, PodRole, dump_config, plan_cluster, render_config
from meshlab.build import write_sysctls

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
TCPLOAD = str(Path(__file__).with_name("tcpload.py"))
IPERF_PORT = 5201
ECHO_PORT = 8080
# haproxy ports: A's plaintext frontends on 127.0.0.1, B's TLS frontends on B's pod IP.
HAPROXY_A = {IPERF_PORT: 25201, ECHO_PORT: 28080}
HAPROXY_B = {IPERF_PORT: 26201, ECHO_PORT: 26080}
CLIENT_SA = "bench-client"
SERVER_SA = "bench-server"
# Pod sysctls: the connections/s test opens tens of thousands of short connections; reuse
# TIME_WAIT ports for new outgoing connections and widen the ephemeral range so no case runs
# out of source ports (the same settings apply to every case).
POD_SYSCTLS = (
    ("net/ipv4/tcp_tw_reuse", "1"),
    ("net/ipv4/ip_local_port_range", "20000\t60999"),
)


class BenchError(Exception):
    """A case could not be set up or measured; the message says what to check."""


@dataclass(frozen=True, slots=True)
class Params:
    quick: bool
    iperf_seconds: int
    iperf_omit: int
    rr_count: int
    rr_warmup: int
    cps_seconds: float
    cps_workers: int = 4
    size: int = 100
    client_cpu: int = 0
    server_cpu: int = 1

    @classmethod
    def for_mode(cls, quick: bool) -> Params:
        if quick:
            return cls(quick=True, iperf_seconds=2, iperf_omit=0, rr_count=1000, rr_warmup=100,
                       cps_seconds=1.5)
        return cls(quick=False, iperf_seconds=5, iperf_omit=1, rr_count=2000, rr_warmup=200,
                   cps_seconds=3.0)


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
        except urllib.error.HTTPError as exc:
            return exc.code, ""
    return in_netns(netns_path, get)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "cpus": str(os.cpu_count()),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
    }


def missing_tools() -> list[str]:
    return [t for t in ("ip", "taskset", "haproxy", "iperf3") if shutil.which(t) is None]


@dataclass
class Proxy:
    """A proxy process of one case, with its side (for CPU accounting)."""

    side: str  # "client" | "server"
    proc: subprocess.Popen[Any]
    log_path: Path


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

    # -- setup ------------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def create(cls, params: Params, workdir: Path, prefix: str) -> Iterator[Bench]:
        """Build the cluster; tear everything down on exit, also on error or Ctrl-C."""
        plan = plan_cluster(ClusterSpec(prefix, nodes=2, pods_per_node=1))
        log(f"building lab cluster {prefix} (2 nodes x 1 pod)")
        cluster = Cluster.create(plan)
        try:
            bench = cls(params, workdir, cluster, cluster.pod("n1p1"), cluster.pod("n2p1"))
            write_sysctls([(p.netns_path, POD_SYSCTLS) for p in plan.pods])
            yield bench
        finally:
            log(f"tearing down {prefix} (processes and namespaces)")
            cluster.destroy()

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

    def start_servers(self) -> None:
        b = self.server.name
        self.servers.append(self.cluster.popen(
            b, self.pinned("server", ["iperf3", "-s", "-p", str(IPERF_PORT)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.servers.append(self.cluster.popen(
            b, self.pinned("server", [sys.executable, TCPLOAD, "server", "--port",
                                      str(ECHO_PORT)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (IPERF_PORT, ECHO_PORT):
            self.wait_port(self.server.netns_path, "127.0.0.1", port,
                           f"server on port {port} in pod B")

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

    def start_proxy(self, side: str, netns: str, argv: list[str], name: str) -> Proxy:
        log_path = self.workdir / f"{name}.log"
        fh = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed below
        try:
            proc = self.cluster.popen(netns, self.pinned(side, argv), stdout=fh,
                                      stderr=subprocess.STDOUT, cwd=str(REPO))
        finally:
            fh.close()
        proxy = Proxy(side, proc, log_path)
        self.proxies.append(proxy)
        return proxy

    def check_proxies(self) -> None:
        for p in self.proxies:
            if p.proc.poll() is not None:
                raise BenchError(f"{p.log_path.stem} exited with {p.proc.returncode}: "
                                 f"{tail(p.log_path)}")

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
            out[p.side] = out.get(p.side, 0.0) + proc_cpu_seconds(p.proc.pid)
        return out

    def haproxy_setup(self, pki: dict[str, Path]) -> None:
        b_ip = self.server.ip
        common = ["global", "    nbthread 1", "    maxconn 4000",
                  "    ssl-default-bind-options ssl-min-ver TLSv1.3",
                  "    ssl-default-server-options ssl-min-ver TLSv1.3",
                  "defaults", "    mode tcp", "    timeout connect 5s",
                  "    timeout client 60s", "    timeout server 60s", ""]
        a_cfg, b_cfg = list(common), list(common)
        for port in (IPERF_PORT, ECHO_PORT):
            a_cfg += [f"listen out_{port}", f"    bind 127.0.0.1:{HAPROXY_A[port]}",
                      f"    server b {b_ip}:{HAPROXY_B[port]} ssl crt {pki['client']} "
                      f"ca-file {pki['bundle']} verify required", ""]
            b_cfg += [f"listen in_{port}",
                      f"    bind {b_ip}:{HAPROXY_B[port]} ssl crt {pki['server']} "
                      f"ca-file {pki['bundle']} verify required",
                      f"    server app 127.0.0.1:{port}", ""]
        for side, pod, cfg in (("server", self.server, b_cfg), ("client", self.client, a_cfg)):
            path = self.workdir / f"haproxy-{side}.cfg"
            path.write_text("\n".join(cfg))
            check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)],
                                   capture_output=True, text=True, check=False)
            if check.returncode != 0:
                raise BenchError(f"haproxy rejected {path}: {check.stderr.strip()[-400:]}")
            self.start_proxy(side, pod.name, ["haproxy", "-db", "-f", str(path)],
                             f"haproxy-{side}")
        self.wait_port(self.server.netns_path, b_ip, HAPROXY_B[ECHO_PORT], "haproxy B")
        self.wait_port(self.client.netns_path, "127.0.0.1", HAPROXY_A[ECHO_PORT], "haproxy A")
        self.check_proxies()

    def nodeproxy_setup(self, pki: dict[str, Path]) -> None:
        roles = {self.client.name: PodRole(service_account=CLIENT_SA),
                 self.server.name: PodRole(service_account=SERVER_SA)}
        cfg = self.workdir / "cluster.yaml"
        cfg.write_text(dump_config(render_config(self.cluster.plan, roles)))
        for side, node in (("server", "node2"), ("client", "node1")):
            self.start_proxy(side, node, [
                self.nodeproxy_bin(), "run", "--config", str(cfg), "--node", node,
                "--dev-ca-dir", str(pki["ca_dir"]), "--redirect", "iptables",
                "--readiness-addr", "127.0.0.1:15021", "--metrics-addr", "127.0.0.1:15020",
                "--admin-addr", "127.0.0.1:15000", "--drain-timeout", "1",
            ], f"agent-{node}")
        for node in ("node1", "node2"):
            self.wait_ready(node)

    def wait_ready(self, node: str, timeout: float = 20.0) -> None:
        path = self.cluster.node(node).netns_path
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_proxies()
            try:
                status, _ = http_get(path, "http://127.0.0.1:15021/healthz/ready")
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise BenchError(f"agent on {node} not ready after {timeout:.0f}s ({last})")

    def mesh_connections(self, node: str) -> float:
        """Sum of istio_tcp_connections_opened_total on ``node``: proves traffic was captured."""
        status, text = http_get(self.cluster.node(node).netns_path,
                                "http://127.0.0.1:15020/metrics")
        if status != 200:
            raise BenchError(f"metrics of {node} answered HTTP {status}")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("istio_tcp_connections_opened_total"))

    # -- measurements -----------------------------------------------------------------------

    def targets(self, case: str) -> tuple[str, int, int]:
        """(host, iperf port, echo port) the client in A connects to for ``case``."""
        if case == "haproxy":
            return "127.0.0.1", HAPROXY_A[IPERF_PORT], HAPROXY_A[ECHO_PORT]
        return self.server.ip, IPERF_PORT, ECHO_PORT

    def measure(self, what: str, argv: list[str], timeout: float) -> tuple[dict[str, Any],
                                                                           dict[str, float]]:
        """Run one client program in A; returns its JSON and the proxies' CPU % meanwhile."""
        self.check_proxies()
        before, t0 = self.proxy_cpu(), time.monotonic()
        try:
            out = self.cluster.exec(self.client.name, self.pinned("client", argv),
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} did not finish within {timeout:.0f}s") from None
        wall = time.monotonic() - t0
        after = self.proxy_cpu()
        cpu = {side: round(100 * (after[side] - before.get(side, 0.0)) / wall, 1)
               for side in after}
        try:
            doc = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"{what}: no JSON result (exit {out.returncode}): "
                             f"{out.stderr.strip()[-400:] or out.stdout[-400:]}") from None
        if out.returncode != 0 or doc.get("error"):
            raise BenchError(f"{what} failed: {doc.get('error') or out.stderr.strip()[-400:]}")
        self.check_proxies()
        return doc, cpu

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

    def run_case(self, case: str, pki: dict[str, Path]) -> dict[str, Any]:
        """Set the case up, take every measurement, tear its proxies down."""
        started = time.monotonic()
        result: dict[str, Any] = {"ok": False, "error": None, "metrics": {}, "detail": {},
                                  "proxy_cpu_percent": {}}
        try:
            if case == "haproxy":
                log("haproxy: starting haproxy in pod A (CPU 0) and pod B (CPU 1)")
                self.haproxy_setup(pki)
            elif case == "nodeproxy":
                log("nodeproxy: starting agents on node1 (CPU 0) and node2 (CPU 1)")
                self.nodeproxy_setup(pki)
            metrics, detail, cpu = result["metrics"], result["detail"], result[
                "proxy_cpu_percent"]
            for streams in (1, 4):
                res, cpu[f"tput{streams}"] = self.iperf(case, streams)
                metrics[f"tput{streams}_gbps"] = res["gbps"]
                detail[f"iperf_{streams}"] = res
                log(f"{case}: iperf3 {streams} stream(s): {res['gbps']:.2f} Gbit/s"
                    f"{_cpu_text(cpu[f'tput{streams}'])}")
            res, cpu["rr"] = self.rr(case)
            metrics["rr_p50_us"], metrics["rr_p99_us"] = res["p50_us"], res["p99_us"]
            detail["rr"] = res
            log(f"{case}: request/response p50 {res['p50_us']:.0f} us, "
                f"p99 {res['p99_us']:.0f} us{_cpu_text(cpu['rr'])}")
            res, cpu["cps"] = self.cps(case)
            metrics["cps"] = res["per_second"]
            detail["cps"] = res
            log(f"{case}: {res['per_second']:,.0f} connections/s "
                f"({res['errors']} errors){_cpu_text(cpu['cps'])}")
            if res["connections"] == 0:
                raise BenchError(f"no connection succeeded: {res['error_kinds']}")
            if case == "nodeproxy" and self.profile_dir is not None:
                result["profile"] = self.profile_agents(case)
            if case == "nodeproxy":
                opened = self.mesh_connections("node1")
                detail["mesh_connections_opened_node1"] = opened
                if opened <= 0:
                    raise BenchError("agent on node1 counted no connection: traffic was not "
                                     "captured (check the REDIRECT rules in pod A)")
            result["ok"] = True
        except BenchError as exc:
            result["error"] = str(exc)
            log(f"{case}: FAILED: {exc}")
            for p in self.proxies:
                result.setdefault("logs", {})[p.log_path.stem] = tail(p.log_path, 1500)
        finally:
            self.stop_proxies()
            result["seconds"] = round(time.monotonic() - started, 1)
        return result


def _cpu_text(cpu: dict[str, float]) -> str:
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
