"""Before/after figures for the abuse-resistance work (docs/abuse-figures.md).

Standalone on purpose: it runs against any tree that has ``running_mesh(tmp_path, config_text,
server_ips, app_port, admin=None)`` in tests/integration/test_agent_loopback.py, AgentApp and
AgentOptions, i.e. both the tree before the fixes (21b73e5) and the current one:

    cd <tree> && PYTHONPATH=<tree> /work/main/.venv/bin/python \\
        /work/main/tests/bench/abuse_figures.py --json /tmp/<label>.json
    .venv/bin/python tests/bench/abuse_figures.py --table /tmp/before.json /tmp/after.json \\
        --out docs/abuse-figures.md

Each measurement runs in its own child process (same interpreter, same PYTHONPATH) under a
deadline, so an old tree that loops or runs out of descriptors cannot hang the run or spoil the
next figure; all of them run on uvloop, in a private network namespace (root) so other agents
on the host cannot collide with the pod IPs' ports.  The hostile HTTP/2 peer is built on the
independent ``h2`` package with a real workload certificate for
spiffe://cluster.local/ns/default/sa/client signed by the mesh's CA directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import inspect
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import uvloop
from cryptography.hazmat.primitives import serialization

SERVER_IP = "127.0.2.1"  # the "server" pod on node2
CLIENT_IP = "127.0.1.1"  # the "client" pod on node1
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
CLONE_NEWNET = 0x40000000
CHILD_DEADLINE = 150.0  # seconds one measurement may take, teardown included
ITEMS = {
    1: "rapid reset: 20,000 HEADERS+RST_STREAM on one connection",
    2: "leak: 1,000 CONNECT streams answered 200, then RST_STREAM all + GOAWAY + close",
    3: "stalled handshakes: 2,000 TCP connections to :15008 that never send a ClientHello",
    4: "PING flood: 500,000 PINGs from a client that never reads",
    5: "self loop: HBONE CONNECT to 127.0.2.1:15006 (RLIMIT_NOFILE 4096)",
}


# -- process measurements --------------------------------------------------------------------

_reserve: list[int] = []  # one descriptor kept back so counting works at the FD limit


def open_fds() -> int:
    """Open descriptors of this process (the reserve one included)."""
    if not _reserve:
        _reserve.append(os.open("/dev/null", os.O_RDONLY))
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own descriptor
    except OSError:  # EMFILE: at the limit; count with the reserve's slot
        os.close(_reserve.pop())
        try:
            return len(os.listdir("/proc/self/fd"))  # listdir's own stands in for the reserve
        finally:
            with contextlib.suppress(OSError):
                _reserve.append(os.open("/dev/null", os.O_RDONLY))


def rss_bytes(trim: bool = False) -> int:
    """Resident set size; with ``trim`` after a full GC and glibc malloc_trim(0)."""
    if trim:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mib(n: float) -> float:
    return round(n / (1024 * 1024), 1)


class Sampler:
    """Peak FDs and RSS, sampled every 50 ms while running."""

    def __init__(self) -> None:
        self.peak_fds = open_fds()
        self.peak_rss = rss_bytes()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak_fds = max(self.peak_fds, open_fds())
                self.peak_rss = max(self.peak_rss, rss_bytes())
            await asyncio.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(OSError):
            self.peak_fds = max(self.peak_fds, open_fds())
            self.peak_rss = max(self.peak_rss, rss_bytes())


async def poll(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` held, or None at the deadline."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            if check():
                return round(time.monotonic() - start, 2)
        if time.monotonic() - start > timeout:
            return None
        await asyncio.sleep(0.05)


# -- the hostile peer (as tests/abuse/h2peer.py, which the old tree does not have) ------------

def workload_tls(ca_dir: Path, identity: str, workdir: Path) -> ssl.SSLContext:
    from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
    from ztunnel_cfg.spiffe import SpiffeId

    ca = CertificateAuthority.load(ca_dir)
    spiffe = SpiffeId.parse(identity)
    key, csr = new_key_and_csr(spiffe)
    issued = ca.sign_csr(csr, spiffe)
    cert_path, key_path = workdir / "peer.pem", workdir / "peer-key.pem"
    cert_path.write_bytes(issued.chain_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cadata=ca.trust_bundle_pem.decode())
    return ctx


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.goaway_code: int | None = None
        self.closed = False
        self.statuses: dict[int, int] = {}

    @classmethod
    async def connect(cls, ctx: ssl.SSLContext) -> Peer:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(SERVER_IP, 15008, ssl=ctx,
                                                           server_hostname="")
            peer = cls(reader, writer)
            await peer.flush()
        return peer

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def open_stream(self, authority: str) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        return sid

    def _note(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_code = int(event.error_code or 0)
        elif isinstance(event, h2.events.ResponseReceived):
            headers = {bytes(k): bytes(v) for k, v in event.headers or []}
            self.statuses[event.stream_id] = int(headers.get(b":status", b"0"))

    async def read_events(self, timeout: float, until: Callable[[], bool] | None = None) -> bool:
        """Process frames until the connection ends (True), ``until()`` holds or the timeout
        (False)."""
        try:
            async with asyncio.timeout(timeout):
                while until is None or not until():
                    data = await self.reader.read(65536)
                    if not data:
                        self.closed = True
                        return True
                    for event in self.h2.receive_data(data):
                        self._note(event)
                    with contextlib.suppress(ConnectionError):
                        await self.flush()
                return False
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            self.closed = True
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


GOAWAY_NAMES = {int(code): code.name for code in h2.errors.ErrorCodes}


# -- the lab ---------------------------------------------------------------------------------

@dataclass
class Echo:
    """An upstream echo server on the server pod that counts open and accepted connections."""

    open: int = 0
    accepted: int = 0
    transports: set[asyncio.Transport] = field(default_factory=set)

    def factory(self) -> asyncio.Protocol:
        echo = self

        class Proto(asyncio.Protocol):
            transport: Any = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                echo.open += 1
                echo.accepted += 1
                echo.transports.add(transport)  # type: ignore[arg-type]

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)

            def connection_lost(self, exc: Exception | None) -> None:
                echo.open -= 1
                echo.transports.discard(self.transport)

        return Proto()


@dataclass
class Lab:
    mesh: Any
    echo: Echo
    port: int
    tls: ssl.SSLContext

    async def good_client(self, timeout: float = 5.0) -> bool:
        """A well-behaved connection from the client pod through both agents echoes."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await self.mesh.connect_via(CLIENT_IP, (SERVER_IP, self.port))
                writer.write(b"still served")
                ok = bool(await reader.readexactly(12) == b"still served")
                writer.close()
                return ok
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return False


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((SERVER_IP, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def lab(tmp: Path, limits: dict[str, Any] | None = None) -> AsyncIterator[Lab]:
    from tests.integration.test_agent_loopback import CONFIG, running_mesh

    kwargs: dict[str, Any] = {}
    if limits is not None:  # only trees whose running_mesh takes limits
        from nodeproxy.proxy.limits import Limits
        kwargs["limits"] = Limits(**limits)
    echo = Echo()
    port = free_port()
    server = await asyncio.get_running_loop().create_server(echo.factory, SERVER_IP, port)
    try:
        async with running_mesh(tmp, CONFIG, (), port, **kwargs) as mesh:
            targets = mesh.targets

            def original_dst(sock: socket.socket) -> tuple[str, int]:
                # As SO_ORIGINAL_DST: the injected destination of a redirected connection,
                # else the socket's own local address (a connection nothing redirected).
                found = targets.get(sock.getpeername()[:2])
                return found if found is not None else sock.getsockname()[:2]

            for app in mesh.apps.values():
                app.env.original_dst = original_dst
            the_lab = Lab(mesh, echo, port, workload_tls(tmp / "ca", CLIENT_ID, tmp))
            if not await the_lab.good_client(10):
                raise RuntimeError("warm-up round trip through the mesh failed")
            await poll(lambda: echo.open == 0, 5)
            yield the_lab
    finally:
        for t in list(echo.transports):
            t.abort()
        server.close()


# -- the measurements ------------------------------------------------------------------------

async def rapid_reset(t: Lab) -> dict[str, Any]:
    fds0, rss0 = open_fds(), rss_bytes(trim=True)
    result: dict[str, Any] = {"baseline_fds": fds0}
    with Sampler() as s:
        peer = await Peer.connect(t.tls)
        sent = 0
        try:
            async with asyncio.timeout(60):
                with contextlib.suppress(ConnectionError):
                    for i in range(20_000):
                        sid = peer.open_stream(f"{SERVER_IP}:{t.port}")
                        peer.h2.reset_stream(sid)
                        sent += 1
                        if i % 200 == 199:
                            await peer.flush()
                    await peer.flush()
        except TimeoutError:
            result["send_timed_out"] = True
        result["pairs_sent"] = sent
        result["connection_ended"] = await peer.read_events(10)
        result["goaway"] = peer.goaway_code
        peer.close()
        result["settle_s"] = await poll(
            lambda: open_fds() <= fds0 + 12 and t.echo.open == 0, 20)
        result["settled_fds_over_baseline"] = open_fds() - fds0
    result["peak_fds_over_baseline"] = s.peak_fds - fds0
    result["upstream_dials"] = t.echo.accepted - 1  # minus the warm-up
    result["rss_before_mib"] = mib(rss0)
    result["rss_peak_mib"] = mib(s.peak_rss)
    result["rss_after_mib"] = mib(rss_bytes(trim=True))
    result["good_client_within_5s"] = await t.good_client(5)
    return result


async def leak(t: Lab) -> dict[str, Any]:
    fds0 = open_fds()
    peers: list[Peer] = []
    ok = 0
    per_conn = 200  # both trees advertise SETTINGS_MAX_CONCURRENT_STREAMS 200
    async with asyncio.timeout(60):
        for _ in range(1000 // per_conn):
            peer = await Peer.connect(t.tls)
            peers.append(peer)
            sids = [peer.open_stream(f"{SERVER_IP}:{t.port}") for _ in range(per_conn)]
            await peer.flush()
            def answered(p: Peer = peer) -> bool:
                return len(p.statuses) >= per_conn

            await peer.read_events(30, until=answered)
            ok += sum(1 for sid in sids if peer.statuses.get(sid) == 200)
    await poll(lambda: t.echo.open >= ok, 10)
    opened = t.echo.open
    for peer in peers:
        with contextlib.suppress(Exception):
            for sid in list(peer.statuses):
                peer.h2.reset_stream(sid)
            peer.h2.close_connection()
            await peer.flush()
        peer.writer.close()
    await asyncio.sleep(10)
    return {"answered_200": ok, "upstreams_open_before": opened,
            "upstreams_open_after_10s": t.echo.open, "fds_over_baseline_after_10s":
            open_fds() - fds0, "good_client_within_5s": await t.good_client(5)}


async def stalled_handshakes(t: Lab, count: int = 2000) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rss0, fds0 = rss_bytes(trim=True), open_fds()
    socks: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, (SERVER_IP, 15008))

    try:
        async with asyncio.timeout(60):
            for _ in range(0, count, 200):
                await asyncio.gather(*(one() for _ in range(200)))
        # The agent accepts them as fast as we connect; give it a moment to take them all.
        await poll(lambda: open_fds() >= fds0 + 2 * count, 3)
        await asyncio.sleep(1.0)
        rss1 = rss_bytes(trim=True)
        closed = 0
        for sock in socks:
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return {"connections": count, "closed_by_agent": closed,
                "agent_fds": open_fds() - fds0 - count,
                "rss_growth_mib": mib(rss1 - rss0),
                "rss_per_connection_kib": round((rss1 - rss0) / count / 1024, 1)}
    finally:
        for sock in socks:
            sock.close()


async def ping_flood(t: Lab, count: int = 500_000) -> dict[str, Any]:
    fds0, rss0 = open_fds(), rss_bytes(trim=True)
    result: dict[str, Any] = {}
    with Sampler() as s:
        peer = await Peer.connect(t.tls)
        sent = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            for i in range(count):
                peer.h2.ping(i.to_bytes(8, "big"))
                sent += 1
                if i % 1000 == 999:
                    peer.writer.write(peer.h2.data_to_send())
                    async with asyncio.timeout(2.0):
                        await peer.writer.drain()  # blocks once the agent stops reading
        result["pings_sent"] = sent
        await asyncio.sleep(0.5)
        result["rss_growth_before_reading_mib"] = mib(rss_bytes() - rss0)
        result["connection_closed"] = await peer.read_events(10)
        result["goaway"] = peer.goaway_code
        peer.close()
        result["settle_s"] = await poll(lambda: open_fds() <= fds0 + 12, 15)
    result["rss_peak_growth_mib"] = mib(s.peak_rss - rss0)
    result["rss_after_growth_mib"] = mib(rss_bytes(trim=True) - rss0)
    result["good_client_within_5s"] = await t.good_client(5)
    return result


async def self_loop(t: Lab) -> dict[str, Any]:
    fds0 = open_fds()
    result: dict[str, Any] = {"rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    with Sampler() as s:
        peer = await Peer.connect(t.tls)
        sid = peer.open_stream(f"{SERVER_IP}:15006")
        await peer.flush()
        ended = await peer.read_events(10, until=lambda: sid in peer.statuses)
        result["status"] = peer.statuses.get(sid)
        result["connection_ended"] = ended
        await asyncio.sleep(5)
        result["fds_over_baseline_5s_later"] = open_fds() - fds0
        peer.close()
    result["peak_fds"] = s.peak_fds
    result["upstream_dials"] = t.echo.accepted - 1
    return result


async def run_item(item: int, out: Path) -> None:
    if item == 5:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, soft), hard))
    limits: dict[str, Any] | None = None
    if item == 6:  # stalled handshakes again, with the pending-handshake limit out of the way
        limits = {"max_pending_handshakes": 2100, "handshake_timeout": 60.0}
    measure = {1: rapid_reset, 2: leak, 3: stalled_handshakes, 4: ping_flood, 5: self_loop,
               6: stalled_handshakes}[item]
    with tempfile.TemporaryDirectory(prefix="np-abuse-") as tmp:
        try:
            async with lab(Path(tmp), limits) as t:
                result = await measure(t)
                out.write_text(json.dumps(result))  # before teardown, which may hang
                async with asyncio.timeout(20):
                    await asyncio.sleep(0)  # the mesh context exits below, under the deadline
        except TimeoutError:
            if not out.exists():
                raise


