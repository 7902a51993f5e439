"""Socket factories: the one place agent sockets are created.

Every socket carries ``SO_MARK 0x539`` so capture rules skip it; inbound upstream sockets can
be IP_TRANSPARENT to keep the client's source address.  ``SocketFactory`` creates sockets in
the agent's own namespace; ``NetnsSocketFactory`` creates them inside a pod's namespace via a
:class:`~nodeproxy.netns.NetnsWorker`.  Listeners and connectors are handed a factory, so the
same code serves in-pod, loopback tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nodeproxy.errors import ProxyError, from_os_error
from nodeproxy.netns import NetnsWorker

PROXY_MARK = 0x539
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; not exported by the socket module
IP_TRANSPARENT = 19
IP_FREEBIND = 15
SOCKET_BUFFER = 256 * 1024  # large buffers: C proxies went from ~4 to ~6.5 Gbit/s here


@dataclass(frozen=True, slots=True)
class SocketOptions:
    mark: int | None = PROXY_MARK
    # Allows binding addresses the netns does not own (listeners before the IP is up).
    freebind: bool = True


def _apply_common(sock: socket.socket, opts: SocketOptions) -> None:
    if opts.mark is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, opts.mark)
        except PermissionError:
            sock.close()
            raise ProxyError(
                "cannot set SO_MARK on agent sockets",
                hint="run as root or with CAP_NET_ADMIN, or use --no-mark for local debugging",
            ) from None
    sock.setblocking(False)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def make_listener(addr: str, port: int, opts: SocketOptions, backlog: int = 1024) -> socket.socket:
    sock = socket.socket(_family(addr), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if opts.freebind:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        _apply_common(sock, opts)
        sock.bind((addr, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise from_os_error(exc, "binding listener", f"{addr}:{port}") from None
    return sock


def make_connecting(
    addr: str, opts: SocketOptions, source: tuple[str, int] | None = None, transparent: bool = False
) -> socket.socket:
    """A socket ready for ``loop.sock_connect`` (optionally bound to a spoofed source)."""
    return prepare_connecting(socket.socket(_family(addr), socket.SOCK_STREAM), addr, opts,
                              source, transparent)


def prepare_connecting(
    sock: socket.socket, addr: str, opts: SocketOptions,
    source: tuple[str, int] | None = None, transparent: bool = False,
) -> socket.socket:
    """Options and source binding; works from any thread (the netns is fixed at creation)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        _apply_common(sock, opts)
        if source is not None:
            sock.bind(source)
    except OSError as exc:
        sock.close()
        raise from_os_error(exc, "preparing connection to", addr) from None
    return sock


def linger_zero(sock: socket.socket) -> None:
    """SO_LINGER 0: closing sends RST, so the peer sees a failure, not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def close_with_reset(sock: socket.socket) -> None:
    linger_zero(sock)
    sock.close()


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The pre-REDIRECT destination of an accepted IPv4 connection (SO_ORIGINAL_DST)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        raise ProxyError(
            f"no original destination on connection: {exc.strerror}",
            status=400,
            flags="NR",
            hint="was the connection redirected by the nodeproxy rules?",
        ) from None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class SocketFactory:
    """Creates agent sockets in the calling (agent's) namespace."""

    def __init__(self, opts: SocketOptions | None = None) -> None:
        self.opts = opts or SocketOptions()

    async def _run(self, fn: Callable[[], socket.socket]) -> socket.socket:
        return fn()

    async def listener(self, addr: str, port: int) -> socket.socket:
        return await self._run(lambda: make_listener(addr, port, self.opts))

    async def connect(
        self,
        addr: str,
        port: int,
        *,
        source: tuple[str, int] | None = None,
        transparent: bool = False,
        timeout: float = 10.0,
    ) -> socket.socket:
        sock = await self._fresh(addr, source, transparent)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (addr, port)), timeout)
        except OSError as exc:  # TimeoutError is an OSError
            sock.close()
            raise from_os_error(exc, "connection to", f"{addr}:{port}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _fresh(
        self, addr: str, source: tuple[str, int] | None, transparent: bool
    ) -> socket.socket:
        return await self._run(lambda: make_connecting(addr, self.opts, source, transparent))

    def close(self) -> None:
        """Release resources (worker threads); sockets already made stay valid."""


class NetnsSocketFactory(SocketFactory):
    """Creates agent sockets inside the network namespace at ``path``.

    Outgoing sockets come from a small stock created ahead of time in the namespace's worker
    thread: the thread hop per connect cost 8-12% of the agent's CPU at ~350 new
    connections/s in the benchmark (py-spy), and a socket's netns is fixed at creation, so
    options and binding can be applied later from the event loop.
    """

    STOCK = 32

    def __init__(self, path: str, opts: SocketOptions | None = None) -> None:
        super().__init__(opts)
        self.path = path
        self._worker = NetnsWorker(path)
        self._stock: list[socket.socket] = []
        self._refill: asyncio.Future[list[socket.socket]] | None = None
        self._closed = False

    async def _run(self, fn: Callable[[], socket.socket]) -> socket.socket:
        return await self._worker.run(fn)

    def _make_batch(self) -> list[socket.socket]:
        return [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(self.STOCK)]

    def _top_up(self) -> None:
        if self._refill is None and not self._closed and len(self._stock) < self.STOCK // 2:
            self._refill = asyncio.ensure_future(self._worker.run(self._make_batch))
            self._refill.add_done_callback(self._refilled)

    def _refilled(self, fut: asyncio.Future[list[socket.socket]]) -> None:
        self._refill = None
        if fut.cancelled() or fut.exception() is not None:
            return
        batch = fut.result()
        if self._closed:
            for sock in batch:
                sock.close()
        else:
            self._stock.extend(batch)

    async def _fresh(
        self, addr: str, source: tuple[str, int] | None, transparent: bool
    ) -> socket.socket:
        if _family(addr) != socket.AF_INET or not self._stock:
            self._top_up()
            return await super()._fresh(addr, source, transparent)
        sock = prepare_connecting(self._stock.pop(), addr, self.opts, source, transparent)
        self._top_up()
        return sock

    def close(self) -> None:
        self._closed = True
        for sock in self._stock:
            sock.close()
        self._stock.clear()
        self._worker.close()
