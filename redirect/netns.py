"""Run a function in a thread that has entered a network namespace (setns(2) via libc).

pyroute2's ``NetNS`` forks a child process to open its netlink socket inside the namespace.
In the agent that child inherits the event loop's signal wake-up fd, so when pyroute2 ends the
child with SIGTERM the *agent's* loop sees a SIGTERM and drains (seen here with uvloop).  A
thread that enters the namespace and opens a plain ``IPRoute`` there avoids the fork.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from redirect.errors import RedirectError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise RedirectError(f"cannot enter network namespace {path}: {os.strerror(err)}",
                                netns=path, hint="this needs root (CAP_SYS_ADMIN)")
    finally:
        os.close(fd)


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread inside ``path``; the thread ends with the call, so no
    other work ever runs in the wrong namespace."""

    def job() -> T:
        _enter(path)
        return fn()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="redirect-netns") as pool:
        return pool.submit(job).result()
