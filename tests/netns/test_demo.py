"""``nodeproxy demo`` end to end: real namespaces, CA service, agents, captures (root).

Each test uses its own demo prefix and checks that nothing of it is left afterwards, also
when the demo failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlab import random_prefix
from meshlab.build import is_lab_netns, list_netns
from meshlab.demo import (
    DEMO_STEM,
    DemoOptions,
    build_scenario,
    run_demo,
    teardown_leftovers,
)

pytestmark = pytest.mark.privileged
NODEPROXY = [sys.executable, "-m", "cli.main"]


def _leftovers(prefix: str) -> list[str]:
    return [n for n in list_netns() if is_lab_netns(n, prefix)]


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    name = random_prefix(DEMO_STEM)
    yield name
    left = _leftovers(name)
    teardown_leftovers(name, str(tmp_path))  # never leave anything behind, even on failure
    assert not left, f"the demo left namespaces behind: {left}"


def _demo(prefix: str, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen([*NODEPROXY, "demo", "--prefix", prefix, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_demo_end_to_end(prefix: str, tmp_path: Path) -> None:
    proc = _demo(prefix, tmp_path, "--no-color")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    for line in [
        "[1/6] building namespaces (2 nodes, 6 pods",
        "[2/6] starting the CA service and 2 agents (redirect: iptables)",
        "✔ #1 cross-node call: frontend → catalog",
        "path  HBONE mTLS (node1 → node2, port 15008)",
        "path  DENIED by policy shop/deny-legacy",
        "0 bytes reached the app",
        "path  passthrough (plain TCP",
        "(the source pod's own IP)",
        "new TCP connections to port 5432 x1, 15008/HBONE x",
        "✔ the passthrough marker was seen in plaintext",
        "istio_tcp_connections_opened_total",
        f"spiffe://cluster.local/ns/default/sa/frontend{' ' * 6}available",
        "✔ all 10 connections behaved as the config says",
        "[6/6] tearing everything down ... ok",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "mesh markers was seen in" in out
    assert "✘" not in out
    assert "\x1b[" not in out, "colour although stdout is not a terminal"
    assert not _leftovers(prefix)
    assert not list(tmp_path.glob("nodeproxy-demo-*")), "workdir left after a good run"


def test_demo_fails_loudly_when_the_mesh_misbehaves(prefix: str, tmp_path: Path) -> None:
    """The config lacks the DENY policy the scenario relies on: the old client gets through,
    and the verdict, built from observations, must say so and fail."""
    out = io.StringIO()
    scenario = build_scenario(2).without_policy("deny-legacy")
    result = run_demo(DemoOptions(prefix=prefix, scenario=scenario, backend="nftables",
                                  workdir_root=str(tmp_path)), out)
    text = out.getvalue()
    assert result.exit_code == 1, text
    assert any("a connection the policy denies got through to the app" in p
               for p in result.problems), result.problems
    assert "✘ the mesh did not behave as configured" in text
    assert "the app ANSWERED / received the marker" in text
    assert "redirect=nftables" in text
    assert not _leftovers(prefix)
    assert (result.workdir / "agent-node2.log").exists(), "logs are kept after a failure"


def test_demo_fails_with_a_clear_error_via_the_cli(prefix: str, tmp_path: Path) -> None:
    """A run that cannot even build (the prefix is taken) exits non-zero with an error."""
    subprocess.run(["ip", "netns", "add", f"{prefix}n1"], check=True)
    proc = _demo(prefix, tmp_path, "--no-color")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"error: network namespaces already exist: {prefix}n1" in out
    assert "[1/6] building namespaces" in out
    assert "failed" in out


def test_demo_keep_then_down(prefix: str, tmp_path: Path) -> None:
    proc = _demo(prefix, tmp_path, "--no-color", "--keep", "--backend", "nftables")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Everything is still running" in out
    assert "nodeproxy demo --down" in out
    assert f"{prefix}n1" in _leftovers(prefix)
    # What the report tells the user to run works.
    metrics = subprocess.run(
        ["ip", "netns", "exec", f"{prefix}n1", "curl", "-s", "localhost:15020/metrics"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert 'istio_tcp_connections_opened_total{' in metrics.stdout
    show = subprocess.run([*NODEPROXY, "redirect", "show", "--netns",
                           f"/var/run/netns/{prefix}n1p1"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert "table inet nodeproxy" in show.stdout, show.stdout + show.stderr

    down = subprocess.run([*NODEPROXY, "demo", "--down", "--prefix", prefix],
                          env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 0, down.stderr
    assert "removed 9 namespace(s) and 1 workdir(s)" in down.stdout
    assert not _leftovers(prefix)
    assert not list(tmp_path.glob("nodeproxy-demo-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_tears_down(prefix: str, tmp_path: Path, sig: int) -> None:
    proc = _demo(prefix, tmp_path, "--no-color")
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    # Interrupt once the agents run (they are the hardest part to clean up).
    while "[3/6]" not in seen:
        assert time.monotonic() < deadline, seen
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096).decode()
            assert chunk, f"demo exited early: {seen}"
            seen += chunk
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    out = seen + rest
    with contextlib.suppress(Exception):
        proc.kill()
    assert proc.returncode == 130, out
    assert "tearing everything down ... ok" in out
    assert "interrupted" in out
    assert not _leftovers(prefix)
    pids = subprocess.run(["pgrep", "-f", prefix], capture_output=True, text=True,
                          check=False).stdout.split()
    assert not pids, f"processes of the demo still run: {pids}"
