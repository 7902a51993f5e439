"""Run a function in a thread that has entered a network namespace (:mod:`linuxns`).

pyroute2's ``NetNS`` forks a child process to open its netlink socket inside the namespace.
In the agent that child inherits the event loop's signal wake-up fd, so when pyroute2 ends the
child with SIGTERM the *agent's* loop sees a SIGTERM and drains (seen here with uvloop).  A
thread that enters the namespace and opens a plain ``IPRoute`` there avoids the fork.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import linuxns
from redirect.errors import RedirectError

T = TypeVar("T")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread inside ``path``; the thread ends with the call, so no
    other work ever runs in the wrong namespace."""
    try:
        return linuxns.call_in_netns(path, fn)
    except linuxns.NetnsEnterError as exc:
        hint = ("does the pod's netns exist (ip netns list)?" if exc.opening
                else "this needs root (CAP_SYS_ADMIN)")
        raise RedirectError(f"cannot enter network namespace {path}: {exc.strerror}",
                            netns=path, hint=hint) from None
