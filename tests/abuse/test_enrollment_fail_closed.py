"""Enrolment failure fails closed (root, real 2-node mesh).

Regression for 1e6fbd2: when the agent could not enroll a pod (here: the CA service is down
when the agent starts, so there is no certificate), it used to take the pod's capture rules
out again, and the pod talked plaintext.  Now the rules stay, the pod's connections are
refused until it is enrolled, and the failure is visible: ``enrollmentFailures`` in
``/config_dump``, ``nodeproxy_unenrolled_pods`` / ``nodeproxy_enrollment_failures_total``,
``NOT ENROLLED`` lines under ``nodeproxy workloads``.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshlab.mesh import NODEPROXY
from meshlab.topology import LabError
from tests.abuse.netns_mesh import (
    assert_failed,
    assert_ok,
    pod_pcap_flows,
    pod_rules,
    start_ca,
    stop_ca,
)
from tests.netns.mesh_fixtures import ROLES, MeshEnv, metric_value, poll, state_diff

pytestmark = pytest.mark.privileged

UNENROLLED = "nodeproxy_unenrolled_pods"
FAILURES = "nodeproxy_enrollment_failures_total"
NODE2_MESH_PODS = ("n2p1", "n2p2")



def dump(env: MeshEnv, node: str) -> dict[str, Any]:
    """The agent's config dump, or {} while its admin API is not up yet."""
    try:
        return env.mesh.config_dump(node)
    except LabError:
        return {}


def test_unenrolled_pods_keep_rules_and_refuse_traffic_until_enrolled(env: MeshEnv) -> None:
    server = env.serve("n2p1")
    target = env.addr("n2p1", server.port)
    node1_server = env.serve("n1p2")
    node1_target = env.addr("n1p2", node1_server.port)
    assert_ok("warm-up", env.connect("n1p1", target, "warm-up"), env)
    uids = sorted(env.mesh.config_dump("node2")["enrolled"])
    assert len(uids) == len(NODE2_MESH_PODS), uids
    rules = {pod: pod_rules(env, pod) for pod in NODE2_MESH_PODS}

    # The CA service goes away, then node2's agent restarts: it cannot get certificates.
    stop_ca(env)
    env.mesh.stop_agent("node2")
    env.mesh.start_agent("node2")

    def all_failed() -> bool:
        return sorted(dump(env, "node2").get("enrollmentFailures") or {}) == uids

    poll(all_failed, 30, lambda: f"node2 enrollmentFailures: "
                                 f"{dump(env, 'node2').get('enrollmentFailures')}, want {uids}\n"
                                 + env.logs("node2"))
    first_failures = metric_value(env.mesh.metrics("node2"), FAILURES)

    # Fail closed: the capture rules are exactly what they were.
    for pod in NODE2_MESH_PODS:
        now = pod_rules(env, pod)
        assert now == rules[pod], f"{pod} capture rules changed while not enrolled:\n" \
                                  + state_diff(rules[pod], now)

    marker = "MARKER-unenrolled-3c9e1"
    cap = env.cluster.capture("node1")
    try:
        via_mesh = env.connect("n1p1", target, marker, timeout=3)   # mesh pod -> node2 pod
        plain = env.connect("n1p3", target, marker, timeout=3)      # plaintext -> node2 pod
        outbound = env.connect("n2p2", node1_target, marker, timeout=3)  # node2 pod -> out
    finally:
        pcap = cap.stop()
    assert_failed("n1p1 -> unenrolled n2p1 (HBONE)", via_mesh, env)
    assert_failed("n1p3 -> unenrolled n2p1 (plaintext)", plain, env)
    assert_failed("unenrolled n2p2 -> n1p2", outbound, env)
    assert not pcap.contains(marker.encode()), "the marker crossed the node link in plaintext"
    flows = pod_pcap_flows(pcap)
    # What was attempted, and refused by node2's pod netns (RST), is on the link:
    assert (env.ip("n1p1"), env.ip("n2p1"), 15008) in flows, pcap.flows()
    assert (env.ip("n1p3"), env.ip("n2p1"), server.port) in flows, pcap.flows()
    for dport in (15008, server.port):
        assert any(p.src == env.ip("n2p1") and p.sport == dport and p.flags & 0x04
                   for p in pcap.packets), f"no RST from n2p1:{dport}: {pcap.flows()}"
    # The pod on node2 is refused by its own netns: nothing of it reaches the link.
    assert not any(f[0] == env.ip("n2p2") for f in flows), pcap.flows()
    assert "Refused" in str(outbound[0]["error"]), outbound
    assert server.received() == b"warm-up", "bytes reached the app of an unenrolled pod"
    assert node1_server.received() == b"", "an unenrolled pod's bytes reached n1p2"

    # ... and visibly so.
    doc = env.mesh.config_dump("node2")
    assert doc["enrolled"] == [], doc["enrolled"]
    metrics = env.mesh.metrics("node2")
    assert metric_value(metrics, UNENROLLED) == len(uids), metrics
    assert first_failures >= len(uids), metrics
    status, _ = env.mesh.http("node2", 15021, "/healthz/ready")
    assert status == 503, f"node2 readiness is {status} with no pod enrolled"
    listing = env.cluster.exec("node2", [*NODEPROXY, "workloads", "--admin", "127.0.0.1:15000"])
    assert listing.returncode == 0, listing.stderr
    not_enrolled = [ln for ln in listing.stdout.splitlines() if ln.startswith("NOT ENROLLED")]
    assert len(not_enrolled) == len(uids), listing.stdout
    for uid in uids:
        assert any(f": {uid}: " in ln for ln in not_enrolled), (uid, not_enrolled)

    # The agent keeps retrying (and counting) while the CA is down.
    poll(lambda: metric_value(env.mesh.metrics("node2"), FAILURES) > first_failures, 15,
         lambda: f"{FAILURES} did not grow past {first_failures}\n{env.logs('node2')}")

    # The CA is back: node2 enrolls its pods and traffic flows again, over mTLS.
    start_ca(env)
    env.mesh.wait_ready(45, nodes=("node2",))
    doc = env.mesh.config_dump("node2")
    assert sorted(doc["enrolled"]) == uids
    assert not doc.get("enrollmentFailures"), doc.get("enrollmentFailures")
    assert metric_value(env.mesh.metrics("node2"), UNENROLLED) == 0
    marker = "MARKER-enrolled-again-77d0"
    cap = env.cluster.capture("node1")
    try:
        again = env.connect("n1p1", target, marker)
        out_again = env.connect("n2p2", node1_target, marker)
    finally:
        pcap = cap.stop()
    assert_ok("n1p1 -> n2p1 after enrolment", again, env)
    assert_ok("n2p2 -> n1p2 after enrolment", out_again, env)
    assert server.received() == b"warm-up" + marker.encode()
    assert node1_server.received() == marker.encode()
    assert not pcap.contains(marker.encode()), "plaintext marker after enrolment"
    flows = pod_pcap_flows(pcap)
    assert (env.ip("n1p1"), env.ip("n2p1"), 15008) in flows, pcap.flows()
    assert (env.ip("n2p2"), env.ip("n1p2"), 15008) in flows, pcap.flows()
    pods = {env.ip(p) for p in ROLES}
    pod_to_pod = [f for f in pcap.flows() if f[0] in pods and f[1] in pods]
    assert all(15008 in f[2:] for f in pod_to_pod), f"pod flows not on 15008: {pod_to_pod}"
    for pod in NODE2_MESH_PODS:
        assert pod_rules(env, pod) == rules[pod]
