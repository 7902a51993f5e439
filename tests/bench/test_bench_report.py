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
