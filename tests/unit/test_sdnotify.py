"""sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy.sdnotify import Notifier, run_watchdog, supervise
from tests.helpers.waiting import eventually


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: collects datagrams as lists of lines."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[list[str]]:
        out: list[list[str]] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return out


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    server = FakeSystemd(path)
    yield server, path
    server.sock.close()


def test_disabled_without_notify_socket() -> None:
    n = Notifier({"WATCHDOG_USEC": "200000"})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval is None


def test_ready_status_stopping_reloading(fake: tuple[FakeSystemd, str]) -> None:
    server, path = fake
    n = Notifier({"NOTIFY_SOCKET": path}, clock_usec=lambda: 1234)
    assert n.ready("3 pods\nenrolled")
    assert n.status("hello")
    assert n.reloading()
    assert n.stopping()
    n.close()
    assert server.drain() == [
        ["READY=1", "STATUS=3 pods enrolled"],  # newline folded: it would start a new key
        ["STATUS=hello"],
        ["RELOADING=1", "MONOTONIC_USEC=1234", "STATUS=reloading config"],
        ["STOPPING=1", "STATUS=draining connections"],
    ]


def test_abstract_socket() -> None:
    name = f"nodeproxy-test-{uuid.uuid4().hex}"
    server = FakeSystemd(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        n.close()
        assert server.drain() == [["READY=1"]]
    finally:
        server.sock.close()


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.2),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.2),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", **env}, pid=4242)
    assert n.watchdog_interval == expected


def test_default_environ_is_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/x")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval == 1.0


async def test_watchdog_pings_at_half_interval(fake: tuple[FakeSystemd, str]) -> None:
    server, path = fake
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    pings: list[float] = []

    def collect() -> bool:
        pings.extend(loop.time() for d in server.drain() if d == ["WATCHDOG=1"])
        return len(pings) >= 3

    start = loop.time()
    task = asyncio.create_task(run_watchdog(n, lambda: True, stop))
    await eventually(collect, 5, lambda: f"pings at {pings}")
    stop.set()
    await asyncio.wait_for(task, 2)
    n.close()
    # The first at once, then one per half interval (0.1 s), not faster.
    assert pings[2] - start >= 0.2 * 0.9


async def test_watchdog_withheld_while_unhealthy(fake: tuple[FakeSystemd, str]) -> None:
    server, path = fake
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    stop = asyncio.Event()
    healthy = {"ok": False, "boom": False}
    checks = 0

    def check() -> bool:
        nonlocal checks
        checks += 1
        if healthy["boom"]:
            raise RuntimeError("broken check")
        return healthy["ok"]

    async def checked(times: int) -> None:
        # The watchdog sends (or withholds) right after each check, before waiting: once
        # check() ran ``times`` more times, that many decisions were acted on.
        target = checks + times
        await eventually(lambda: checks >= target, 5, lambda: f"{checks} checks, not {target}")

    task = asyncio.create_task(run_watchdog(n, check, stop))
    await checked(3)
    assert server.drain() == []  # unhealthy: three decisions, no ping
    healthy["ok"] = True
    await checked(2)
    assert ["WATCHDOG=1"] in server.drain()
    healthy["boom"] = True  # a raising check counts as unhealthy and does not kill the task
    await checked(1)
    server.drain()  # a ping sent before the first raising check
    await checked(3)
    assert server.drain() == []
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 2)
    n.close()


async def test_watchdog_returns_when_not_armed() -> None:
    stop = asyncio.Event()
    await asyncio.wait_for(run_watchdog(Notifier({"NOTIFY_SOCKET": "/x"}), lambda: True, stop), 1)


async def test_supervise_ready_once_and_status_changes(fake: tuple[FakeSystemd, str]) -> None:
    server, path = fake
    n = Notifier({"NOTIFY_SOCKET": path})
    state = {"ready": False, "text": "waiting for pod a"}
    stop = asyncio.Event()
    got: list[list[str]] = []

    async def received(count: int) -> None:
        def check() -> bool:
            got.extend(server.drain())
            return len(got) >= count
        await eventually(check, 5, lambda: f"got only {got}")

    task = asyncio.create_task(
        supervise(n, lambda: bool(state["ready"]), lambda: str(state["text"]), stop, poll=0.02)
    )
    await received(1)
    state.update(ready=True, text="ready: 1 pod(s)")
    await received(2)
    state.update(ready=False, text="waiting for pod b")  # READY=1 is never taken back
    await received(3)
    stop.set()
    await asyncio.wait_for(task, 2)
    n.close()
    got.extend(server.drain())
    assert got == [
        ["STATUS=waiting for pod a"],
        ["READY=1", "STATUS=ready: 1 pod(s)"],
        ["STATUS=waiting for pod b"],
    ]