# -- orchestration -----------------------------------------------------------------------------

def private_netns() -> bool:
    if os.geteuid() != 0:
        return False
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        return False
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    return True


def measure_tree(items: list[int], out: Path) -> dict[str, Any]:
    import nodeproxy

    tree = Path.cwd()
    rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    print(f"tree {tree} at {rev}; nodeproxy from {nodeproxy.__file__}", flush=True)
    netns = private_netns()
    results: dict[str, Any] = {"tree": str(tree), "commit": rev,
                               "nodeproxy": nodeproxy.__file__, "private_netns": netns,
                               "has_limits": "limits" in _running_mesh_params(), "items": {}}
    for item in items:
        if item == 6 and not results["has_limits"]:
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            item_out = Path(f.name)
        item_out.unlink()
        started = time.monotonic()
        print(f"  item {item}: {ITEMS.get(item, 'stalled handshakes, limit raised')} ...",
              flush=True)
        proc = subprocess.Popen([sys.executable, __file__, "--item", str(item), "--item-out",
                                 str(item_out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=CHILD_DEADLINE)
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            status = f"killed after {CHILD_DEADLINE:.0f} s"
        entry: dict[str, Any] = {"status": status,
                                 "seconds": round(time.monotonic() - started, 1)}
        if item_out.exists():
            entry["result"] = json.loads(item_out.read_text())
            item_out.unlink()
        else:
            entry["stderr_tail"] = err.strip().splitlines()[-3:]
        results["items"][str(item)] = entry
        print(f"    {status} in {entry['seconds']} s: {entry.get('result', entry)}", flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _running_mesh_params() -> list[str]:
    from tests.integration.test_agent_loopback import running_mesh

    fn = getattr(running_mesh, "__wrapped__", running_mesh)
    return list(inspect.signature(fn).parameters)


# -- the table ---------------------------------------------------------------------------------

def _goaway(code: int | None) -> str:
    return "none" if code is None else f"{GOAWAY_NAMES.get(code, '?')} ({code:#x})"


def _yes(flag: object) -> str:
    return "yes" if flag else "NO"


def cell(item: str, entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    r = entry.get("result")
    if r is None:
        return f"no result ({entry['status']})"
    if item == "1":
        return (f"GOAWAY {_goaway(r['goaway'])}; {r['upstream_dials']:,} upstream dials; FDs "
                f"+{r['peak_fds_over_baseline']:,} peak, +{r['settled_fds_over_baseline']:,} "
                f"settled; RSS {r['rss_before_mib']} / {r['rss_peak_mib']} / "
                f"{r['rss_after_mib']} MiB (before/peak/after); good client in 5 s: "
                f"{_yes(r['good_client_within_5s'])}")
    if item == "2":
        return (f"{r['answered_200']:,} answered 200; {r['upstreams_open_after_10s']:,} upstream "
                f"sockets still open after 10 s")
    if item in ("3", "6"):
        return (f"{r['rss_per_connection_kib']} KiB RSS per connection "
                f"(+{r['rss_growth_mib']} MiB); {r['closed_by_agent']:,} closed by the agent")
    if item == "4":
        return (f"{r['pings_sent']:,} PINGs written before a write blocked 2 s; RSS "
                f"+{r['rss_peak_growth_mib']} MiB peak, +{r['rss_after_growth_mib']} MiB after; "
                f"connection closed: {_yes(r['connection_closed'])} (GOAWAY "
                f"{_goaway(r['goaway'])})")
    if item == "5":
        status = r["status"] if r["status"] is not None else "no answer"
        return (f"HBONE status {status}; FDs +{r['fds_over_baseline_5s_later']:,} 5 s later "
                f"(peak {r['peak_fds']:,} of {r['rlimit_nofile']:,})")
    return json.dumps(r)


def render(before: dict[str, Any], after: dict[str, Any]) -> str:
    names = dict(ITEMS)
    names[6] = "stalled handshakes again, pending-handshake limit raised to 2,100 (new tree only)"
    lines = [f"| # | abuse | before ({before['commit']}) | after ({after['commit']}) |",
             "|---|---|---|---|"]
    for key in sorted(set(before["items"]) | set(after["items"]), key=int):
        lines.append(f"| {key} | {names[int(key)]} | {cell(key, before['items'].get(key))} | "
                     f"{cell(key, after['items'].get(key))} |")
    return "\n".join(lines)


DOC_HEAD = """\
# Abuse resistance: before and after

Figures for the closing note of the abuse-resistance work: the tree before the fixes (commit
{before}) against the tree after them (commit {after}), measured the same way on both by
`tests/bench/abuse_figures.py`.

How it was measured: one machine with 2 cores; two agents (node1, node2) and an upstream echo
server in one Python process on loopback, exactly as the loopback integration tests run them
(`running_mesh()`, real TLS 1.3, real HTTP/2 CONNECT, real certificates), on uvloop, in a
private network namespace. The hostile client is the independent `h2` package over TLS with a
workload certificate for `spiffe://cluster.local/ns/default/sa/client` signed by the mesh's CA
directory. Each item runs in its own child process under a deadline ({deadline:.0f} s), with the
agents' default limits. FDs and RSS are those of that whole process (agents, echo server and
hostile client together): FDs are counted in /proc/self/fd, RSS read from /proc/self/statm
(sampled every 50 ms for peaks; "before"/"after" after a GC and `malloc_trim(0)`). "Upstream
dials" are the connections the echo server accepted. Item 5 caps the process at RLIMIT_NOFILE
4096 so that a loop ends at the limit quickly; the agents' `original_dst` answers like
SO_ORIGINAL_DST for a connection nothing redirected (its own local address).

"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="abuse-figures.json", help="results of this tree")
    ap.add_argument("--items", default="1,2,3,4,5,6", help="which measurements (1-6)")
    ap.add_argument("--item", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--item-out", help=argparse.SUPPRESS)
    ap.add_argument("--table", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                    help="print the before/after table instead of measuring")
    ap.add_argument("--out", help="with --table: also write docs/abuse-figures.md here")
    args = ap.parse_args(argv)
    if args.table:
        before, after = (json.loads(Path(p).read_text()) for p in args.table)
        table = render(before, after)
        print(table)
        if args.out:
            Path(args.out).write_text(DOC_HEAD.format(before=before["commit"],
                                                      after=after["commit"],
                                                      deadline=CHILD_DEADLINE) + table + "\n")
        return 0
    if args.item is not None:
        uvloop.run(run_item(args.item, Path(args.item_out)))
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: an old tree may leave threads or loops behind
    measure_tree([int(i) for i in args.items.split(",")], Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
