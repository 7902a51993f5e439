"""Soak / load harness: hold many HBONE tunnels through two in-process agents, then release them.

    .venv/bin/python -m tests.bench.soak [--tunnels 10000] [--batch 500] [--json soak.json]
    .venv/bin/python -m tests.bench.soak --lab [--tunnels 10000] [--json soak.json]

Not a pytest test.  Two agents (node1, node2) run on loopback exactly like the integration
tests' ``running_mesh()`` (real TLS 1.3, real HTTP/2 CONNECT, real certificates), under uvloop,
with an echo server on the server pod IP 127.0.2.1.  Everything lives in one process, so the
harness first measures the same number of *direct* client <-> echo-server connections (no agent)
and reports agent-only figures as ``total - direct``.

Phases, each under its own deadline (a phase that overruns fails the run, exit status 1):

1. baseline: RSS (/proc/self/statm) and open FDs after a warm-up round trip;
2. direct: N client connections straight to the echo server, each echoes a few bytes; held;
   measured; closed; settled;
3. mesh: N tunnels from the client pod 127.0.1.1 through node1's outbound listener (the
   original destination injected like the tests do), opened ``--batch`` at a time, each echoes
   a few bytes so the tunnel is really up; held; measured;
4. release: every client connection closed; wait until both agents report no live connection,
   the echo server has no connection and FDs are back near the baseline (plus the idle pooled
   HBONE connections, which the pool keeps for its idle timeout); RSS after release;
5. idle pool closed (what the pool's idle reaper does later): FDs back at the baseline.

Before every memory figure the harness runs ``gc.collect()`` and glibc ``malloc_trim(0)`` so
freed heap is returned and the figures compare live memory.  Targets are printed, never
asserted.  Exit status: 0 when every phase finished in time, 1 when one failed or overran,
2 when the file-descriptor limit cannot fit the tunnels (4 per tunnel in this process).

Lab mode (``--lab``, what ``make soak`` runs; root only) holds the tunnels through a real
2-node lab mesh instead (meshlab: network namespaces, one ``nodeproxy run`` agent
*process* per node with real iptables capture in each pod netns, a CA service process).  A
server app in node2's pod n2p1 accepts and holds connections; a client app in node1's pod n1p1
opens ``--tunnels`` connections to the server pod IP, ``--batch`` at a time (captured by the
pod's rules, tunnelled over HBONE by both agents), sends a hello on each and reads the reply,
holds them, then closes them all (tests/bench/soak_apps.py; each raises its soft
RLIMIT_NOFILE to the hard limit).  Every process holds ~1 descriptor per tunnel, so 10,000
tunnels fit under this machine's hard limit of 20,000.  The harness measures each agent
process (VmRSS from /proc/PID/status, descriptors in /proc/PID/fd, /proc/PID/smaps split
into heap / other anonymous / file-backed) when ready, at the baseline (after a 10-tunnel
warm-up: certificates issued, one pooled HBONE connection, code paths imported), with the
tunnels held, and after release (no proxied connection left per the agents' metrics, the
server holds nothing, each agent's descriptors back at the baseline plus its extra pooled
HBONE connections, which the pool keeps for its idle timeout).  Another process's heap cannot
be trimmed, so the lab's "after release" RSS is what glibc kept (no ``malloc_trim``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from meshlab import Cluster, ClusterSpec, PodRole, plan_cluster, random_prefix, render_config
from meshlab.build import is_lab_netns, list_netns
from meshlab.mesh import Mesh as LabMesh
from meshlab.topology import LabError
from nodeproxy.proxy.limits import Limits
from tests.integration.test_agent_loopback import CONFIG, Mesh, running_mesh
from tests.netns.mesh_fixtures import destroy_cluster, metric_value

CLIENT_IP = "127.0.1.1"  # the "client" pod on node1
SERVER_IP = "127.0.2.1"  # the "server" pod on node2
TARGET_MB_PER_1000 = 12.0  # agent-only RSS growth per 1,000 held tunnels
FD_MARGIN = 32
FD_RESERVE = 1024  # pooled HBONE connections (2 FDs per 100 tunnels), listeners, stdio
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in the socket module
CLONE_NEWNET = 0x40000000


class PhaseTimeout(Exception):
    pass


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


_libc: Any = None


def rss_bytes(trim: bool = True) -> int:
    """Resident set size; with ``trim``, after a full GC and glibc malloc_trim(0)."""
    global _libc
    if trim:
        gc.collect()
        if _libc is None:
            with contextlib.suppress(OSError):
                _libc = ctypes.CDLL("libc.so.6")
        if _libc is not None:
            _libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mib(n: float) -> float:
    return n / (1024 * 1024)


async def poll(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> float:
    """Wait until ``check()``; returns the seconds it took, raises PhaseTimeout at the deadline."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise PhaseTimeout(what())
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def private_netns() -> bool:
    """Move this (still single-threaded) process into a new network namespace with only ``lo``
    up, so the loopback ports 15001/15006/15008 of the pod IPs cannot collide with other agents
    or test runs on the host.  Needs root; False when not possible."""
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    import subprocess

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    return True


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to ``needed``: the hard limit too when the process may (root with
    CAP_SYS_RESOURCE), else only the soft limit up to the hard one.  Returns the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE (e.g. a container): stay below
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port(host: str) -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EchoCounter:
    """A protocol-level echo server (cheap and identical in both phases) that counts."""

    open: int = 0
    accepted: int = 0
    transports: set[asyncio.Transport] = field(default_factory=set)

    def factory(self) -> asyncio.Protocol:
        counter = self

        class Echo(asyncio.Protocol):
            transport: Any = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                counter.open += 1
                counter.accepted += 1
                counter.transports.add(transport)  # type: ignore[arg-type]

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)

            def eof_received(self) -> bool:
                return False  # close

            def connection_lost(self, exc: Exception | None) -> None:
                counter.open -= 1
                counter.transports.discard(self.transport)

        return Echo()


