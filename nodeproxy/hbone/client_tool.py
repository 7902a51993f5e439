"""One HBONE stream between stdin/stdout and a remote CONNECT target (`nodeproxy hbone
connect`): an ``nc`` / ``openssl s_client`` for HBONE, for operators debugging the mesh."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from nodeproxy.errors import IdentityError, ProxyError
from nodeproxy.hbone import glue
from nodeproxy.identity.svid import load_pem_chain, single_uri_san
from nodeproxy.tls import PeerIdentityError, context_from_pem, verify_peer
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.spiffe import SpiffeId

# Exit codes: what failed, so scripts can tell TLS from policy from upstream trouble.
EXIT_OK, EXIT_OTHER, EXIT_TLS, EXIT_IDENTITY, EXIT_DENIED, EXIT_UPSTREAM, EXIT_BAD = (
    0, 1, 2, 3, 4, 5, 6,
)


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    host: str
    port: int
    authority: str
    cert: Path
    key: Path
    ca: Path
    expect_san: tuple[SpiffeId, ...] = ()
    timeout: float = 10.0


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, PeerIdentityError):
        return EXIT_TLS if exc.flags == "TLS_FAILURE" else EXIT_IDENTITY
    if isinstance(exc, ProxyError):
        if exc.flags == "TLS_FAILURE":
            return EXIT_TLS
        if exc.flags == "DENY":
            return EXIT_DENIED
        if exc.status == 400:
            return EXIT_BAD
        return EXIT_UPSTREAM
    if isinstance(exc, IdentityError):
        return EXIT_TLS
    return EXIT_OTHER


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from None


async def run(opts: ConnectOptions) -> None:
    chain = _read(opts.cert, "certificate")
    own = single_uri_san(load_pem_chain(chain, str(opts.cert))[0])
    trust_domain = own.removeprefix("spiffe://").split("/", 1)[0]
    ctx = context_from_pem(server=False, chain_pem=chain, key_pem=_read(opts.key, "key"),
                           bundle_pem=_read(opts.ca, "trust bundle"), alpn=["h2"])
    expected = opts.expect_san or None

    def check(transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        peer = verify_peer(ssl_object, trust_domain, expected)
        print(f"hbone: connected to {opts.host}:{opts.port} as {own}, peer {peer}",
              file=sys.stderr)

    conn = await glue.open_connection(opts.host, opts.port, ctx, verify_peer=check,
                                      timeout=opts.timeout)
    try:
        stream = await conn.open_stream(opts.authority, ())
        print(f"hbone: CONNECT {opts.authority} -> 200", file=sys.stderr)
        await _pump(stream)
    finally:
        conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 2)


async def _pump(stream: glue.HboneStream) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def upload() -> None:
        while data := await reader.read(65536):
            await stream.write(data)
        stream.write_eof()

    async def download() -> None:
        out = sys.stdout.buffer
        while data := await stream.read():
            out.write(data)
            out.flush()

    up = asyncio.ensure_future(upload())
    await download()
    if not up.done():  # the peer finished first: stop reading stdin
        up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await up


def connect(opts: ConnectOptions) -> int:
    """Run the tool; returns the process exit code and prints one line on failure."""
    try:
        asyncio.run(run(opts))
    except NodeproxyError as exc:
        print(f"hbone: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except OSError as exc:
        print(f"hbone: {exc}", file=sys.stderr)
        return EXIT_UPSTREAM
    return EXIT_OK
