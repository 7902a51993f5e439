"""Suite-wide rules.

- Privileged tests (marker ``privileged``) need root and netfilter/netns support.  When they
  cannot run they FAIL with the reason; they never skip silently.
- Under CI (``CI`` set) any skipped test fails the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable

import pytest
import uvloop


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
        "markers", "uvloop: run the async test on uvloop, the agent's production event loop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item,
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``uvloop`` run on uvloop; the others on a plain asyncio loop."""
    if item.get_closest_marker("uvloop") is not None:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
