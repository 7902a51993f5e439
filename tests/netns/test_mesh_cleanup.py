"""Scenario 9: removal leaves a pod namespace exactly as it was before the agent ever ran.

Each test builds its own 1-node, 1-pod cluster (so no other test's rules are in the way),
snapshots the pod and node namespaces *before* any agent starts, then checks two ways of
removing capture: ``nodeproxy redirect remove`` after a ``kill -9``'d agent, and the agent's
own ``--cleanup-on-exit`` on SIGTERM.  Compared views: ``iptables-save`` (nft flavour),
``iptables-legacy-save``, ``nft list ruleset``, ``ip rule`` and all routing tables (counters
stripped).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.mesh_fixtures import BACKENDS, MeshEnv, mesh_env, netns_state, redirect_cli
from tests.netns.mesh_fixtures import state_diff as diff

pytestmark = pytest.mark.privileged


@pytest.fixture(params=BACKENDS)
def small(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshEnv]:
    with mesh_env(tmp_path, request.param, nodes=1, pods_per_node=1, start=False) as env:
        yield env


def _snap(env: MeshEnv) -> dict[str, dict[str, str]]:
    return {"pod": netns_state(env.cluster.pod("n1p1").netns_path),
            "node": netns_state(env.cluster.node("node1").netns_path)}


def _diff(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"[{k} netns]\n{diff(a[k], b[k])}" for k in a if a[k] != b[k])


def _start_and_check_installed(env: MeshEnv, before: dict[str, dict[str, str]],
                               *agent_args: str) -> None:
    env.mesh.extra_agent_args = agent_args
    env.mesh.start(env.base_doc)  # CA service + the node's agent, waits for readiness
    installed = _snap(env)
    assert installed["pod"] != before["pod"], "the agent installed nothing in the pod netns"
    shown = redirect_cli("show", "--netns", env.cluster.pod("n1p1").netns_path)
    assert "nodeproxy" in shown.stdout, shown.stdout + shown.stderr


def test_mesh_redirect_remove_restores_netns(small: MeshEnv) -> None:
    before = _snap(small)
    _start_and_check_installed(small, before)
    small.mesh.stop_agent("node1", signal.SIGKILL)
    left = _snap(small)
    assert left != before, "rules vanished with the killed agent (should fail closed)"

    pod_path = small.cluster.pod("n1p1").netns_path
    removed = redirect_cli("remove", "--netns", pod_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    after = _snap(small)
    assert after == before, "redirect remove left the namespaces changed:\n" \
                            + _diff(before, after)
    again = redirect_cli("remove", "--netns", pod_path)  # removing twice is harmless
    assert again.returncode == 0, again.stdout + again.stderr
    assert _snap(small) == before


def test_mesh_cleanup_on_exit_restores_netns(small: MeshEnv) -> None:
    before = _snap(small)
    _start_and_check_installed(small, before, "--cleanup-on-exit")
    code = small.mesh.stop_agent("node1", signal.SIGTERM)
    assert code == 0, f"agent exited with {code}\n{small.mesh.log_tail('node1')}"
    after = _snap(small)
    assert after == before, "--cleanup-on-exit left the namespaces changed:\n" \
                            + _diff(before, after) + "\n" + small.mesh.log_tail("node1")
