"""Synchronise on a condition, never on a fixed sleep.

``eventually`` polls ``check`` until it returns something truthy and returns that value; after
``timeout`` seconds it fails with ``describe`` (a string, or a callable evaluated at the deadline
so that it can show the state that did not change).  The timeout is a deadline for a condition
that normally holds within milliseconds: make it generous, it costs nothing when things work.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

Describe = str | Callable[[], str]


def _text(describe: Describe) -> str:
    return describe() if callable(describe) else describe


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = ..., describe: Describe = ...,
    *, interval: float = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], timeout: float = ..., describe: Describe = ...,
    *, interval: float = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    timeout: float = 5.0,
    describe: Describe = "condition",
    *,
    interval: float = 0.01,
) -> Any:
    """Await until ``check()`` (sync, or returning an awaitable) is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {_text(describe)}")
        await asyncio.sleep(interval)


def wait_until(
    check: Callable[[], T],
    timeout: float = 5.0,
    describe: Describe = "condition",
    *,
    interval: float = 0.01,
) -> T:
    """The same for synchronous tests (the waiting is done by another thread or process)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {_text(describe)}")
        time.sleep(interval)
    return value
