"""Smoke test of the end-to-end benchmark harness (``make bench``), quick mode: the L4 direct
and haproxy cases, haproxy in HTTP mode and the HTTP/2 waypoint case with 1-second loads, and
a waypoint that crashes at start.  It checks that the harness runs, that the result document
is well formed with positive figures, that failures name the log file (which is kept) and that
nothing of the run is left behind.  No timing thresholds, except that pacing never runs
faster than its rate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshlab.build import is_lab_netns, list_netns, netns_pids
from tests.bench import report
from tests.bench.harness import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--quick", "--http-seconds", "1",
         "--json", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _assert_nothing_left(prefix: str) -> None:
    # Namespaces (and so every process inside them) are gone.
    leftovers = [n for n in list_netns() if is_lab_netns(n, prefix)]
    assert leftovers == []
    assert netns_pids(leftovers) == []


def test_quick_bench_l4_and_http_cases(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "--cases", "direct,haproxy,haproxy-http1,waypoint-http2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert report.check_result_document(doc) == []
    assert doc["mode"] == "quick"
    assert sorted(doc["cases"]) == ["direct", "haproxy", "haproxy-http1", "waypoint-http2"]
    for name, case in doc["cases"].items():
        assert case["ok"], f"{name}: {case['error']}"
    for name in ("direct", "haproxy"):
        case = doc["cases"][name]
        wanted = {m.key for m in report.METRICS
                  if not (m.per_proxy and name in report.PROXYLESS)}
        assert wanted <= set(case["metrics"])
        assert case["detail"]["cps"]["connections"] > 0
        assert case["detail"]["rr"]["round_trips"] == doc["params"]["rr_count"]
    # haproxy's processes were measured (pinned, one per side).
    assert set(doc["cases"]["haproxy"]["proxy_cpu_percent"]["tput1"]) == {"client", "server"}
    assert doc["cases"]["haproxy"]["metrics"]["cps_cpu_us_server"] > 0
    assert set(doc["ratios"]["haproxy"]["vs_direct"]) == {m.key for m in report.METRICS
                                                         if not m.per_proxy}

    # HTTP through haproxy (mode http): a saturating and a paced wrk run, 1 KB responses.
    h1 = doc["cases"]["haproxy-http1"]
    assert set(h1["proxy_cpu_percent"]["load"]) == {"client", "server"}
    assert h1["detail"]["load"]["bytes_per_response"] > doc["params"]["http_body"]
    paced = h1["detail"]["paced_load"]
    assert paced["rate_target"] == doc["params"]["paced_rate"]
    assert paced["rps"] <= 1.1 * doc["params"]["paced_rate"]  # the pacing held
    # The waypoint case: its own CPU and RSS accounted, requests counted by its metrics,
    # Istio's default retry policy in force.
    h2 = doc["cases"]["waypoint-http2"]
    assert set(h2["proxy_cpu_percent"]["load"]) == {"client", "server", "waypoint"}
    evidence = h2["detail"]["waypoint"]
    assert evidence["requests_counted"] >= h2["detail"]["load"]["requests"] > 0
    assert evidence["retry"].startswith("2 retries on ")
    assert h2["detail"]["mesh_connections_opened_node1"] > 0
    verdicts = {(t["metric"], t["case"]): t["met"] for t in doc["targets"]}
    assert verdicts[("rps_per_waypoint_vcpu", "waypoint-http2")] is not None

    # Both tables were printed.
    assert "haproxy/direct" in proc.stdout
    assert "requests/s per waypoint vCPU" in proc.stdout
    _assert_nothing_left(doc["prefix"])


def test_crashing_waypoint_fails_its_case_naming_the_kept_log(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "--cases", "waypoint-http2",
                       "--waypoint-arg=--name", "--waypoint-arg=default/no-such-waypoint")
    assert proc.returncode == 1, proc.stdout[-3000:]
    case = doc["cases"]["waypoint-http2"]
    assert not case["ok"]
    log_file = Path(case["log_files"]["waypoint"])
    try:
        assert case["error"].startswith(f"waypoint (pod n2p2) exited with code 1 (log {log_file})")
        assert "no-such-waypoint" in case["error"]  # the waypoint's own words, from its log
        assert "no-such-waypoint" in log_file.read_text()  # kept after the run
        assert not (log_file.parent / "pki").exists()  # the CA key is not
        assert f"waypoint-http2: FAILED: {case['error']}" in proc.stdout
    finally:
        shutil.rmtree(log_file.parent, ignore_errors=True)
    _assert_nothing_left(doc["prefix"])
