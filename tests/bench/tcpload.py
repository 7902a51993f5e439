"""Tiny TCP load programs for the benchmark, run inside the lab's pod namespaces.

    python tests/bench/tcpload.py server --port 8080
    python tests/bench/tcpload.py rr  --connect IP:PORT [--size 100] [--count 2000] [--warmup 200]
    python tests/bench/tcpload.py cps --connect IP:PORT [--size 100] [--seconds 3] [--workers 4]
    python tests/bench/tcpload.py wait --connect IP:PORT [--timeout 10]

``server`` echoes every byte back (uvloop when available, TCP_NODELAY).  ``rr`` keeps one
connection and times ``count`` request/response round trips of ``size`` bytes after
``warmup`` untimed ones.  ``cps`` opens, exchanges ``size`` bytes and closes connections from
``workers`` concurrent loops for ``seconds``.  Each client prints one JSON line.

Standalone on purpose (stdlib + optional uvloop, no project imports): it starts fast inside
``ip netns exec`` and measures the same client code for every case, so the per-operation
overhead of Python itself is a constant that the ratios share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any, cast


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # plain asyncio still works, just slower for cps
        return asyncio.run


# -- server ---------------------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; only write() is used.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, host, port, reuse_address=True, backlog=1024)
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    async with server:
        await server.serve_forever()


# -- request/response latency -----------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def rr(target: tuple[str, int], size: int, count: int, warmup: int) -> dict[str, Any]:
    msg = b"r" * size
    sock = socket.create_connection(target, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: list[float] = []
    try:
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            sock.sendall(msg)
            got = 0
            while got < size:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"peer closed after {i} round trips")
                got += len(chunk)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t0) / 1000.0)
    finally:
        sock.close()
    samples.sort()
    return {
        "round_trips": len(samples),
        "p50_us": _percentile(samples, 50),
        "p90_us": _percentile(samples, 90),
        "p99_us": _percentile(samples, 99),
        "mean_us": sum(samples) / len(samples),
        "min_us": samples[0],
        "max_us": samples[-1],
    }


# -- connections per second ---------------------------------------------------------------


async def _cps(target: tuple[str, int], size: int, seconds: float, workers: int,
               warmup: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    msg = b"c" * size
    errors: dict[str, int] = {}

    async def one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, target)
            await loop.sock_sendall(sock, msg)
            got = 0
            while got < size:
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    raise ConnectionError("closed before the whole reply")
                got += len(chunk)
        finally:
            sock.close()

    # Untimed warm-up: lets a proxy open its pooled upstream connection first.
    for _ in range(warmup):
        await one()

    done = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            try:
                await one()
                done += 1
            except OSError as exc:
                key = type(exc).__name__ if exc.errno is None else f"errno {exc.errno}"
                errors[key] = errors.get(key, 0) + 1
                await asyncio.sleep(0.001)

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - start
    return {
        "connections": done,
        "seconds": elapsed,
        "per_second": done / elapsed,
        "workers": workers,
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def wait(target: tuple[str, int], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            socket.create_connection(target, timeout=1).close()
            return {"ok": True}
        except OSError as exc:
            last = str(exc)
            time.sleep(0.05)
    return {"ok": False, "error": last}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpload")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    for name in ("rr", "cps", "wait"):
        p = sub.add_parser(name)
        p.add_argument("--connect", required=True, type=_addr)
        p.add_argument("--size", type=int, default=100)
        p.add_argument("--count", type=int, default=2000)
        p.add_argument("--warmup", type=int, default=200)
        p.add_argument("--seconds", type=float, default=3.0)
        p.add_argument("--workers", type=int, default=4)
        p.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    run = _loop_runner()
    if args.cmd == "server":
        with contextlib.suppress(KeyboardInterrupt):
            run(_serve(args.host, args.port))
        return 0
    result: dict[str, Any]
    try:
        if args.cmd == "rr":
            result = rr(args.connect, args.size, args.count, args.warmup)
        elif args.cmd == "cps":
            result = run(_cps(args.connect, args.size, args.seconds, args.workers,
                              min(args.warmup, 20)))
        else:
            result = wait(args.connect, args.timeout)
    except OSError as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