async def direct_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The same client as ``Mesh.connect_via`` (bound to the client pod IP, stream pair), but
    straight to the echo server."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((CLIENT_IP, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (SERVER_IP, port))
    return await asyncio.open_connection(sock=sock)


Opener = Callable[[], Any]


async def open_many(opener: Opener, count: int, batch: int, deadline: float, label: str,
                    on_up: Callable[[asyncio.StreamWriter], None] | None = None,
                    ) -> list[asyncio.StreamWriter]:
    """Open ``count`` connections, ``batch`` at a time; each echoes a short payload."""
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> asyncio.StreamWriter:
        reader: asyncio.StreamReader
        writer: asyncio.StreamWriter
        reader, writer = await opener()
        try:
            payload = f"soak-{i:06d}".encode()
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            if echoed.lower() != payload:
                raise RuntimeError(f"connection {i}: echoed {echoed!r}, sent {payload!r}")
            if on_up is not None:
                on_up(writer)
        except BaseException:
            writer.close()
            raise
        return writer

    start = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            for first in range(0, count, batch):
                results = await asyncio.gather(
                    *(one(i) for i in range(first, min(count, first + batch))),
                    return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                writers.extend(r for r in results if isinstance(r, asyncio.StreamWriter))
                if errors:
                    raise RuntimeError(f"{label}: {len(errors)} of batch at {first} failed, "
                                       f"first: {errors[0]!r}")
                if (first // batch) % 4 == 3:
                    log(f"{label}: {len(writers)}/{count} open "
                        f"({time.monotonic() - start:.1f} s, {open_fds()} fds)")
    except TimeoutError:
        for w in writers:
            w.close()
        raise PhaseTimeout(f"{label}: only {len(writers)} of {count} open after {deadline} s") \
            from None
    except BaseException:
        for w in writers:
            w.close()
        raise
    return writers


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    writers.clear()


def pool_connections(mesh: Mesh) -> int:
    total = 0
    for app in mesh.apps.values():
        for pod in list(app.agent.pods.values()):
            pool = getattr(pod, "pool", None)
            if pool is not None:
                total += int(pool.stats()["connections"])
    return total


def live_connections(mesh: Mesh) -> int:
    return sum(len(app.connections()) for app in mesh.apps.values())


async def close_idle_pools(mesh: Mesh) -> None:
    for app in mesh.apps.values():
        for pod in list(app.agent.pods.values()):
            pool = getattr(pod, "pool", None)
            if pool is not None:
                await pool.aclose(timeout=5.0)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    n, batch = args.tunnels, args.batch
    limit = raise_nofile(4 * n + FD_RESERVE)
    if limit[0] < 4 * n + FD_RESERVE:
        raise SetupError(
            f"{n} tunnels need {4 * n + FD_RESERVE} file descriptors in this one process (4 per "
            f"tunnel: client, node1 downstream, node2 upstream, echo server, plus "
            f"{FD_RESERVE} for pooled HBONE connections and the agents) but RLIMIT_NOFILE "
            f"stays at {limit[0]} (hard limit; raising it needs CAP_SYS_RESOURCE): at most "
            f"--tunnels {(limit[0] - FD_RESERVE) // 4} here")
    log(f"{n} tunnels, batches of {batch}; RLIMIT_NOFILE {limit[0]}; loop "
        f"{type(asyncio.get_running_loop()).__module__}")
    results: dict[str, Any] = {"tunnels": n, "batch": batch, "nofile": limit[0],
                               "target_agent_mb_per_1000": TARGET_MB_PER_1000}
    port = free_port(SERVER_IP)
    echo = EchoCounter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(echo.factory, SERVER_IP, port, backlog=4096)
    limits = Limits(max_connections_per_pod=n + 1024)
    try:
        with tempfile.TemporaryDirectory(prefix="np-soak-") as tmp:
            async with running_mesh(Path(tmp), CONFIG, (), port, limits=limits) as mesh:
                await soak_phases(mesh, port, echo, n, batch, args.deadline, results)
    finally:
        server.close()
        for t in list(echo.transports):
            t.abort()
        await server.wait_closed()
    return results


async def soak_phases(mesh: Mesh, port: int, echo: EchoCounter, n: int, batch: int,
                      deadline: float, results: dict[str, Any]) -> None:
    async def tunnel() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await mesh.connect_via(CLIENT_IP, (SERVER_IP, port))

    def tunnel_up(writer: asyncio.StreamWriter) -> None:
        # The echo came back, so the agent has read the injected original destination: drop
        # the entry so the harness's own table does not count as agent memory.
        mesh.targets.pop(writer.get_extra_info("sockname")[:2], None)

    # warm-up: certificates issued, one pooled connection, every code path imported
    close_all(await open_many(tunnel, 10, 10, 30, "warm-up", tunnel_up))
    await poll(lambda: live_connections(mesh) == 0 and echo.open == 0, 30,
               lambda: f"warm-up: {live_connections(mesh)} live, {echo.open} echo")
    await close_idle_pools(mesh)
    await poll(lambda: pool_connections(mesh) == 0, 10, lambda: "warm-up pool not closed")
    await asyncio.sleep(0.2)
    fds0, rss0 = open_fds(), rss_bytes()
    results["baseline"] = {"fds": fds0, "rss_mib": round(mib(rss0), 1)}
    log(f"baseline: {fds0} fds, RSS {mib(rss0):.1f} MiB")

    # -- direct connections (client + echo server cost, no agent) --------------------------
    t0 = time.monotonic()
    writers = await open_many(lambda: direct_connect(port), n, batch, deadline, "direct")
    open_s = time.monotonic() - t0
    fds_d, rss_d = open_fds(), rss_bytes()
    log(f"direct: {n} open in {open_s:.1f} s: {fds_d} fds, RSS +{mib(rss_d - rss0):.1f} MiB")
    t0 = time.monotonic()
    close_all(writers)
    await poll(lambda: echo.open == 0 and open_fds() <= fds0 + FD_MARGIN, deadline,
               lambda: f"direct release: echo {echo.open} open, {open_fds()} fds "
                       f"(baseline {fds0})")
    release_s = time.monotonic() - t0
    fds1, rss1 = open_fds(), rss_bytes()
    results["direct"] = {
        "open_s": round(open_s, 2), "release_s": round(release_s, 2),
        "held_fds": fds_d, "held_rss_delta_mib": round(mib(rss_d - rss0), 2),
        "mib_per_1000": round(mib(rss_d - rss0) * 1000 / n, 2),
        "released_fds": fds1, "released_rss_delta_mib": round(mib(rss1 - rss0), 2),
    }
    log(f"direct released in {release_s:.1f} s: {fds1} fds, RSS {mib(rss1 - rss0):+.1f} MiB")

    # -- mesh tunnels --------------------------------------------------------------------------
    t0 = time.monotonic()
    writers = await open_many(tunnel, n, batch, deadline, "mesh", tunnel_up)
    open_s = time.monotonic() - t0
    live = live_connections(mesh)
    pooled = pool_connections(mesh)
    fds_m, rss_m = open_fds(), rss_bytes()
    log(f"mesh: {n} tunnels in {open_s:.1f} s: {fds_m} fds, RSS +{mib(rss_m - rss0):.1f} MiB, "
        f"{live} live agent connections, {pooled} pooled HBONE connections, "
        f"{echo.open} upstreams at the echo server")
    # Conservative: relative to the baseline before the direct phase, so memory the direct
    # phase left behind counts against the agents, never in their favour.
    total_per_1000 = mib(rss_m - rss0) * 1000 / n
    direct_per_1000 = results["direct"]["mib_per_1000"]
    results["mesh"] = {
        "open_s": round(open_s, 2), "held_fds": fds_m,
        "fds_per_tunnel": round((fds_m - fds0) / n, 2),
        "live_agent_connections": live, "pooled_hbone_connections": pooled,
        "echo_upstreams_open": echo.open,
        "held_rss_delta_mib": round(mib(rss_m - rss0), 2),
        "held_rss_delta_vs_pre_mesh_mib": round(mib(rss_m - rss1), 2),
        "total_mib_per_1000": round(total_per_1000, 2),
        "agent_mib_per_1000": round(total_per_1000 - direct_per_1000, 2),
    }

    # -- release -------------------------------------------------------------------------------
    t0 = time.monotonic()
    close_all(writers)

    def released() -> bool:
        return (live_connections(mesh) == 0 and echo.open == 0
                and open_fds() <= fds0 + 2 * pool_connections(mesh) + FD_MARGIN)

    await poll(released, deadline,
               lambda: f"release: {live_connections(mesh)} live agent connections, "
                       f"{echo.open} echo upstreams, {open_fds()} fds (baseline {fds0}, "
                       f"{pool_connections(mesh)} pooled)")
    release_s = time.monotonic() - t0
    rss_raw = rss_bytes(trim=False)
    fds_r, rss_r = open_fds(), rss_bytes()
    pooled_idle = pool_connections(mesh)
    log(f"released in {release_s:.1f} s: {fds_r} fds ({pooled_idle} idle pooled HBONE "
        f"connections), RSS {mib(rss_r - rss0):+.1f} MiB vs baseline "
        f"(untrimmed {mib(rss_raw - rss0):+.1f})")
    t0 = time.monotonic()
    await close_idle_pools(mesh)
    await poll(lambda: pool_connections(mesh) == 0 and open_fds() <= fds0 + FD_MARGIN, 30,
               lambda: f"idle pool close: {open_fds()} fds (baseline {fds0})")
    pool_s = time.monotonic() - t0
    fds_p, rss_p = open_fds(), rss_bytes()
    log(f"idle pool closed in {pool_s:.1f} s: {fds_p} fds, RSS {mib(rss_p - rss0):+.1f} MiB")
    results["release"] = {
        "release_s": round(release_s, 2), "fds": fds_r, "fds_over_baseline": fds_r - fds0,
        "idle_pooled_hbone_connections": pooled_idle,
        "rss_delta_mib": round(mib(rss_r - rss0), 2),
        "rss_delta_untrimmed_mib": round(mib(rss_raw - rss0), 2),
        "rss_delta_vs_pre_mesh_mib": round(mib(rss_r - rss1), 2),
        "after_pool_close": {"seconds": round(pool_s, 2), "fds": fds_p,
                             "fds_over_baseline": fds_p - fds0,
                             "rss_delta_mib": round(mib(rss_p - rss0), 2)},
    }


def table(r: dict[str, Any]) -> str:
    d, m, rel = r["direct"], r["mesh"], r["release"]
    n = r["tunnels"]
    verdict = "ok" if m["agent_mib_per_1000"] <= TARGET_MB_PER_1000 else "OVER"
    rows = [
        ("tunnels held", f"{n:,}", ""),
        ("open time (mesh / direct)", f"{m['open_s']:.1f} s", f"{d['open_s']:.1f} s"),
        ("FDs held over baseline", f"{m['held_fds'] - r['baseline']['fds']:,}",
         f"{d['held_fds'] - r['baseline']['fds']:,}"),
        ("RSS growth held", f"{m['held_rss_delta_mib']:.1f} MiB",
         f"{d['held_rss_delta_mib']:.1f} MiB"),
        ("RSS per 1,000: total / direct", f"{m['total_mib_per_1000']:.2f} MiB",
         f"{d['mib_per_1000']:.2f} MiB"),
        ("RSS per 1,000: agent-only", f"{m['agent_mib_per_1000']:.2f} MiB",
         f"target <= {TARGET_MB_PER_1000:.0f} ({verdict})"),
        ("release time (mesh / direct)", f"{rel['release_s']:.1f} s", f"{d['release_s']:.1f} s"),
        ("FDs after release over baseline", f"{rel['fds_over_baseline']}",
         f"{rel['idle_pooled_hbone_connections']} idle pooled HBONE conns"),
        ("RSS after release vs baseline", f"{rel['rss_delta_mib']:+.1f} MiB",
         f"untrimmed {rel['rss_delta_untrimmed_mib']:+.1f} MiB"),
        ("after idle pool closed: FDs / RSS",
         f"+{rel['after_pool_close']['fds_over_baseline']}",
         f"{rel['after_pool_close']['rss_delta_mib']:+.1f} MiB"),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


# -- lab mode: a real 2-node mesh, one agent process per node ----------------------------------

LAB_SERVER_PORT = 9090
LAB_APPS = Path(__file__).with_name("soak_apps.py")
LAB_ROLES = {"n1p1": PodRole("default", "client"), "n2p1": PodRole("default", "server")}
LAB_FD_MARGIN = 16  # metrics scrapes, log files, timers: an agent's count moves a little


class LabApp:
    """A soak_apps.py process in a pod netns: one command line in, JSON lines out (read by a
    thread into a queue, so waiting has a deadline)."""

    def __init__(self, cluster: Cluster, netns: str, argv: list[str], log_path: Path) -> None:
        self.name = netns
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc: subprocess.Popen[str] = cluster.popen(
            netns, [sys.executable, str(LAB_APPS), *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name=f"soak-{netns}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float, what: str) -> dict[str, Any]:
        """The next JSON line; PhaseTimeout after ``timeout`` s, RuntimeError if it exited."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise PhaseTimeout(f"{what}: no answer from the app in {self.name} after "
                               f"{timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{what}: the app in {self.name} exited with "
                               f"{self.proc.wait()}")
        return dict(json.loads(line))

    def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout, command)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


def proc_memory(pid: int) -> dict[str, Any]:
    """VmRSS / VmHWM (/proc/PID/status), descriptors (/proc/PID/fd) and the resident memory
    split by mapping kind (/proc/PID/smaps): [heap], other anonymous, file-backed.  KiB."""
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                status[key] = int(value.split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    kinds = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if "-" in first[0] and not first[0].endswith(":"):  # a mapping header
                path = first[5].strip() if len(first) > 5 else ""
                kind = ("heap" if path == "[heap]" else
                        "anon" if not path or path.startswith("[") else "file")
            elif first[0] == "Rss:":
                kinds[kind] += int(first[1])
    return {"rss_kib": status["VmRSS"], "hwm_kib": status["VmHWM"],
            "rss_anon_kib": status.get("RssAnon", 0), "rss_file_kib": status.get("RssFile", 0),
            "threads": status.get("Threads", 0), "fds": fds,
            "heap_kib": kinds["heap"], "other_anon_kib": kinds["anon"],
            "file_kib": kinds["file"]}


def agent_pid(mesh: LabMesh, node: str) -> int:
    """The agent's PID, checked: ``ip netns exec`` execs the command, so the Popen PID is the
    ``python -m cli.main ... run --node NODE`` process itself."""
    pid = mesh.agents[node].pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    if "cli.main" not in argv or "run" not in argv or node not in argv:
        raise SetupError(f"PID {pid} of {node} is not its agent: {' '.join(argv)}")
    return pid


def agent_metrics(mesh: LabMesh, node: str) -> dict[str, int]:
    text = mesh.metrics(node)
    return {"open_connections": int(metric_value(text, "nodeproxy_open_connections")),
            "pool_connections": int(metric_value(text, "nodeproxy_pool_connections")),
            "pool_streams": int(metric_value(text, "nodeproxy_pool_streams"))}


def wait_for(check: Callable[[], bool], timeout: float, what: Callable[[], str],
             interval: float = 0.1) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise PhaseTimeout(what())
        time.sleep(interval)
    return time.monotonic() - start


def kib_to_mib(n: float) -> float:
    return round(n / 1024, 1)


def lab_soak(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SetupError("--lab builds network namespaces: run as root")
    n, batch, deadline = args.tunnels, args.batch, args.deadline
    nofile = raise_nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # agents inherit it
    if nofile[0] < n + FD_RESERVE:
        raise SetupError(f"{n} tunnels need about {n + FD_RESERVE} descriptors per process "
                         f"(agents, client, server) but RLIMIT_NOFILE is {nofile[0]}")
    plan = plan_cluster(ClusterSpec(random_prefix("soak"), nodes=2,
                                    pods_per_node=args.pods_per_node))
    log(f"lab: {n} tunnels, batches of {batch}; cluster {plan.prefix} (2 nodes x "
        f"{args.pods_per_node} pods, iptables); RLIMIT_NOFILE {nofile[0]}")
    results: dict[str, Any] = {
        "mode": "lab", "tunnels": n, "batch": batch, "nofile": nofile[0],
        "pods_per_node": args.pods_per_node, "target_agent_mb_per_1000": TARGET_MB_PER_1000,
        "max_conns_per_pod": max(30_000, n + 1024)}
    started = time.monotonic()
    cluster = Cluster.create(plan)
    apps: list[LabApp] = []
    mesh: LabMesh | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="np-soak-lab-") as tmp:
            workdir = Path(tmp)
            mesh = LabMesh(cluster, workdir, backend="iptables", extra_agent_args=(
                "--max-conns-per-pod", str(results["max_conns_per_pod"])))
            try:
                mesh.start(render_config(plan, LAB_ROLES), wait=60)
                results["mesh_up_s"] = round(time.monotonic() - started, 1)
                lab_phases(cluster, mesh, apps, workdir, results, n, batch, deadline,
                           args.rounds, args.settle)
            except BaseException:
                for node in list(mesh.agents):
                    print(mesh.log_tail(node, 15), file=sys.stderr)
                for app in apps:
                    log_path = workdir / f"app-{app.name}.log"
                    with contextlib.suppress(OSError):
                        print(f"--- {log_path.name} ---\n{log_path.read_text()[-1500:]}",
                              file=sys.stderr)
                raise
            finally:
                for app in apps:
                    app.close()
                mesh.stop()
    finally:
        destroy_cluster(cluster)
        left = [name for name in list_netns() if is_lab_netns(name, plan.prefix)]
        results["netns_left_behind"] = left
        if left:
            log(f"WARNING: network namespaces left behind: {left}")
    return results


def lab_phases(cluster: Cluster, mesh: LabMesh, apps: list[LabApp], workdir: Path,
               results: dict[str, Any], n: int, batch: int, deadline: float,
               rounds_wanted: int = 1, settle: float = 0.0) -> None:
    nodes = ("node1", "node2")
    pids = {node: agent_pid(mesh, node) for node in nodes}
    server_ip = cluster.pod("n2p1").ip
    agents: dict[str, dict[str, Any]] = {
        node: {"pid": pids[node], "ready": proc_memory(pids[node])} for node in nodes}
    results["agents"] = agents
    log("mesh ready: " + ", ".join(
        f"{node} agent PID {pids[node]} RSS {kib_to_mib(agents[node]['ready']['rss_kib'])} MiB "
        f"{agents[node]['ready']['fds']} fds" for node in nodes))

    server = LabApp(cluster, "n2p1", ["server", "--port", str(LAB_SERVER_PORT)],
                    workdir / "app-n2p1.log")
    apps.append(server)
    hello = server.read(15, "server start")
    if "listening" not in hello:
        raise RuntimeError(f"server: {hello}")
    client = LabApp(cluster, "n1p1", ["client", "--connect", f"{server_ip}:{LAB_SERVER_PORT}"],
                    workdir / "app-n1p1.log")
    apps.append(client)
    hello_c = client.read(15, "client start")
    results["apps"] = {"server_pid": server.pid, "client_pid": client.pid,
                       "server_nofile": hello["nofile"], "client_nofile": hello_c["nofile"],
                       "server_addr": f"{server_ip}:{LAB_SERVER_PORT}"}

    def metrics() -> dict[str, dict[str, int]]:
        return {node: agent_metrics(mesh, node) for node in nodes}

    def idle() -> bool:
        try:
            scraped = metrics()
        except LabError:  # a scrape timed out: the agent is busy closing 10,000 tunnels
            return False
        return all(m["open_connections"] == 0 for m in scraped.values()) \
            and server.ask("stats")["open"] == 0

    # warm-up: certificates issued, one pooled HBONE connection, code paths imported
    up = client.ask(f"open 10 10 {deadline}", deadline + 30)
    if "opened" not in up:
        raise RuntimeError(f"warm-up: {up}")
    client.ask("close", 90)
    wait_for(idle, 60, lambda: f"warm-up release: {metrics()}, server {server.ask('stats')}")
    time.sleep(2.0)
    m0 = metrics()
    for node in nodes:
        agents[node]["baseline"] = {**proc_memory(pids[node]), **m0[node]}
    log("baseline: " + ", ".join(
        f"{node} RSS {kib_to_mib(agents[node]['baseline']['rss_kib'])} MiB "
        f"{agents[node]['baseline']['fds']} fds" for node in nodes))

    def fds(node: str) -> int:
        return len(os.listdir(f"/proc/{pids[node]}/fd"))

    def one_round(k: int) -> dict[str, Any]:
        """Open ``n`` tunnels, hold, measure, close, wait for the release, measure."""
        out: dict[str, Any] = {"round": k}
        # -- open and hold
        client.send(f"open {n} {batch} {deadline}")
        while True:
            line = client.read(deadline + 30, "open")
            if "progress" not in line:
                break
            log(f"round {k} open: {line['progress']}/{n} ({line['s']:.1f} s, agent fds "
                f"{[fds(x) for x in nodes]})")
        if "opened" not in line or line["held"] != n:
            raise RuntimeError(f"open: {line}")
        out["open_s"] = round(line["s"], 2)
        srv = server.ask("stats")
        time.sleep(2.0)
        mh = metrics()
        out["held"] = {node: {**proc_memory(pids[node]), **mh[node]} for node in nodes}
        out["server_open"] = srv["open"]
        out["apps_held_memory"] = {"client": proc_memory(client.pid),
                                   "server": proc_memory(server.pid)}
        log(f"round {k} held: {n} tunnels open in {line['s']:.1f} s; server holds "
            f"{srv['open']}; " + ", ".join(
                f"{node} RSS {kib_to_mib(out['held'][node]['rss_kib'])} MiB "
                f"{out['held'][node]['fds']} fds, {mh[node]['open_connections']} proxied, "
                f"{mh[node]['pool_connections']} pooled" for node in nodes))
        if srv["open"] != n:
            raise RuntimeError(f"the server holds {srv['open']} connections, not {n}")
        # -- release
        t0 = time.monotonic()
        out["client_closed"] = client.ask("close", 90)
        out["client_close_s"] = round(time.monotonic() - t0, 2)
        pooled_extra = max(0, mh["node1"]["pool_connections"] - m0["node1"]["pool_connections"])

        def released() -> bool:
            return idle() and all(
                fds(node) <= agents[node]["baseline"]["fds"] + pooled_extra + LAB_FD_MARGIN
                for node in nodes)

        wait_for(released, deadline,
                 lambda: f"release: {metrics()}, server {server.ask('stats')}, agent fds "
                         f"{[fds(x) for x in nodes]} (baseline "
                         f"{[agents[x]['baseline']['fds'] for x in nodes]}, +{pooled_extra} "
                         f"pooled)", interval=0.2)
        out["release_s"] = round(time.monotonic() - t0, 2)
        time.sleep(2.0)
        mr = metrics()
        out["released"] = {node: {**proc_memory(pids[node]), **mr[node]} for node in nodes}
        log(f"round {k} released in {out['release_s']:.1f} s: " + ", ".join(
            f"{node} RSS {kib_to_mib(out['released'][node]['rss_kib'])} MiB "
            f"{out['released'][node]['fds']} fds, {mr[node]['pool_connections']} pooled"
            for node in nodes))
        return out

    rounds = [one_round(k) for k in range(1, rounds_wanted + 1)]
    first = rounds[0]
    for key in ("open_s", "release_s", "client_close_s", "client_closed", "server_open",
                "apps_held_memory"):
        results[key] = first[key]
    for node in nodes:
        agents[node]["held"] = first["held"][node]
        agents[node]["released"] = first["released"][node]
    results["rounds"] = [
        {"round": r["round"], "open_s": r["open_s"], "release_s": r["release_s"],
         **{node: {"held_rss_mib": kib_to_mib(r["held"][node]["rss_kib"]),
                   "released_rss_mib": kib_to_mib(r["released"][node]["rss_kib"]),
                   "released_fds": r["released"][node]["fds"]} for node in nodes}}
        for r in rounds]
    if settle > 0:
        log(f"waiting {settle:.0f} s (the pool's idle timeout reaps idle HBONE connections)")
        time.sleep(settle)
        ms = metrics()
        for node in nodes:
            agents[node]["settled"] = {**proc_memory(pids[node]), **ms[node],
                                       "after_s": settle}
        log(f"after {settle:.0f} s: " + ", ".join(
            f"{node} RSS {kib_to_mib(agents[node]['settled']['rss_kib'])} MiB "
            f"{agents[node]['settled']['fds']} fds, {ms[node]['pool_connections']} pooled"
            for node in nodes))

    for node in nodes:
        a = agents[node]
        b, h, r = a["baseline"], a["held"], a["released"]
        a["mib_per_1000"] = round((h["rss_kib"] - b["rss_kib"]) / 1024 * 1000 / n, 2)
        a["fds_per_tunnel"] = round((h["fds"] - b["fds"]) / n, 3)
        a["held_rss_delta_mib"] = kib_to_mib(h["rss_kib"] - b["rss_kib"])
        a["held_delta_by_kind_mib"] = {k: kib_to_mib(h[k] - b[k])
                                       for k in ("heap_kib", "other_anon_kib", "file_kib")}
        a["released_rss_delta_mib"] = kib_to_mib(r["rss_kib"] - b["rss_kib"])
        a["released_fds_over_baseline"] = r["fds"] - b["fds"]
        a["ok"] = a["mib_per_1000"] <= TARGET_MB_PER_1000
        if "settled" in a:
            a["settled_rss_delta_mib"] = kib_to_mib(a["settled"]["rss_kib"] - b["rss_kib"])


def lab_table(r: dict[str, Any]) -> str:
    a1, a2 = r["agents"]["node1"], r["agents"]["node2"]

    def both(f: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        return f(a1), f(a2)

    def mib_of(phase: str) -> Callable[[dict[str, Any]], str]:
        return lambda a: f"{a[phase]['rss_kib'] / 1024:.1f} MiB"

    rows: list[tuple[str, str, str]] = [
        ("agent (PID)", f"node1 ({a1['pid']})", f"node2 ({a2['pid']})"),
        ("RSS ready (no warm-up)", *both(mib_of("ready"))),
        ("RSS baseline (after warm-up)", *both(mib_of("baseline"))),
        (f"RSS with {r['tunnels']:,} tunnels", *both(mib_of("held"))),
        ("RSS growth per 1,000 tunnels",
         *both(lambda a: f"{a['mib_per_1000']:.2f} MiB "
                         f"({'ok' if a['ok'] else 'OVER'} <= {TARGET_MB_PER_1000:.0f})")),
        ("  of it heap / anon / file (MiB)", *both(
            lambda a: "{heap_kib:+.1f} / {other_anon_kib:+.1f} / {file_kib:+.1f}".format(
                **a["held_delta_by_kind_mib"]))),
        ("RSS after release", *both(lambda a: f"{a['released']['rss_kib'] / 1024:.1f} MiB "
                                              f"({a['released_rss_delta_mib']:+.1f})")),
        ("FDs baseline / held / released", *both(
            lambda a: f"{a['baseline']['fds']} / {a['held']['fds']:,} / {a['released']['fds']}")),
        ("FDs per tunnel", *both(lambda a: f"{a['fds_per_tunnel']:.3f}")),
        ("pooled HBONE conns held / released", *both(
            lambda a: f"{a['held']['pool_connections']} / {a['released']['pool_connections']}")),
        ("proxied connections held", *both(lambda a: f"{a['held']['open_connections']:,}")),
        ("open time (client: hello + reply)", f"{r['open_s']:.1f} s", ""),
        ("release time (FDs back near baseline)", f"{r['release_s']:.1f} s",
         f"client close {r['client_close_s']:.1f} s"),
    ]
    for rnd in r["rounds"][1:]:
        held_rel = [f"{rnd[x]['held_rss_mib']:.1f} / {rnd[x]['released_rss_mib']:.1f} MiB"
                    for x in ("node1", "node2")]
        rows.append((f"round {rnd['round']}: RSS held / released", held_rel[0], held_rel[1]))
    if "settled" in a1:
        rows.append((f"after {a1['settled']['after_s']:.0f} s more: RSS / FDs / pooled", *both(
            lambda a: f"{a['settled']['rss_kib'] / 1024:.1f} MiB "
                      f"({a['settled_rss_delta_mib']:+.1f}) / {a['settled']['fds']} / "
                      f"{a['settled']['pool_connections']}")))
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tunnels", type=int, default=10_000, help="tunnels to hold (10000)")
    ap.add_argument("--batch", type=int, default=500, help="tunnels opened at once (500)")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="seconds each open/release phase may take (300)")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--no-netns", action="store_true",
                    help="stay in the current network namespace (default as root: a private "
                         "one with only lo, so other agents on the host cannot interfere)")
    ap.add_argument("--lab", action="store_true",
                    help="a real 2-node lab mesh: one agent process per node, iptables "
                         "capture, client and server apps in pod netns (root)")
    ap.add_argument("--pods-per-node", type=int, default=1, choices=(1, 2),
                    help="lab pods per node (1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="lab: open/hold/release rounds; the figures are the first round's, "
                         "later rounds show whether released memory is reused (1)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="lab: seconds to wait after the last release, then measure again "
                         "(> the pool's 300 s idle timeout: idle HBONE connections reaped)")
    args = ap.parse_args(argv)
    if args.tunnels < 1 or args.batch < 1 or args.rounds < 1:
        ap.error("--tunnels, --batch and --rounds must be positive")
    if args.lab:
        return lab_main(args)
    netns = False if args.no_netns else private_netns()
    log("private network namespace" if netns else "host network namespace")
    started = time.monotonic()
    try:
        results = uvloop.run(soak(args))
    except SetupError as exc:
        log(f"SETUP ERROR: {exc}")
        return 2
    except (PhaseTimeout, RuntimeError, OSError) as exc:
        log(f"FAILED: {exc}")
        return 1
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["private_netns"] = netns
    results["python"] = sys.version.split()[0]
    results["uvloop"] = getattr(uvloop, "__version__", "?")
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


def lab_main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        results = lab_soak(args)
    except SetupError as exc:
        log(f"SETUP ERROR: {exc}")
        return 2
    except (PhaseTimeout, RuntimeError, OSError, LabError) as exc:
        log(f"FAILED: {exc}")
        return 1
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["python"] = sys.version.split()[0]
    results["uvloop"] = getattr(uvloop, "__version__", "?")
    print()
    print(lab_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if results["netns_left_behind"] else 0


if __name__ == "__main__":
    sys.exit(main())
