"""Soak / load harness: hold many HBONE tunnels through two in-process agents, then release them.

    .venv/bin/python -m tests.bench.soak [--tunnels 10000] [--batch 500] [--json soak.json]

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from nodeproxy.proxy.limits import Limits
from tests.integration.test_agent_loopback import CONFIG, Mesh, running_mesh

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
    args = ap.parse_args(argv)
    if args.tunnels < 1 or args.batch < 1:
        ap.error("--tunnels and --batch must be positive")
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


if __name__ == "__main__":
    sys.exit(main())
