"""Helpers of the fail-closed / abuse tests on a real netns mesh (root).

Each ``test_*`` module using this builds one 2-node mesh (``tests.netns.mesh_fixtures.mesh_env``:
a CA service in the fabric netns and one ``nodeproxy run`` agent per node) with
:func:`module_mesh` and puts it back into its base state around each test with
:func:`fresh`.  (Not a conftest.py: the loopback abuse tests share this directory.)
The other helpers read what the tests assert on: an agent's process and open file
descriptors, a pod netns's capture rules; and they stop and restart the CA service.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlab.capture import CaptureResult
from meshlab.mesh import CA_PORT, NODEPROXY
from tests.netns.mesh_fixtures import (
    ROLES,
    SERVICES,
    MeshEnv,
    mesh_env,
    netns_state,
    poll,
)

MESH_PODS = tuple(pod for pod, role in ROLES.items() if role.mesh)


@contextlib.contextmanager
def module_mesh(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[MeshEnv]:
    """One mesh (iptables backend, the shared roles and services); torn down on exit, also
    when a test failed."""
    workdir: Path = tmp_path_factory.mktemp(name)
    with mesh_env(workdir, "iptables", roles=ROLES, services=SERVICES) as env:
        yield env


@contextlib.contextmanager
def fresh(env: MeshEnv) -> Iterator[MeshEnv]:
    """Base state before and after a test (also after a failure half way: the CA service is
    started again and agents that cannot recover are restarted)."""
    env.reset()
    wait_enrolled(env)
    yield env
    restore(env)
    env.reset()
    wait_enrolled(env)


def wait_enrolled(env: MeshEnv, timeout: float = 30.0) -> None:
    """Every mesh pod of the base config enrolled by its node's agent (``reset`` only waits
    for the config to be loaded; enrolment follows asynchronously)."""
    want = {n: sorted(w["uid"] for w in env.base_doc["workloads"]
                      if w["node"] == n and w["protocol"] == "HBONE") for n in env.node_names}

    def enrolled() -> dict[str, list[str]]:
        return {n: sorted(env.mesh.config_dump(n).get("enrolled", [])) for n in env.node_names}

    poll(lambda: enrolled() == want, timeout,
         lambda: f"enrolled {enrolled()}, want {want}\n{env.logs()}")


def restore(env: MeshEnv) -> None:
    """CA service running; an agent that is not ready (e.g. in certificate back-off after the
    CA was down) is restarted, so the next test starts from a clean agent."""
    if env.mesh.ca_proc is None or env.mesh.ca_proc.poll() is not None:
        start_ca(env)
    for node in env.node_names:
        proc = env.mesh.agents.get(node)
        if proc is None or proc.poll() is not None or not env.mesh.ready(node):
            if proc is not None:
                env.mesh.stop_agent(node)
            env.mesh.start_agent(node)


# -- the CA service ------------------------------------------------------------------------

def stop_ca(env: MeshEnv) -> None:
    proc = env.mesh.ca_proc
    assert proc is not None, "the CA service was never started"
    assert proc.poll() is None, "the CA service is not running"
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_ca(env: MeshEnv, timeout: float = 15.0) -> None:
    """The command of ``Mesh.start``; returns once the CA service answers TCP connects."""
    mesh = env.mesh
    log = open(mesh.workdir / "ca.log", "ab")  # noqa: SIM115 - owned by the process
    try:
        mesh.ca_proc = env.cluster.popen(
            "fabric",
            [*NODEPROXY, "--log-level", mesh.log_level, "ca", "serve", "--dir",
             str(mesh.ca_dir), "--config", str(mesh.config_path),
             "--listen", f"{mesh.ca_ip}:{CA_PORT}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    finally:
        log.close()  # the child has its own copy
    probe = [NODEPROXY[0], "-c",
             "import socket,sys; s=socket.socket(); s.settimeout(0.5); "
             f"sys.exit(s.connect_ex(({mesh.ca_ip!r}, {CA_PORT})))"]

    def listening() -> bool:
        proc = mesh.ca_proc
        assert proc is not None
        assert proc.poll() is None, "CA service exited:\n" + ca_log_tail(env)
        return env.cluster.exec("fabric", probe).returncode == 0

    poll(listening, timeout, lambda: "the CA service does not listen\n" + ca_log_tail(env),
         interval=0.05)


def ca_log_tail(env: MeshEnv, lines: int = 20) -> str:
    path = env.mesh.workdir / "ca.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# -- agents and pods -----------------------------------------------------------------------

def agent_pid(env: MeshEnv, node: str) -> int:
    """PID of the ``nodeproxy run`` process of ``node`` (``ip netns exec`` execs it, so this
    is the popen'd PID; checked through its command line)."""
    pid = env.mesh.agents[node].pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"run" in argv, f"pid {pid} is not an agent: {argv}"
    assert node.encode() in argv, f"pid {pid} is not the agent of {node}: {argv}"
    return pid


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pod_rules(env: MeshEnv, pod: str) -> dict[str, str]:
    """The capture rules in a pod's netns (normalized, see ``netns_state``); they must hold
    the agent's chains (iptables backend: ``NODEPROXY_*``)."""
    state = netns_state(env.cluster.pod(pod).netns_path)
    assert "NODEPROXY_" in state["iptables-save"], f"no capture rules in {pod}: {state}"
    return state


def assert_failed(what: str, results: list[dict[str, object]], env: MeshEnv) -> None:
    """One connection that must have failed without reaching an application."""
    [res] = results
    assert not res["ok"], f"{what}: the connection worked: {res}\n{env.logs()}"
    assert res["tag"] is None, f"{what}: an application answered: {res}"
    assert res["error"], f"{what}: no error reported: {res}"


def assert_ok(what: str, results: list[dict[str, object]], env: MeshEnv) -> None:
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{what}: {len(bad)} of {len(results)} failed: {bad[:3]}\n{env.logs()}"


def pod_pcap_flows(pcap: CaptureResult) -> set[tuple[str, str, int]]:
    """(source IP, destination IP, destination port) of every packet a capture saw (a pooled
    HBONE connection opened before the capture has no SYN in it, only data)."""
    return {(p.src, p.dst, p.dport) for p in pcap.packets}
