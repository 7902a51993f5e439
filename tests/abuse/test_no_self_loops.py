"""No self-proxy loops (root, real 2-node mesh).

Regression for ba1b94a: a connection to a pod's own capture port (``<podIP>:15006`` /
``:15001``, or ``:15008`` from a mesh pod, or an HBONE CONNECT whose authority names one of
them) used to make the agent dial its own listener, which accepted and dialled again, until
the agent ran out of file descriptors.  Now every such connection is reset at once (HBONE:
400) and counted in ``nodeproxy_connections_rejected_total{reason="own_port"}``.
"""

from __future__ import annotations

import pytest

from meshlab.mesh import NODEPROXY
from tests.abuse.netns_mesh import (
    agent_pid,
    assert_failed,
    assert_ok,
    fd_count,
)
from tests.netns.mesh_fixtures import MeshEnv, metric_value, poll

pytestmark = pytest.mark.privileged

REJECTED = "nodeproxy_connections_rejected_total"
FD_MARGIN = 20
QUICK_MS = 2500  # a loop (pre-fix) runs into the client's 5 s timeout or the FD limit



def rejected(env: MeshEnv, node: str, direction: str, reason: str = "own_port") -> float:
    return metric_value(env.mesh.metrics(node), REJECTED, direction=direction, reason=reason)


def test_own_capture_ports_are_refused_not_looped(env: MeshEnv) -> None:
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    assert_ok("warm-up", env.connect("n1p1", target, "warm-up"), env)
    pids = {n: agent_pid(env, n) for n in env.node_names}
    fds = {n: fd_count(pid) for n, pid in pids.items()}
    counters = [("node1", "outbound"), ("node1", "inbound_plaintext"),
                ("node2", "inbound_plaintext"), ("node2", "inbound")]
    before = {c: rejected(env, *c) for c in counters}
    tls_before = rejected(env, "node2", "inbound", "tls_failure")

    # (client pod, target, node and direction that must count an own_port rejection)
    attacks = [
        # A mesh pod: its own agent (node1, outbound) refuses before tunnelling anything.
        ("n1p1", env.addr("n2p1", 15006), ("node1", "outbound")),
        ("n1p1", env.addr("n2p1", 15001), ("node1", "outbound")),
        ("n1p1", env.addr("n2p1", 15008), ("node1", "outbound")),
        ("n1p1", env.addr("n1p2", 15006), ("node1", "outbound")),
        ("n1p1", env.addr("n1p1", 15001), ("node1", "outbound")),  # its own IP
        # A pod outside the mesh (no capture): the destination's inbound capture (15006)
        # gets it with original destination 15006 / 15001.
        ("n1p3", env.addr("n2p1", 15006), ("node2", "inbound_plaintext")),
        ("n1p3", env.addr("n2p1", 15001), ("node2", "inbound_plaintext")),
        ("n1p3", env.addr("n1p2", 15006), ("node1", "inbound_plaintext")),
    ]
    want = dict.fromkeys(counters, 0.0)
    for i, (client, dst, counter) in enumerate(attacks):
        results = env.connect(client, dst, f"LOOP-{i}-" + "x" * 200, timeout=5)
        assert_failed(f"{client} -> {dst}", results, env)
        assert results[0]["ms"] < QUICK_MS, f"{client} -> {dst} was not refused at once: " \
                                            f"{results}"
        assert results[0]["bytes_received"] == 0, results
        want[counter] += 1
    # Plain TCP straight into the HBONE port from outside the mesh: not a loop (15008 is not
    # captured), the TLS handshake fails.
    results = env.connect("n1p3", env.addr("n2p1", 15008), "LOOP-hbone-plain", timeout=5)
    assert_failed("n1p3 -> n2p1:15008", results, env)
    assert results[0]["ms"] < QUICK_MS, results

    # An authorized HBONE CONNECT whose authority is the pod's own plaintext capture port:
    # a valid client certificate, sent from outside the mesh straight to 15008.
    mesh = env.mesh
    cert, key = mesh.workdir / "loop-client.pem", mesh.workdir / "loop-client-key.pem"
    issued = env.cluster.exec("fabric", [
        *NODEPROXY, "ca", "issue", "--dir", str(mesh.ca_dir),
        "--spiffe-id", "spiffe://cluster.local/ns/legacy/sa/legacy",
        "--out-cert", str(cert), "--out-key", str(key), "--force"])
    assert issued.returncode == 0, issued.stderr
    hbone = env.cluster.exec("n1p3", [
        *NODEPROXY, "hbone", "connect", env.addr("n2p1", 15008),
        "--authority", env.addr("n2p1", 15006), "--cert", str(cert), "--key", str(key),
        "--ca", str(mesh.workdir / "bundle.pem"), "--timeout", "5"], input="LOOP-connect\n")
    assert hbone.returncode == 6, f"CONNECT to the own port: exit {hbone.returncode} " \
                                  f"(want 6 = 400)\n{hbone.stderr}\n{env.logs('node2')}"
    want[("node2", "inbound")] += 1

    for counter, n in want.items():
        def grown(c: tuple[str, str] = counter) -> float:
            return rejected(env, *c) - before[c]

        def enough(c: tuple[str, str] = counter, k: float = n) -> bool:
            return grown(c) >= k

        def report(c: tuple[str, str] = counter, k: float = n) -> str:
            return (f"{REJECTED}{{reason=own_port}} on {c} grew by {grown(c)}, want {k}\n"
                    + env.logs(c[0]))

        poll(enough, 10, report)
        assert grown() == n, f"own_port rejections on {counter}: {grown()}, want {n}"
    poll(lambda: rejected(env, "node2", "inbound", "tls_failure") > tls_before, 10,
         lambda: "node2 never counted the plaintext bytes sent to 15008 as a TLS failure")

    # No chain of agent sockets is left behind: the agents' descriptors are back near the
    # baseline, and the agents are the same processes, still serving.
    for node, pid in pids.items():
        def near_baseline(p: int = pid, n: str = node) -> bool:
            return fd_count(p) <= fds[n] + FD_MARGIN

        def fd_report(p: int = pid, n: str = node) -> str:
            return f"the {n} agent holds {fd_count(p)} fds, baseline {fds[n]}\n{env.logs(n)}"

        poll(near_baseline, 10, fd_report)
        assert agent_pid(env, node) == pid, f"the agent of {node} was restarted"
        assert env.mesh.agents[node].poll() is None, f"the agent of {node} exited"
    assert_ok("after the abuse", env.connect("n1p1", target, "after"), env)
    assert server.received() == b"warm-up" + b"after", \
        f"bytes of a refused connection reached the app: {server.received()!r}"
