"""The benchmark's pure reporting: ratios, targets, table, document check."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.bench import report


def _case(**metrics: float) -> dict[str, Any]:
    return {"ok": True, "error": None, "metrics": metrics}


FULL = {
    "direct": _case(tput1_gbps=10.0, tput4_gbps=20.0, rr_p50_us=50.0, rr_p99_us=100.0,
                    cps=4000.0),
    "haproxy": _case(tput1_gbps=4.0, tput4_gbps=5.0, rr_p50_us=200.0, rr_p99_us=300.0,
                     cps=500.0),
    "nodeproxy": _case(tput1_gbps=5.0, tput4_gbps=5.0, rr_p50_us=250.0, rr_p99_us=900.0,
                       cps=1000.0),
}


def test_ratios_are_case_over_reference() -> None:
    r = report.ratios(FULL)
    assert r["nodeproxy"]["vs_haproxy"]["tput1_gbps"] == pytest.approx(1.25)
    assert r["nodeproxy"]["vs_direct"]["rr_p50_us"] == pytest.approx(5.0)
    assert r["haproxy"]["vs_direct"]["cps"] == pytest.approx(0.125)
    assert "direct" not in r
    assert "vs_haproxy" not in r["haproxy"]


@pytest.mark.parametrize(
    ("metric", "value", "met"),
    [
        ("tput1_gbps", 4.0, True),     # 1.0x haproxy is enough
        ("tput1_gbps", 3.9, False),
        ("rr_p50_us", 240.0, True),    # 1.2x haproxy latency allowed
        ("rr_p50_us", 241.0, False),
        ("cps", 1500.0, True),         # 3x haproxy
        ("cps", 1499.0, False),
    ],
)
def test_targets(metric: str, value: float, met: bool) -> None:
    cases = {k: {**v, "metrics": dict(v["metrics"])} for k, v in FULL.items()}
    cases["nodeproxy"]["metrics"][metric] = value
    [t] = [t for t in report.targets(cases) if t["metric"] == metric]
    assert t["met"] is met


def test_failed_or_missing_case_gives_no_ratio_and_no_verdict() -> None:
    cases = {**FULL, "nodeproxy": {"ok": False, "error": "agent died", "metrics": {}}}
    assert "nodeproxy" not in report.ratios(cases)
    assert all(t["ratio"] is None and t["met"] is None for t in report.targets(cases))
    text = report.table(cases)
    assert "nodeproxy: FAILED: agent died" in text
    assert "MISSED" not in text
    assert " met" not in text


def test_table_shows_figures_ratios_and_verdicts() -> None:
    text = report.table(FULL)
    tput = next(line for line in text.splitlines() if line.startswith("throughput, 1 stream"))
    assert "10.00" in tput
    assert "1.25x" in tput
    assert ">= 1x haproxy met" in tput
    cps = next(line for line in text.splitlines() if line.startswith("new connections"))
    assert "2.00x" in cps
    assert "MISSED" in cps


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, None, "7"])
def test_document_check_rejects_non_positive_figures(bad: object) -> None:
    doc: dict[str, Any] = {
        "version": 1, "mode": "quick", "ratios": {}, "targets": [], "pinning": {}, "params": {},
        "cases": {"direct": {"ok": True, "metrics": {**FULL["direct"]["metrics"], "cps": bad}}},
    }
    assert report.check_result_document(doc) == [f"direct.cps = {bad!r} is not a positive number"]
    doc["cases"]["direct"]["metrics"]["cps"] = 1.0
    assert report.check_result_document(doc) == []
    del doc["ratios"]
    assert report.check_result_document(doc) == ["missing key 'ratios'"]


# -- L7 (issue 12) ------------------------------------------------------------------------------

HTTP = {
    "haproxy-http1": _case(rps=20000.0, p50_us=700.0, p99_us=2000.0, client_proxy_cpu=60.0,
                           server_proxy_cpu=55.0, paced_rps=1000.0, paced_p50_us=400.0,
                           paced_p99_us=900.0, paced_client_proxy_cpu=10.0,
                           paced_server_proxy_cpu=9.0),
    "l4-http1": _case(rps=12000.0, p50_us=1000.0, p99_us=3000.0, client_proxy_cpu=60.0,
                      server_proxy_cpu=65.0, paced_rps=1000.0, paced_p50_us=500.0,
                      paced_p99_us=1500.0, paced_client_proxy_cpu=18.0,
                      paced_server_proxy_cpu=19.0),
    "waypoint-http1": _case(rps=3000.0, p50_us=5000.0, p99_us=9000.0, client_proxy_cpu=20.0,
                            server_proxy_cpu=20.0, waypoint_cpu=75.0, waypoint_rss_idle_mib=50.0,
                            waypoint_rss_mib=70.0, rps_per_waypoint_vcpu=4000.0,
                            paced_rps=995.0, paced_p50_us=1500.0, paced_p99_us=4000.0,
                            paced_client_proxy_cpu=19.0, paced_server_proxy_cpu=16.0,
                            paced_waypoint_cpu=25.0, paced_waypoint_rss_mib=60.0,
                            paced_rps_per_waypoint_vcpu=3980.0),
    "waypoint-http2": _case(rps=1100.0, p50_us=30000.0, p99_us=80000.0, client_proxy_cpu=17.0,
                            server_proxy_cpu=9.0, waypoint_cpu=70.0, waypoint_rss_idle_mib=50.0,
                            waypoint_rss_mib=76.0, rps_per_waypoint_vcpu=1500.0),
}
PARAMS = {"http_body": 1024, "http_connections": 16, "http_seconds": 5, "h2_clients": 4,
          "h2_streams": 10, "paced_rate": 1000}


def _verdicts(cases: dict[str, Any]) -> dict[tuple[str, str], bool | None]:
    return {(t["metric"], t["case"]): t["met"] for t in report.targets(cases)
            if t["metric"] not in {m.key for m in report.METRICS}}


def _with(case: str, **metrics: float) -> dict[str, Any]:
    cases = {k: {**v, "metrics": dict(v["metrics"])} for k, v in HTTP.items()}
    cases[case]["metrics"].update(metrics)
    return cases


@pytest.mark.parametrize(("case", "metrics", "key", "met"), [
    pytest.param("waypoint-http1", {}, ("rps_per_waypoint_vcpu", "waypoint-http1"), True,
                 id="4000-per-vcpu-is-enough"),
    pytest.param("waypoint-http1", {"rps_per_waypoint_vcpu": 3999.0},
                 ("rps_per_waypoint_vcpu", "waypoint-http1"), False, id="3999-per-vcpu"),
    pytest.param("waypoint-http2", {}, ("rps_per_waypoint_vcpu", "waypoint-http2"), False,
                 id="http2-per-vcpu-missed"),
    pytest.param("waypoint-http1", {}, ("paced_rps_per_waypoint_vcpu", "waypoint-http1"),
                 False, id="paced-per-vcpu-3980"),
    pytest.param("waypoint-http1", {"paced_p50_us": 1500.0},
                 ("paced_added_p50_us", "waypoint-http1"), True, id="paced-added-1ms-is-ok"),
    pytest.param("waypoint-http1", {"paced_p50_us": 1501.0},
                 ("paced_added_p50_us", "waypoint-http1"), False, id="paced-added-over-1ms"),
    pytest.param("waypoint-http1", {}, ("added_p50_us", "waypoint-http1"), False,
                 id="saturated-added-4ms"),
    pytest.param("waypoint-http1", {"p50_us": 900.0}, ("added_p50_us", "waypoint-http1"),
                 True, id="faster-than-l4-is-negative-and-met"),
    pytest.param("waypoint-http1", {}, ("paced_waypoint_rss_mib", "waypoint-http1"), True,
                 id="rss-60-is-ok"),
    pytest.param("waypoint-http1", {"paced_waypoint_rss_mib": 60.1},
                 ("paced_waypoint_rss_mib", "waypoint-http1"), False, id="rss-over-60"),
])
def test_l7_limits(case: str, metrics: dict[str, float], key: tuple[str, str],
                   met: bool) -> None:
    assert _verdicts(_with(case, **metrics))[key] is met


def test_added_latency_needs_the_l4_reference() -> None:
    cases = {**HTTP, "l4-http1": {"ok": False, "error": "agent died", "metrics": {}}}
    verdicts = _verdicts(cases)
    assert verdicts[("added_p50_us", "waypoint-http1")] is None
    assert verdicts[("paced_added_p50_us", "waypoint-http1")] is None
    assert verdicts[("rps_per_waypoint_vcpu", "waypoint-http1")] is True  # needs no reference
    [added] = [t for t in report.targets(cases) if t["metric"] == "added_p50_us"]
    assert added == {"metric": "added_p50_us", "case": "waypoint-http1",
                     "reference": "l4-http1", "target": "<= 1,000 us", "value": None,
                     "ratio": None, "met": None}


def _row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(label + "  "))


def test_http_table_shows_figures_differences_and_verdicts() -> None:
    cases = {**HTTP, "waypoint-http1": {**HTTP["waypoint-http1"], "detail": {"waypoint": {
        "retry": "2 retries on connect-failure", "retries": 0.0,
        "requests_counted": 12345.0}}}}
    text = report.table(cases, PARAMS)
    header = text.splitlines()[0]
    assert header.split()[2:6] == ["haproxy-http1", "l4-http1", "waypoint-http1",
                                   "waypoint-http2"]
    assert "np/haproxy" not in text  # no L4 case ran: no L4 table
    assert "20,000" in _row(text, "requests/s")
    added = _row(text, "added p50 over l4-http1")
    assert "-300" in added  # haproxy-http1 is faster than l4-http1: a signed difference
    assert "+4,000" in added
    assert "<= 1,000 us: waypoint-http1 MISSED" in added
    assert ("<= 1,000 us: waypoint-http1 met"
            in _row(text, "paced: added p50 over l4-http1"))
    per_vcpu = _row(text, "requests/s per waypoint vCPU")
    assert ">= 4,000 req/s: waypoint-http1 met, waypoint-http2 MISSED" in per_vcpu
    assert "75%" in _row(text, "waypoint CPU")
    assert "60.0" in _row(text, "paced: waypoint RSS (peak)")
    assert ("waypoint-http1: retries ON (2 retries on connect-failure; 0 retried), metrics ON "
            "(istio_requests_total{reporter=\"waypoint\"} counted 12,345), access log ON"
            in text)
    assert "wrk -t1 -c16 for 5 s" in text
    assert "h2load (h2c, prior knowledge) -c4 -m10" in text


def test_table_has_both_parts_when_both_ran_and_metrics_only_where_measured() -> None:
    text = report.table({**FULL, **HTTP}, PARAMS)
    assert "np/haproxy" in text
    assert "waypoint-http2" in text
    # A paced row has no cell for waypoint-http2 (h2load is not paced) and no "-" either.
    paced = _row(text, "paced: rate achieved")
    assert paced.split()[-3:] == ["1,000", "1,000", "995"]


def test_http_failed_case_is_listed_without_verdicts() -> None:
    cases = {"l4-http1": HTTP["l4-http1"],
             "waypoint-http1": {"ok": False, "error": "waypoint (pod n2p2) exited with code 1 "
                                                      "(log /tmp/w/waypoint.log)",
                                "metrics": {}}}
    text = report.table(cases, PARAMS)
    assert "waypoint-http1: FAILED: waypoint (pod n2p2) exited with code 1 " \
           "(log /tmp/w/waypoint.log)" in text
    assert "MISSED" not in text
    assert " met" not in text


@pytest.mark.parametrize(("case", "key"), [
    pytest.param("haproxy-http1", "paced_rps", id="http1-needs-the-paced-run"),
    pytest.param("waypoint-http1", "paced_waypoint_rss_mib", id="waypoint-rss-at-1000"),
    pytest.param("waypoint-http2", "rps_per_waypoint_vcpu", id="waypoint-cpu-figure"),
    pytest.param("l4-http1", "rps", id="requests-per-second"),
])
def test_document_check_requires_the_http_figures(case: str, key: str) -> None:
    doc: dict[str, Any] = {"version": 1, "mode": "quick", "ratios": {}, "targets": [],
                           "pinning": {}, "params": {}, "cases": _with(case)}
    assert report.check_result_document(doc) == []
    del doc["cases"][case]["metrics"][key]
    assert report.check_result_document(doc) == [f"{case}.{key} = None is not a positive number"]


def test_l4_required_metrics_do_not_apply_to_http_cases() -> None:
    assert "tput1_gbps" not in report.HTTP_REQUIRED["l4-http1"]
    assert "paced_rps" not in report.HTTP_REQUIRED["waypoint-http2"]
    assert "added_p50_us" not in report.HTTP_REQUIRED["waypoint-http1"]  # derived, may be < 0


EBPF = {
    **FULL,
    "nodeproxy-ebpf": _case(tput1_gbps=2.5, tput4_gbps=5.0, rr_p50_us=200.0, rr_p99_us=900.0,
                            cps=1500.0),
    "same-node-ebpf": _case(tput1_gbps=2.0, tput4_gbps=2.0, rr_p50_us=300.0,
                            rr_p99_us=600.0, cps=500.0),
    "same-node-fastpath": _case(tput1_gbps=3.0, tput4_gbps=2.0, rr_p50_us=150.0,
                                rr_p99_us=600.0, cps=500.0),
}


@pytest.mark.parametrize(("case", "ref", "metric", "want"), [
    ("nodeproxy-ebpf", "nodeproxy", "tput1_gbps", 0.5),
    ("nodeproxy-ebpf", "nodeproxy", "cps", 1.5),
    ("nodeproxy-ebpf", "direct", "rr_p50_us", 4.0),
    ("same-node-fastpath", "same-node-ebpf", "tput1_gbps", 1.5),
    ("same-node-fastpath", "same-node-ebpf", "rr_p50_us", 0.5),
])
def test_ebpf_ratios(case: str, ref: str, metric: str, want: float) -> None:
    assert report.ratios(EBPF)[case][f"vs_{ref}"][metric] == pytest.approx(want)


def test_table_shows_the_ebpf_ratios_only_when_an_ebpf_case_ran() -> None:
    assert "same-node-fastpath/same-node-ebpf" not in report.table(FULL)
    text = report.table(EBPF)
    assert "nodeproxy-ebpf/nodeproxy" in text
    assert "same-node-fastpath/same-node-ebpf" in text
    assert "1.50x" in text
