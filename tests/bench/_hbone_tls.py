"""TLS loopback case of hbone_micro.py: the asyncio glue end to end, fast path on/off."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from nodeproxy.hbone import events as ev
from nodeproxy.hbone.glue import HboneClientConnection, HboneProtocol, HboneStream
from tests.integration._certs import make_pki


async def _one(total: int, fast: bool, pki_dir: Path) -> float:
    pki = make_pki(pki_dir)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def handler(stream: HboneStream, req: ev.ConnectRequest) -> None:
        stream.accept()
        n = 0
        while data := await stream.read():
            n += len(data)
        done.set_result(n)
        stream.write_eof()

    server = await loop.create_server(
        lambda: HboneProtocol(False, on_request=handler, fast_path=fast),
        "127.0.0.1", 0, ssl=pki.server_context())
    port = server.sockets[0].getsockname()[1]
    holder: list[HboneProtocol] = []

    def factory() -> HboneProtocol:
        holder.append(HboneProtocol(True, fast_path=fast))
        return holder[0]

    await loop.create_connection(factory, "127.0.0.1", port, ssl=pki.client_context(),
                                 server_hostname="")
    await holder[0].ready
    conn = HboneClientConnection(holder[0])
    stream = await conn.open_stream("10.0.0.1:80")
    chunk = b"x" * (256 * 1024)
    t0 = time.perf_counter()
    for _ in range(total // len(chunk)):
        await stream.write(chunk)
    stream.write_eof()
    assert await done == total
    elapsed = time.perf_counter() - t0
    conn.abort()
    server.close()
    return elapsed


def run_tls_cases(total: int) -> list[tuple[str, float]]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        for loop_name, factory in (("asyncio", asyncio.new_event_loop),
                                   ("uvloop", uvloop.new_event_loop)):
            for fast in (False, True):
                with asyncio.Runner(loop_factory=factory) as r:
                    secs = r.run(_one(total, fast, Path(d)))
                out.append((f"{loop_name} {'fast path' if fast else 'whole frames'}", secs))
    return out
