"""Suite-wide rules.

- Privileged tests (marker ``privileged``) need root and netfilter/netns support.  When they
  cannot run they FAIL with the reason; they never skip silently.
- Under CI (``CI`` set) any skipped test fails the run.
- Every async test runs twice, on uvloop (the agent's production loop) and on the plain
  asyncio loop (ids ``[uvloop]`` and ``[asyncio]``); marker ``uvloop`` restricts a test to
  uvloop (figures that depend on its buffers, or too slow to run twice).
- Every async test is held to the hygiene of ``tests/helpers/hygiene.py``: it fails if the
  loop's exception handler was called or it left a task, a file descriptor or an unclosed
  object behind.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop
from pytest_asyncio import is_async_test

from tests.helpers.hygiene import Baseline, LoopErrors

pytest_plugins = ("pytester",)

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def _privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "privileged test needs root (run 'make test' as root)"
    for tool in ("ip", "iptables-restore", "nft"):
        if shutil.which(tool) is None:
            return f"privileged test needs '{tool}' (run 'make test', which installs it)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot use network namespaces: {probe.stderr.strip()}"
    return None


@pytest.fixture(autouse=True)
def _privileged_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is not None:
        problem = _privilege_problem()
        if problem:
            pytest.fail(problem, pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and reporter is not None:
        reporter.write_line(
            f"CI: {len(skipped)} test(s) skipped; skips are failures in CI", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "uvloop: run the async test on uvloop only (the agent's production loop), "
        "not also on the plain asyncio loop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item,
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test on both loops; tests marked ``uvloop`` on uvloop only."""
    if item.get_closest_marker("uvloop") is not None:
        return {"uvloop": LOOP_FACTORIES["uvloop"]}
    return dict(LOOP_FACTORIES)


def pytest_collection_finish(session: pytest.Session) -> None:
    # The hygiene checks collect garbage twice per async test: with everything imported and
    # collected so far moved out of the collector's sight, each collection only walks what the
    # tests themselves allocated (milliseconds instead of a tenth of a second).
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # An object dropped without close() warns in __del__; loop_hygiene makes that an error
    # (reported as an unraisable exception), which must fail the test.
    for item in items:
        if is_async_test(item):
            item.add_marker(
                pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"))


@pytest.fixture
async def loop_hygiene() -> AsyncIterator[LoopErrors]:
    """Records the loop's exception-handler calls; at teardown (after the test's other
    fixtures) fails on any of them and on tasks, descriptors or objects the test left open.
    Applied to every async test; request it to ``take()`` errors a test provokes on purpose."""
    loop = asyncio.get_running_loop()
    baseline = Baseline()
    errors = LoopErrors()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(errors)
    # pytest restores the warning filters after each test.  Not an error once this fixture is
    # done: uvloop warns about open handles while closing the loop, and an exception raised
    # there leaves loop.close() waiting forever (the fd check has reported them by then).
    warnings.filterwarnings("error", category=ResourceWarning)
    try:
        yield errors
        problems = await baseline.check(errors)
    finally:
        warnings.filterwarnings("always", category=ResourceWarning)
        loop.set_exception_handler(previous)
    if problems:
        pytest.fail("async hygiene: " + "\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _async_hygiene(request: pytest.FixtureRequest) -> None:
    # Set up before the test's own function-scoped fixtures, so torn down after them.
    if is_async_test(request.node):
        request.getfixturevalue("loop_hygiene")
