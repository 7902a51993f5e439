"""Pure part of the benchmark: ratios, targets and the printed table (no I/O).

A case result is a dict ``{"ok": bool, "error": str | None, "metrics": {name: float}}``.
Every ratio is ``case / reference`` for the same metric measured in the same run, so a ratio
above 1.0 means "more" (better for throughput and connections/s, worse for latency).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CASES = ("direct", "haproxy", "nodeproxy")


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = (
    Metric("tput1_gbps", "throughput, 1 stream", "Gbit/s", True),
    Metric("tput4_gbps", "throughput, 4 streams", "Gbit/s", True),
    Metric("rr_p50_us", "100 B req/resp p50", "us", False),
    Metric("rr_p99_us", "100 B req/resp p99", "us", False),
    Metric("cps", "new connections", "conn/s", True),
)


@dataclass(frozen=True, slots=True)
class Target:
    """``case/reference`` for ``metric`` must be ``>= bound`` (or ``<=`` when ``at_most``)."""

    metric: str
    case: str
    reference: str
    bound: float
    at_most: bool = False

    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}x {self.reference}"

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.at_most else ratio >= self.bound


# Issue 3's targets, printed next to the ratios, never asserted.
TARGETS = (
    Target("tput1_gbps", "nodeproxy", "haproxy", 1.0),
    Target("rr_p50_us", "nodeproxy", "haproxy", 1.2, at_most=True),
    Target("cps", "nodeproxy", "haproxy", 3.0),
)


def _value(cases: Mapping[str, Mapping[str, Any]], case: str, metric: str) -> float | None:
    res = cases.get(case)
    if not res or not res.get("ok"):
        return None
    value = res.get("metrics", {}).get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def ratio(cases: Mapping[str, Mapping[str, Any]], case: str, ref: str,
          metric: str) -> float | None:
    a, b = _value(cases, case, metric), _value(cases, ref, metric)
    if a is None or b is None:
        return None
    return a / b


def ratios(cases: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{case: {"vs_direct"|"vs_haproxy": {metric: ratio}}}`` for every pair that ran."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for i, case in enumerate(CASES):
        for ref in CASES[:i]:  # references come first: haproxy vs direct, nodeproxy vs both
            row = {m.key: r for m in METRICS if (r := ratio(cases, case, ref, m.key)) is not None}
            if row:
                out.setdefault(case, {})[f"vs_{ref}"] = row
    return out


def targets(cases: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        r = ratio(cases, t.case, t.reference, t.metric)
        out.append({
            "metric": t.metric, "case": t.case, "reference": t.reference,
            "target": t.text(), "ratio": r, "met": None if r is None else t.met(r),
        })
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "Gbit/s":
        return f"{value:.2f}"
    if unit == "us":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(cases: Mapping[str, Mapping[str, Any]]) -> str:
    """The human-readable summary: absolute figures per case, ratios, targets."""
    ran = [c for c in CASES if c in cases]
    cols = ["metric", "unit", *ran, "np/haproxy", "np/direct", "haproxy/direct", "target"]
    rows: list[list[str]] = []
    by_metric = {t.metric: t for t in TARGETS}
    for m in METRICS:
        np_h = ratio(cases, "nodeproxy", "haproxy", m.key)
        target = ""
        if m.key in by_metric:
            t = by_metric[m.key]
            verdict = "" if np_h is None else (" met" if t.met(np_h) else " MISSED")
            target = f"{t.text()}{verdict}"
        rows.append([
            m.label, m.unit, *(_fmt(_value(cases, c, m.key), m.unit) for c in ran),
            _fmt_ratio(np_h),
            _fmt_ratio(ratio(cases, "nodeproxy", "direct", m.key)),
            _fmt_ratio(ratio(cases, "haproxy", "direct", m.key)),
            target,
        ])
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, len(cols) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    for case in ran:
        res = cases[case]
        if not res.get("ok"):
            out.append(f"{case}: FAILED: {res.get('error')}")
    out.append("ratios are case/reference from this run: above 1.0x = more "
               "(better for Gbit/s and conn/s, worse for us)")
    return "\n".join(out)


def check_result_document(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a results document (used by the smoke test and by run.py itself)."""
    problems = []
    for key in ("version", "mode", "cases", "ratios", "targets", "pinning", "params"):
        if key not in doc:
            problems.append(f"missing key {key!r}")
    for name, res in doc.get("cases", {}).items():
        if name not in CASES:
            problems.append(f"unknown case {name!r}")
            continue
        if not res.get("ok"):
            continue
        for m in METRICS:
            v = res.get("metrics", {}).get(m.key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name}.{m.key} = {v!r} is not a positive number")
    return problems
