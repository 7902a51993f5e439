"""Linux namespace syscalls, shared by the whole project: the one ``setns`` helper.

Why a package of its own: the daemon (``nodeproxy``), the redirect installer (``redirect``) and
the lab (``meshlab``) all enter network namespaces, but ``nodeproxy`` and ``redirect`` must
never import each other, and ``ztunnel_cfg`` is the pure config model (no syscalls).  So the
helper sits *below* all of them, like ``ztunnel_cfg`` does, and imports nothing of the project
(an import-linter contract checks that).  It raises plain :class:`OSError` subclasses; each
package translates them once, at its boundary, into its own error family with its own hint.

Python 3.11 has no ``os.setns``: libc ``setns(fd, CLONE_NEWNET)`` is called through ctypes.
setns(2) moves only the calling *thread*, so callers enter a namespace from a thread they own
(a dedicated worker, or the fresh thread of :func:`call_in_netns`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["CLONE_NEWNET", "NetnsEnterError", "call_in_netns", "current_netns_inode", "setns"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsEnterError(OSError):
    """The namespace file could not be opened, or setns(2) refused it.  ``errno``,
    ``strerror`` and ``filename`` are set; ``opening`` tells the two cases apart (a missing
    namespace versus missing privileges)."""

    def __init__(self, errno: int, path: str, *, opening: bool) -> None:
        super().__init__(errno, os.strerror(errno), path)
        self.opening = opening


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path`` (e.g.
    ``/var/run/netns/NAME`` or ``/proc/PID/ns/net``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsEnterError(exc.errno or 0, path, opening=True) from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise NetnsEnterError(ctypes.get_errno(), path, opening=False)
    finally:
        os.close(fd)


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace (identifies it)."""
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


def call_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that has entered ``path``; the thread ends with the call,
    so no other work ever runs in the wrong namespace.  Raises :class:`NetnsEnterError` when
    the namespace cannot be entered, else whatever ``fn`` raises."""

    def job() -> T:
        setns(path)
        return fn()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-call") as pool:
        return pool.submit(job).result()
