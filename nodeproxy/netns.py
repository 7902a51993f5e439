"""Run code inside a network namespace given by path: one worker thread per namespace.

setns(2) changes only the calling thread (the one helper is :func:`linuxns.setns`), so each
namespace gets one dedicated worker thread that enters it once and then runs jobs (socket
creation, bind, listen).  Sockets keep the namespace they were created in, so the event loop
can serve them from its own thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import linuxns
from nodeproxy.errors import ProxyError

T = TypeVar("T")


def _enter(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``; failures become a
    :class:`ProxyError` that says what to check."""
    try:
        linuxns.setns(path)
    except linuxns.NetnsEnterError as exc:
        if exc.opening:
            raise ProxyError(
                f"cannot open network namespace {path}: {exc.strerror}",
                hint="does the pod's netns exist (ip netns list)?",
            ) from None
        raise ProxyError(
            f"setns({path}) failed: {exc.strerror}",
            hint="the agent needs CAP_SYS_ADMIN to enter pod namespaces",
        ) from None


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
            _enter(self.path)
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
