"""What every async test is held to (convention 9, like uvloop's own test suite).

A test fails when, by the end of its fixtures' teardown:

- the event loop's exception handler was called (a task died with an exception nobody
  retrieved, a callback or protocol method raised, a server handler reported a failure);
- a task it started is still pending;
- a file descriptor it opened (socket, transport, pipe) is still open;
- an object it dropped without closing raised a ``ResourceWarning`` ("unclosed transport").

``tests/conftest.py`` applies this to every pytest-asyncio test through the ``loop_hygiene``
fixture; a test that provokes a loop error on purpose requests the fixture and ``take()``s the
errors it expected.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from tests.helpers.waiting import eventually

# How long closing transports and finishing tasks may take at teardown (only a test that leaks
# waits this long; tests/unit/test_async_hygiene.py shortens it for its deliberately messy ones).
SETTLE_TIMEOUT = float(os.environ.get("NODEPROXY_TEST_SETTLE_TIMEOUT", "2.0"))


class LoopErrors:
    """A loop exception handler that records every call instead of logging it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.calls.append(context)

    def take(self) -> list[dict[str, Any]]:
        """Claim the calls made so far (the test expected them): they no longer fail it."""
        calls, self.calls = self.calls, []
        return calls

    async def wait(
        self, match: Callable[[dict[str, Any]], bool] = lambda _c: True, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait for a call matching ``match``; return it (it stays recorded: ``take()`` it)."""
        found = await eventually(
            lambda: next((c for c in self.calls if match(c)), None), timeout,
            lambda: f"no matching loop exception-handler call; got {describe_calls(self.calls)}")
        assert found is not None
        return found


def describe_calls(calls: Iterable[dict[str, Any]]) -> list[str]:
    out = []
    for context in calls:
        text = str(context.get("message", "(no message)"))
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            text += "\n" + "".join(traceback.format_exception(exc)).rstrip()
        extra = {k: v for k, v in context.items() if k not in ("message", "exception")}
        if extra:
            text += f"\n  context: {extra!r}"
        out.append(text)
    return out


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used, or one closed meanwhile
            continue
    return fds


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    """Descriptors opened since ``before`` if there are more than were closed meanwhile.

    uvloop replaces its signal socketpair at every run_until_complete: new sockets, usually
    on the same numbers, but on others when lower ones were freed meanwhile; so it is the
    count that tells a leak.  /dev/null is libuv's spare descriptor for EMFILE (opened at a
    loop's first listen, kept for the loop's life), never something the test forgot."""
    now = {fd: what for fd, what in open_fds().items() if what != "/dev/null"}
    new = {fd: what for fd, what in now.items() if fd not in before}
    gone = [fd for fd, what in before.items() if fd not in now and what != "/dev/null"]
    return new if len(new) > len(gone) else {}


def collect_garbage() -> list[str]:
    """``gc.collect()``, returning the ResourceWarnings it raised (objects never closed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


class Baseline:
    """The loop's state before the test; ``check()`` at teardown lists what the test left."""

    def __init__(self) -> None:
        collect_garbage()  # garbage of earlier tests must not be blamed on this one
        self.tasks = set(asyncio.all_tasks())
        self.fds = open_fds()

    def _pending(self) -> list[asyncio.Task[Any]]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks()
                if t is not me and t not in self.tasks and not t.done()]

    async def check(self, errors: LoopErrors) -> list[str]:
        for _ in range(5):  # let close() callbacks and finishing tasks run
            await asyncio.sleep(0)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (self._pending() or _new_fds(self.fds)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        problems: list[str] = []
        leaked = self._pending()
        if leaked:
            problems.append("tasks still pending at teardown:\n" + "\n".join(
                f"  {t!r}" for t in leaked))
        unclosed = collect_garbage()  # also reports "Task exception was never retrieved"
        if unclosed:
            problems.append("objects never closed:\n" + "\n".join(f"  {w}" for w in unclosed))
        fds = _new_fds(self.fds)
        if fds:
            problems.append("file descriptors left open:\n" + "\n".join(
                f"  fd {fd} -> {what}" for fd, what in sorted(fds.items())))
        if errors.calls:
            problems.append("the event loop's exception handler was called:\n" + "\n".join(
                describe_calls(errors.calls)))
        for t in leaked:  # so that closing the loop does not hang (errors from here on: noise)
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        return problems
