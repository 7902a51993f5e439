"""An empty or partial config never un-enrols anything (root, real 2-node mesh).

Regression for ab1908e (the loader took an empty, whitespace-only or ``workloads``-less
document for "no workloads", and the agents un-enrolled every pod, removing its capture rules)
and b54c4cc (the watcher acted on a file still being rewritten in place, so a half-written
document could be loaded).  Each bad document is written both by atomic rename and in place
(truncate, write half, flush, write the rest, close); every agent must count a rejected reload
and keep everything: pods enrolled, rules in place, cross-node traffic over mTLS.  A valid
document rewritten in place is acted on once, complete.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from meshlab import dump_config
from tests.abuse.netns_mesh import (
    MESH_PODS,
    assert_ok,
    pod_pcap_flows,
    pod_rules,
)
from tests.netns.mesh_fixtures import MeshEnv, poll, state_diff
from ztunnel_cfg.loader import load_config_text

pytestmark = pytest.mark.privileged



# -- writers ---------------------------------------------------------------------------------

def by_rename(env: MeshEnv, text: str) -> None:
    env.mesh.write_raw_config(text)


def in_place(env: MeshEnv, text: str, while_half_written: Callable[[], None] = lambda: None,
             cut: int | None = None) -> None:
    """Truncate the config file and write ``text`` in two parts, flushed in between (a reader
    sees the first part alone); ``while_half_written`` runs at that point."""
    cut = len(text) // 2 if cut is None else cut
    with open(env.mesh.config_path, "w") as fh:
        fh.write(text[:cut])
        fh.flush()
        while_half_written()
        fh.write(text[cut:])


WRITERS: dict[str, Callable[[MeshEnv, str], None]] = {"rename": by_rename, "in-place": in_place}


def no_workloads(env: MeshEnv) -> str:
    return dump_config({k: v for k, v in env.base_doc.items() if k != "workloads"})


DOCUMENTS: dict[str, Callable[[MeshEnv], str]] = {
    "empty": lambda _env: "",
    "whitespace": lambda _env: "  \n \n\n   \n",
    "no-workloads": no_workloads,
}


# -- observations ----------------------------------------------------------------------------

def wait_reload(env: MeshEnv, before: dict[str, tuple[int, int]], *, ok: bool) -> None:
    """Wait until every agent has finished one reload after ``before``; it must have been
    exactly one, with the expected result."""
    for node in env.node_names:
        def moved(n: str = node) -> bool:
            return env.reload_counts(n) != before[n]

        def why(n: str = node) -> str:
            return f"{n} reloaded nothing (ok/failed {before[n]})\n{env.mesh.log_tail(n)}"

        poll(moved, 10, why)
        b_ok, b_failed = before[node]
        want = (b_ok + 1, b_failed) if ok else (b_ok, b_failed + 1)
        got = env.reload_counts(node)
        assert got == want, f"{node} reload counts ok/failed {before[node]} -> {got}, want " \
                            f"{want} ({'loaded' if ok else 'rejected'} once)\n" \
                            + env.mesh.log_tail(node)


def snapshot(env: MeshEnv) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    enrolled = {n: sorted(env.mesh.config_dump(n)["enrolled"]) for n in env.node_names}
    assert all(len(v) == 2 for v in enrolled.values()), enrolled
    return enrolled, {pod: pod_rules(env, pod) for pod in MESH_PODS}


def assert_still_enrolled(env: MeshEnv, enrolled: dict[str, list[str]],
                          rules: dict[str, dict[str, str]], workloads: int) -> None:
    for node in env.node_names:
        doc = env.mesh.config_dump(node)
        assert sorted(doc["enrolled"]) == enrolled[node], \
            f"{node} enrolled {doc['enrolled']}, was {enrolled[node]}\n{env.mesh.log_tail(node)}"
        assert not doc.get("enrollmentFailures"), doc.get("enrollmentFailures")
        assert len(doc.get("workloads", [])) == workloads, f"{node} has another config in force"
    for pod in MESH_PODS:
        now = pod_rules(env, pod)
        assert now == rules[pod], f"{pod} capture rules changed:\n{state_diff(rules[pod], now)}"


def assert_mtls_across(env: MeshEnv, marker: str) -> None:
    """n1p1 -> n2p1 and n2p2 -> n1p2 work, through HBONE (15008) only, marker never plain."""
    servers = {pod: env.serve(pod) for pod in ("n2p1", "n1p2")}
    cap = env.cluster.capture("node1")
    try:
        results = {
            ("n1p1", "n2p1"): env.connect("n1p1", env.addr("n2p1", servers["n2p1"].port), marker),
            ("n2p2", "n1p2"): env.connect("n2p2", env.addr("n1p2", servers["n1p2"].port), marker),
        }
    finally:
        pcap = cap.stop()
    flows = pod_pcap_flows(pcap)
    for (src, dst), res in results.items():
        assert_ok(f"{src} -> {dst}", res, env)
        assert servers[dst].received() == marker.encode()
        assert (env.ip(src), env.ip(dst), 15008) in flows, f"{src} -> {dst}: {pcap.flows()}"
        assert (env.ip(src), env.ip(dst), servers[dst].port) not in flows, pcap.flows()
    assert not pcap.contains(marker.encode()), "plaintext marker on the node link"


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_bad_document_is_rejected_and_nothing_unenrolled(env: MeshEnv, document: str,
                                                         writer: str) -> None:
    enrolled, rules = snapshot(env)
    workloads = len(env.base_doc["workloads"])
    before = {n: env.reload_counts(n) for n in env.node_names}
    env.current_doc = None  # whatever happens, the fixture restores the base config
    WRITERS[writer](env, DOCUMENTS[document](env))
    wait_reload(env, before, ok=False)

    name = env.mesh.config_path.name
    for node in env.node_names:
        errors = env.mesh.config_dump(node).get("configErrors", [])
        assert any(re.search(rf"{re.escape(name)}:1:1: .*(empty|'workloads')", e)
                   for e in errors), f"{node} configErrors: {errors}"
    assert_still_enrolled(env, enrolled, rules, workloads)
    assert_mtls_across(env, f"MARKER-{document}-{writer}")


def test_in_place_rewrite_is_acted_on_once_complete(env: MeshEnv) -> None:
    # Workloads last, so that a prefix of the file is a complete, valid document.
    base = copy.deepcopy(env.base_doc)
    full: dict[str, Any] = {k: v for k, v in base.items() if k != "workloads"}
    full["workloads"] = base["workloads"]
    full["workloads"].append({
        "uid": "cluster1//v1/Pod/legacy/extra-vm", "name": "extra-vm", "namespace": "legacy",
        "serviceAccount": "legacy", "workloadIps": ["192.0.2.10"], "node": "node1",
        "protocol": "TCP",
    })
    text = dump_config(full)
    # Cut right before node2's first workload: the first part alone is a valid document
    # (services, policies and node1's workloads), the most dangerous thing a watcher could
    # act on: node2's pods would be un-enrolled.
    first_node2 = next(w for w in full["workloads"] if w["node"] == "node2")
    cut = re.search(rf"^- uid: {re.escape(first_node2['uid'])}$", text, re.M)
    assert cut is not None, text
    assert load_config_text(text[:cut.start()]).workloads, "the first part must be valid"
    enrolled, rules = snapshot(env)
    base_workloads = len(env.base_doc["workloads"])
    before = {n: env.reload_counts(n) for n in env.node_names}
    env.current_doc = full

    def half_written() -> None:
        # While only the first part is on disk, the mesh works on the old config.
        assert_mtls_across(env, "MARKER-half-written")
        assert_still_enrolled(env, enrolled, rules, base_workloads)

    in_place(env, text, half_written, cut=cut.start())
    wait_reload(env, before, ok=True)
    for node in env.node_names:
        def complete(n: str = node) -> bool:
            return len(env.mesh.config_dump(n).get("workloads", [])) == len(full["workloads"])

        def why(n: str = node) -> str:
            return f"{n} is not on the complete document\n{env.mesh.log_tail(n)}"

        poll(complete, 10, why)
        assert "configErrors" not in env.mesh.config_dump(node)
    assert_still_enrolled(env, enrolled, rules, len(full["workloads"]))
    assert_mtls_across(env, "MARKER-complete")
