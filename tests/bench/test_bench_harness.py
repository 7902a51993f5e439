"""The harness's pure parts: the bench configs (checked with the real loader and explain),
/proc and Prometheus text parsing, error messages that name the log file, run.py's options
and the logs it keeps after a failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshlab import ClusterSpec, dump_config, plan_cluster
from tests.bench import harness, run
from tests.bench.harness import Params
from ztunnel_cfg.explain import HttpQuery, explain
from ztunnel_cfg.snapshot import load_snapshot

PLAN = plan_cluster(ClusterSpec("nbtest-", nodes=2, pods_per_node=2))


def _workloads(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in doc["workloads"]}


@pytest.mark.parametrize("waypoint", [False, True], ids=["l4-config", "waypoint-config"])
def test_bench_config_loads_and_routes_the_http_service(waypoint: bool, tmp_path: Path) -> None:
    doc = harness.bench_config(PLAN, waypoint=waypoint)
    path = tmp_path / "cluster.yaml"
    path.write_text(dump_config(doc))
    snapshot = load_snapshot(path)  # the loader's cross-checks pass
    for port in harness.HTTP_SERVICE_PORTS:
        plan = explain(snapshot, f"default/{harness.CLIENT_POD}", f"{harness.HTTP_VIP}:{port}",
                       HttpQuery("GET", "/"))
        assert (plan.l7 is not None) is waypoint
        if plan.l7 is not None:
            assert plan.l7.answer is None  # forwarded, not answered by the waypoint
            assert plan.l7.retry.startswith("2 retries on ")  # Istio's default is in force
            assert [b.service for b in plan.l7.backends] == [
                f"default/{harness.HTTP_SERVICE}.default.svc.cluster.local"]
    workloads = _workloads(doc)
    # Only the waypoint config puts the waypoint's pod in the mesh (see bench_config).
    assert (workloads[harness.WAYPOINT_NAME]["protocol"] == "HBONE") is waypoint
    assert workloads[harness.IDLE_POD]["protocol"] == "TCP"
    assert ("waypoints" in doc) is waypoint


def test_l4_config_sends_pod_ip_traffic_to_the_agents_not_a_waypoint(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(dump_config(harness.bench_config(PLAN, waypoint=False)))
    server_ip = PLAN.pod(harness.SERVER_POD).ip
    plan = explain(load_snapshot(path), f"default/{harness.CLIENT_POD}",
                   f"{server_ip}:{harness.ECHO_PORT}", HttpQuery("GET", "/"))
    assert plan.l7 is None
    assert plan.verdict.name == "ALLOWED"


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("Name:\tpython\nVmPeak:\t 90000 kB\nVmRSS:\t   61440 kB\n", 60.0, id="rss"),
    pytest.param("Name:\tkthreadd\nState:\tS\n", None, id="kernel-thread-has-none"),
    pytest.param("VmRSS:\t?\n", None, id="garbled"),
])
def test_rss_mib(text: str, expected: float | None) -> None:
    assert harness.rss_mib(text) == expected


METRICS_TEXT = """# HELP istio_requests_total Requests
# TYPE istio_requests_total counter
istio_requests_total{reporter="waypoint",response_code="200",flags="-"} 120.0
istio_requests_total{reporter="waypoint",response_code="503",flags="UO"} 3.0
istio_requests_total{reporter="destination",response_code="200",flags="-"} 7.0
istio_requests_total_created{reporter="waypoint"} 1.7e9
nodeproxy_waypoint_retries_total 2.0
"""


@pytest.mark.parametrize(("name", "labels", "expected"), [
    pytest.param("istio_requests_total", {}, 130.0, id="all-series-not-_created"),
    pytest.param("istio_requests_total", {"reporter": "waypoint"}, 123.0, id="one-label"),
    pytest.param("istio_requests_total", {"reporter": "waypoint", "response_code": "200"},
                 120.0, id="two-labels"),
    pytest.param("istio_requests_total", {"reporter": "nobody"}, 0.0, id="no-match"),
    pytest.param("nodeproxy_waypoint_retries_total", {}, 2.0, id="no-labels"),
])
def test_metric_sum(name: str, labels: dict[str, str], expected: float) -> None:
    assert harness.metric_sum(METRICS_TEXT, name, **labels) == expected


@pytest.mark.parametrize(("message", "parts"), [
    pytest.param(harness.exited_message("waypoint (pod n2p2)", 1, Path("/w/waypoint.log"),
                                        "error: no waypoint 'x'"),
                 ["waypoint (pod n2p2) exited with code 1", "log /w/waypoint.log",
                  "error: no waypoint 'x'"], id="exited"),
    pytest.param(harness.exited_message("agent on node1", -9, Path("/w/a.log"), ""),
                 ["code -9", "log /w/a.log", "(empty log)"], id="exited-empty-log"),
    pytest.param(harness.not_ready_message("waypoint (pod n2p2)", 20, "HTTP 503 starting",
                                           Path("/w/waypoint.log"), "serving"),
                 ["waypoint (pod n2p2) not ready after 20s", "(HTTP 503 starting)",
                  "log /w/waypoint.log"], id="not-ready"),
    pytest.param(harness.not_ready_message("w", 20, "", Path("/w/w.log"), ""),
                 ["(no answer)", "log /w/w.log", "(empty log)"], id="not-ready-silent"),
])
def test_failure_messages_name_the_log_file(message: str, parts: list[str]) -> None:
    for part in parts:
        assert part in message


@pytest.mark.parametrize(("quick", "http_seconds", "expected"), [
    pytest.param(False, None, 5, id="full"),
    pytest.param(True, None, 2, id="quick"),
    pytest.param(True, 1, 1, id="override"),
])
def test_http_seconds(quick: bool, http_seconds: int | None, expected: int) -> None:
    assert Params.for_mode(quick, http_seconds).http_seconds == expected


def test_cases_run_in_canonical_order_and_unknown_ones_are_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = run.parse_args(["--cases", "waypoint-http1,direct,haproxy-http1,l4-http1"])
    assert args.cases == ["direct", "haproxy-http1", "l4-http1", "waypoint-http1"]
    with pytest.raises(SystemExit):
        run.parse_args(["--cases", "waypoint-http3"])
    assert "unknown ['waypoint-http3']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--http-seconds", "0"])


def test_failed_run_keeps_only_the_logs(tmp_path: Path) -> None:
    (tmp_path / "pki" / "ca").mkdir(parents=True)
    (tmp_path / "pki" / "ca" / "ca.key").write_text("secret")
    for name in ("waypoint.log", "agent-node1.log", "cluster.yaml", "h2load-requests.log"):
        (tmp_path / name).write_text(name)
    kept = run.keep_logs(tmp_path)
    assert [p.name for p in kept] == ["agent-node1.log", "h2load-requests.log", "waypoint.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in kept]
