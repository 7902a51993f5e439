"""HBONE framing micro-benchmark: pure h2 vs our codec, whole DATA frames vs fast path.

    .venv/bin/python tests/bench/hbone_micro.py [--mib 256] [--tls]

* memory: two sans-I/O peers in one process, one stream, sender -> receiver, receiver
  acknowledges every chunk (what the glue does). Measures framing cost only. "pure h2" is
  two vanilla h2 connections (the reference the codec replaced); "codec whole frames" is
  our codec with ``fast_path=False`` (each DATA frame collected before it is handed out).
* tls (``--tls``): the asyncio glue end to end over a real TLS 1.3 loopback connection
  (client writes, server reads and counts), plain asyncio and uvloop.
Numbers are printed, not asserted (DESIGN: no timed assertions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nodeproxy.hbone import events as ev
from nodeproxy.hbone import settings as cfg
from nodeproxy.hbone.protocol import HboneConnection

CHUNK = 256 * 1024  # the relay's read size


def _vanilla(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client))
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(client=client, initial_values={
        codes.INITIAL_WINDOW_SIZE: cfg.STREAM_WINDOW, codes.MAX_FRAME_SIZE: cfg.MAX_FRAME_SIZE,
        codes.MAX_CONCURRENT_STREAMS: 200})
    conn.max_inbound_frame_size = cfg.MAX_FRAME_SIZE
    conn.initiate_connection()
    conn.increment_flow_control_window(cfg.CONNECTION_WINDOW - 65535)
    return conn


def bench_pure_h2(total: int) -> float:
    c, s = _vanilla(True), _vanilla(False)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    s.receive_data(c.data_to_send())
    s.send_headers(sid, [(":status", "200")])
    c.receive_data(s.data_to_send())
    payload = b"x" * CHUNK
    sent = received = 0
    t0 = time.perf_counter()
    while received < total:
        while sent < total:
            n = min(len(payload), c.local_flow_control_window(sid), total - sent)
            if n <= 0:
                break
            mv = memoryview(payload)[:n]
            while mv:
                k = min(len(mv), c.max_outbound_frame_size)
                c.send_data(sid, mv[:k])
                mv = mv[k:]
            sent += n
        wire = c.data_to_send()
        for i in range(0, len(wire), CHUNK):  # transport-sized reads
            for e in s.receive_data(wire[i:i + CHUNK]):
                if isinstance(e, h2.events.DataReceived):
                    received += len(e.data)
                    s.acknowledge_received_data(e.flow_controlled_length, sid)
        c.receive_data(s.data_to_send())
    return time.perf_counter() - t0


def bench_fast(total: int, fast_path: bool = True) -> float:
    clock = time.monotonic
    c = HboneConnection(True, clock, fast_path=fast_path)
    s = HboneConnection(False, clock, fast_path=fast_path)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_stream("10.0.0.1:80")
    s.receive_data(c.data_to_send())
    s.respond(sid, 200)
    c.receive_data(s.data_to_send())
    payload = b"x" * CHUNK
    sent = received = 0
    t0 = time.perf_counter()
    while received < total:
        while sent < total:
            n = c.send_data(sid, memoryview(payload)[:min(CHUNK, total - sent)])
            if not n:
                break
            sent += n
        wire = c.data_to_send()
        for i in range(0, len(wire), CHUNK):
            for e in s.receive_data(memoryview(wire)[i:i + CHUNK]):
                if isinstance(e, ev.StreamData):
                    received += len(e.data)
                    s.acknowledge(sid, len(e.data))
        c.receive_data(s.data_to_send())
    return time.perf_counter() - t0


def gbit(total: int, seconds: float) -> float:
    return total * 8 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tls", action="store_true", help="also run the TLS loopback glue case")
    args = parser.parse_args()
    total = args.mib * 1024 * 1024
    t_h2 = bench_pure_h2(total)
    t_whole = bench_fast(total, fast_path=False)
    t_fast = bench_fast(total)
    print(f"memory  pure h2              {gbit(total, t_h2):7.2f} Gbit/s")
    print(f"memory  codec whole frames   {gbit(total, t_whole):7.2f} Gbit/s  "
          f"({t_h2 / t_whole:.1f}x)")
    print(f"memory  codec fast path      {gbit(total, t_fast):7.2f} Gbit/s  "
          f"({t_h2 / t_fast:.1f}x)")
    if args.tls:
        from tests.bench._hbone_tls import run_tls_cases  # local helper, imports the glue

        for name, seconds in run_tls_cases(total):
            print(f"tls     {name:<24} {gbit(total, seconds):7.2f} Gbit/s")


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()
