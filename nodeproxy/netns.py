"""Run code inside a network namespace given by path.

Python 3.11 has no ``os.setns``; we call libc ``setns(fd, CLONE_NEWNET)`` through ctypes.
setns(2) changes only the calling thread, so each namespace gets one dedicated worker thread
that enters it once and then runs jobs (socket creation, bind, listen).  Sockets keep the
namespace they were created in, so the event loop can serve them from its own thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from nodeproxy.errors import ProxyError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProxyError(
            f"cannot open network namespace {path}: {exc.strerror}",
            hint="does the pod's netns exist (ip netns list)?",
        ) from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ProxyError(
                f"setns({path}) failed: {os.strerror(err)}",
                hint="the agent needs CAP_SYS_ADMIN to enter pod namespaces",
            )
    finally:
        os.close(fd)


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace (identifies it)."""
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


class NetnsWorker:
    """A single thread living in one network namespace; runs callables there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns:{os.path.basename(path)}",
            initializer=self._enter,
        )
        # Enter eagerly so a missing namespace is reported at creation, not on first use.
        self._pool.submit(lambda: None).result()
        if self._error is not None:
            self._pool.shutdown(wait=False)
            raise self._error

    def _enter(self) -> None:
        try:
            setns(self.path)
        except BaseException as exc:  # reported by the constructor
            self._error = exc

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the namespace, blocking the caller."""
        self._check()
        return self._pool.submit(fn).result()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the namespace without blocking the event loop."""
        self._check()
        return await asyncio.wrap_future(self._pool.submit(fn))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
