"""The hygiene every async test is held to (tests/conftest.py, tests/helpers/hygiene.py), run
against small test files in a separate pytest process: each kind of mess fails its test, on
both loops, and a test that provokes a loop error on purpose can claim it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TESTS = '''
import asyncio
import socket

import pytest

KEPT = []


async def test_clean():
    await asyncio.sleep(0)


async def test_leaks_a_task():
    asyncio.get_running_loop().create_task(asyncio.sleep(3600))


async def test_callback_raises():
    def boom():
        raise RuntimeError("from a callback")
    asyncio.get_running_loop().call_soon(boom)
    await asyncio.sleep(0.01)


async def test_task_exception_never_retrieved():
    async def fail():
        raise ValueError("nobody awaits me")
    asyncio.get_running_loop().create_task(fail())
    await asyncio.sleep(0.01)


async def test_keeps_a_socket_open():
    KEPT.append(socket.socket())


async def test_drops_a_socket_unclosed():
    socket.socket()


async def test_leaves_a_transport_open():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    KEPT.append(await asyncio.open_connection("127.0.0.1", port))
    server.close()
    await server.wait_closed()


async def test_leaves_a_server_serving():  # uvloop hung closing the loop once
    async def handle(reader, writer):
        await reader.read()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    KEPT.append(await asyncio.open_connection("127.0.0.1", port))
    KEPT.append(server)


async def test_claims_the_error_it_provoked(loop_hygiene):
    def boom():
        raise RuntimeError("expected")
    asyncio.get_running_loop().call_soon(boom)
    call = await loop_hygiene.wait(lambda c: "expected" in str(c.get("exception")))
    assert isinstance(call["exception"], RuntimeError)
    loop_hygiene.take()


@pytest.mark.uvloop
async def test_marked_uvloop_runs_once():
    import uvloop
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_sync_tests_are_left_alone():
    KEPT.append(socket.socket())
'''


def _lines(result: pytest.RunResult, prefix: str) -> set[str]:
    return {line.split(" - ")[0].split("::", 1)[1]
            for line in result.outlines if line.startswith(prefix + " test_mess.py::")}


EXPECTED = {  # each messy test: what its failure report must say
    "test_leaks_a_task": "tasks still pending at teardown",
    "test_callback_raises": "RuntimeError: from a callback",
    "test_task_exception_never_retrieved": "Task exception was never retrieved",
    "test_keeps_a_socket_open": "file descriptors left open",
    "test_drops_a_socket_unclosed": "ResourceWarning: unclosed <socket.socket",
    "test_leaves_a_transport_open": "file descriptors left open",
    "test_leaves_a_server_serving": "tasks still pending at teardown",
}


def test_each_kind_of_mess_fails_on_both_loops_and_says_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("NODEPROXY_TEST_SETTLE_TIMEOUT", "0.2")
    pytester.makeini("[pytest]\nasyncio_mode = auto\n"
                     "asyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_mess=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=120)

    failing = _lines(result, "ERROR") | _lines(result, "FAILED")
    assert failing == {f"{name}[{loop}]" for name in EXPECTED for loop in ("uvloop", "asyncio")}
    assert _lines(result, "PASSED") - failing == {
        "test_clean[uvloop]", "test_clean[asyncio]",
        "test_claims_the_error_it_provoked[uvloop]", "test_claims_the_error_it_provoked[asyncio]",
        "test_marked_uvloop_runs_once", "test_sync_tests_are_left_alone"}
    text = result.stdout.str()
    for name, says in EXPECTED.items():
        for loop in ("uvloop", "asyncio"):
            start = text.index(f" {name}[{loop}] _")
            end = re.search(r"\n[_=]{3}", text[start + 1:])
            section = text[start:start + 1 + end.start()] if end else text[start:]
            assert says in section, section
