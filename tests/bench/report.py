"""Pure part of the benchmark: ratios, targets and the printed tables (no I/O).

A case result is a dict ``{"ok": bool, "error": str | None, "metrics": {name: float}}``.
L4 cases (direct, haproxy, nodeproxy): every ratio is ``case / reference`` for the same metric
measured in the same run, so a ratio above 1.0 means "more" (better for throughput and
connections/s, worse for latency).  L7 cases (haproxy-http1, l4-http1, waypoint-http1,
waypoint-http2): absolute figures, the waypoint's added latency over l4-http1 (a difference,
may be negative within noise) and issue 12's absolute limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# eBPF cases (issue 14): nodeproxy-ebpf is the nodeproxy case with --redirect ebpf; the
# same-node cases connect pod A to a mesh pod on its own node (HBONE over the node bridge),
# without and with the sk_msg fast path on the app <-> agent hop.
EBPF_CASES = ("nodeproxy-ebpf", "same-node-ebpf", "same-node-fastpath")
L4_CASES = ("direct", "haproxy", "nodeproxy", *EBPF_CASES)
HTTP_CASES = ("haproxy-http1", "l4-http1", "waypoint-http1", "waypoint-http2")
# Run order: haproxy cases before any agent case, since agents leave capture rules in the pods
# (traffic fails closed) until the namespaces are deleted; eBPF cases last (the rule modes'
# leftovers are removed before them).
CASES = ("direct", "haproxy", "haproxy-http1", "nodeproxy", "l4-http1", "waypoint-http1",
         "waypoint-http2", *EBPF_CASES)
# Cases whose bulk (iperf3) measurements may fail without failing the case: with the sk_msg
# fast path, a sender faster than its receiver gets ENOMEM from the kernel's sockmap ingress
# redirect (bpf/README.md); the failure is recorded in the case's detail.
BULK_MAY_FAIL = ("same-node-fastpath",)
# (case, reference) pairs whose ratios are reported.
RATIO_PAIRS = (
    ("haproxy", "direct"), ("nodeproxy", "direct"), ("nodeproxy", "haproxy"),
    ("nodeproxy-ebpf", "direct"), ("nodeproxy-ebpf", "nodeproxy"),
    ("same-node-fastpath", "same-node-ebpf"),
)
PROXYLESS = ("direct",)  # cases with no proxy process (no per-proxy CPU figures)
L4_REFERENCE = "l4-http1"  # the waypoint's added latency is measured over this path


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    per_proxy: bool = False  # measured on the proxies: a case without proxies has none


METRICS = (
    Metric("tput1_gbps", "throughput, 1 stream", "Gbit/s", True),
    Metric("tput4_gbps", "throughput, 4 streams", "Gbit/s", True),
    Metric("rr_p50_us", "100 B req/resp p50", "us", False),
    Metric("rr_p99_us", "100 B req/resp p99", "us", False),
    Metric("cps", "new connections", "conn/s", True),
    # CPU cost per unit of work, per proxy process (client side: pod A's node; server side).
    Metric("tput1_cpu_s_per_gib_client", "client proxy CPU per GiB", "CPU s", False, True),
    Metric("tput1_cpu_s_per_gib_server", "server proxy CPU per GiB", "CPU s", False, True),
    Metric("rr_cpu_us_client", "client proxy CPU per round trip", "CPU us", False, True),
    Metric("rr_cpu_us_server", "server proxy CPU per round trip", "CPU us", False, True),
    Metric("cps_cpu_us_client", "client proxy CPU per connection", "CPU us", False, True),
    Metric("cps_cpu_us_server", "server proxy CPU per connection", "CPU us", False, True),
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
    for case, ref in RATIO_PAIRS:
        row = {m.key: r for m in METRICS if (r := ratio(cases, case, ref, m.key)) is not None}
        if row:
            out.setdefault(case, {})[f"vs_{ref}"] = row
    return out


def targets(cases: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every target with its verdict: issue 3's ratios (``ratio`` to ``reference``; ``value``
    is the case's figure) and issue 12's limits on ``value`` (``ratio`` None); ``met`` is
    None when a case it needs did not run or failed."""
    out = []
    for t in TARGETS:
        r = ratio(cases, t.case, t.reference, t.metric)
        out.append({
            "metric": t.metric, "case": t.case, "reference": t.reference,
            "target": t.text(), "value": _value(cases, t.case, t.metric), "ratio": r,
            "met": None if r is None else t.met(r),
        })
    for limit in LIMITS:
        v = limit_value(cases, limit)
        out.append({
            "metric": limit.metric, "case": limit.case, "reference": limit.reference,
            "target": limit.text(), "value": v, "ratio": None,
            "met": None if v is None else limit.met(v),
        })
    return out


# -- L7 (issue 12) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpMetric:
    key: str
    label: str
    unit: str
    cases: tuple[str, ...] = HTTP_CASES  # where it is measured (others show "")


HTTP1 = ("haproxy-http1", "l4-http1", "waypoint-http1")
WAYPOINTS = ("waypoint-http1", "waypoint-http2")
HTTP_METRICS = (
    HttpMetric("rps", "requests/s", "req/s"),
    HttpMetric("p50_us", "p50 latency", "us"),
    HttpMetric("p99_us", "p99 latency", "us"),
    HttpMetric("added_p50_us", "added p50 over l4-http1", "us", ("haproxy-http1",
                                                                  "waypoint-http1")),
    HttpMetric("client_proxy_cpu", "client-side proxy CPU", "%"),
    HttpMetric("server_proxy_cpu", "server-side proxy CPU", "%"),
    HttpMetric("waypoint_cpu", "waypoint CPU", "%", WAYPOINTS),
    HttpMetric("waypoint_rss_idle_mib", "waypoint RSS when ready (idle)", "MiB", WAYPOINTS),
    HttpMetric("waypoint_rss_mib", "waypoint RSS (peak)", "MiB", WAYPOINTS),
    HttpMetric("rps_per_waypoint_vcpu", "requests/s per waypoint vCPU", "req/s", WAYPOINTS),
    HttpMetric("paced_rps", "paced: rate achieved", "req/s", HTTP1),
    HttpMetric("paced_p50_us", "paced: p50 latency", "us", HTTP1),
    HttpMetric("paced_p99_us", "paced: p99 latency", "us", HTTP1),
    HttpMetric("paced_added_p50_us", "paced: added p50 over l4-http1", "us",
               ("haproxy-http1", "waypoint-http1")),
    HttpMetric("paced_client_proxy_cpu", "paced: client-side proxy CPU", "%", HTTP1),
    HttpMetric("paced_server_proxy_cpu", "paced: server-side proxy CPU", "%", HTTP1),
    HttpMetric("paced_waypoint_cpu", "paced: waypoint CPU", "%", ("waypoint-http1",)),
    HttpMetric("paced_waypoint_rss_mib", "paced: waypoint RSS (peak)", "MiB",
               ("waypoint-http1",)),
    HttpMetric("paced_rps_per_waypoint_vcpu", "paced: requests/s per waypoint vCPU", "req/s",
               ("waypoint-http1",)),
)
# What an HTTP case must have measured when it reports ok (derived figures excluded).
HTTP_REQUIRED: dict[str, tuple[str, ...]] = {
    case: tuple(m.key for m in HTTP_METRICS
                if case in m.cases and "added" not in m.key)
    for case in HTTP_CASES
}
DERIVED = {"added_p50_us": "p50_us", "paced_added_p50_us": "paced_p50_us"}


@dataclass(frozen=True, slots=True)
class Limit:
    """``metric`` of ``case`` must be ``>= bound`` (or ``<=`` when ``at_most``): issue 12's
    absolute targets, printed never asserted."""

    metric: str
    case: str
    bound: float
    unit: str
    at_most: bool = False
    reference: str | None = None  # for differences: the case subtracted

    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:,.0f} {self.unit}"

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


LIMITS = (
    # Istio 1.24 publishes 0.25 vCPU per 1,000 rps for a waypoint: 4,000 req/s per vCPU.
    Limit("rps_per_waypoint_vcpu", "waypoint-http1", 4000, "req/s"),
    Limit("rps_per_waypoint_vcpu", "waypoint-http2", 4000, "req/s"),
    Limit("paced_rps_per_waypoint_vcpu", "waypoint-http1", 4000, "req/s"),  # Istio's own rate
    # Added latency: the saturated pair shows the throughput gap too (closed loop: latency =
    # connections / rate); the paced pair at 1,000 req/s is what the waypoint adds to a request.
    Limit("added_p50_us", "waypoint-http1", 1000, "us", at_most=True, reference=L4_REFERENCE),
    Limit("paced_added_p50_us", "waypoint-http1", 1000, "us", at_most=True,
          reference=L4_REFERENCE),
    Limit("paced_waypoint_rss_mib", "waypoint-http1", 60, "MiB", at_most=True),
)


def http_value(cases: Mapping[str, Mapping[str, Any]], case: str, key: str) -> float | None:
    """A measured or derived L7 figure; derived differences may be zero or negative."""
    if key in DERIVED:
        a, b = (_value(cases, case, DERIVED[key]), _value(cases, L4_REFERENCE, DERIVED[key]))
        return None if a is None or b is None else a - b
    return _value(cases, case, key)


def limit_value(cases: Mapping[str, Mapping[str, Any]], limit: Limit) -> float | None:
    return http_value(cases, limit.case, limit.metric)


def _fmt_http(value: float | None, unit: str, signed: bool) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:+,.0f}" if signed else f"{value:,.0f}"


def http_table(cases: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """The L7 summary: one column per HTTP case that ran, issue 12's limits with verdicts."""
    ran = [c for c in HTTP_CASES if c in cases]
    cols = ["metric", "unit", *ran, "target"]
    limits: dict[str, list[Limit]] = {}
    for limit in LIMITS:
        limits.setdefault(limit.metric, []).append(limit)
    rows: list[list[str]] = []
    for m in HTTP_METRICS:
        if not any(c in m.cases for c in ran):
            continue
        target = ""
        if m.key in limits:
            verdicts = []
            for limit in limits[m.key]:
                v = limit_value(cases, limit)
                if v is not None and limit.case in ran:
                    verdicts.append(f"{limit.case} {'met' if limit.met(v) else 'MISSED'}")
            target = limits[m.key][0].text() + (f": {', '.join(verdicts)}" if verdicts else "")
        rows.append([m.label, m.unit, *(
            _fmt_http(http_value(cases, c, m.key), m.unit, m.key in DERIVED)
            if c in m.cases else "" for c in ran), target])
    out = _grid(cols, rows)
    if any(c in cases for c in EBPF_CASES):
        out += ["", *ebpf_table(cases)]
    for case in ran:
        res = cases[case]
        if not res.get("ok"):
            out.append(f"{case}: FAILED: {res.get('error')}")
    out += http_notes(cases, params)
    return "\n".join(out)


def http_notes(cases: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> list[str]:
    """How the L7 figures were taken, and what the waypoint had on while they were."""
    conns = params.get("http_connections", "?")
    notes = [
        f"load: HTTP/1.1 keep-alive, {params.get('http_body', '?')} B responses, wrk -t1 "
        f"-c{conns} for {params.get('http_seconds', '?')} s; HTTP/2: h2load (h2c, prior "
        f"knowledge) -c{params.get('h2_clients', '?')} -m{params.get('h2_streams', '?')}; "
        f"paced: wrk -c{conns} held to {params.get('paced_rate', '?')} req/s (wrk_bench.lua)",
        "added p50 = case p50 - l4-http1 p50 in this run; saturated runs are closed loop "
        "(latency = connections / rate), the paced pair is the per-request cost",
        "requests/s per waypoint vCPU = requests / waypoint CPU-seconds over the same run",
    ]
    for case in ("waypoint-http1", "waypoint-http2"):
        res = cases.get(case)
        evidence = (res or {}).get("detail", {}).get("waypoint")
        if res and res.get("ok") and evidence:
            notes.append(
                f"{case}: retries ON ({evidence.get('retry')}; "
                f"{evidence.get('retries', 0):,.0f} retried), metrics ON "
                f"(istio_requests_total{{reporter=\"waypoint\"}} counted "
                f"{evidence.get('requests_counted', 0):,.0f}), access log ON")
    return notes


def table(cases: Mapping[str, Mapping[str, Any]],
          params: Mapping[str, Any] | None = None) -> str:
    """The human-readable summary: the L4 table (absolute figures, ratios, targets) for the
    L4 cases that ran, then the L7 table for the HTTP cases that ran."""
    parts = []
    if any(c in cases for c in L4_CASES):
        parts.append(l4_table(cases))
    if any(c in cases for c in HTTP_CASES):
        parts.append(http_table(cases, params or {}))
    return "\n\n".join(parts)


def _grid(cols: list[str], rows: list[list[str]]) -> list[str]:
    """Header, rule and rows; label, unit and target columns left-aligned, figures right."""
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, len(cols) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)]


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


def l4_table(cases: Mapping[str, Mapping[str, Any]]) -> str:
    """Absolute figures per L4 case, ratios, issue 3's targets."""
    ran = [c for c in L4_CASES if c in cases]
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
    out = _grid(cols, rows)
    if any(c in cases for c in EBPF_CASES):
        out += ["", *ebpf_table(cases)]
    for case in ran:
        res = cases[case]
        if not res.get("ok"):
            out.append(f"{case}: FAILED: {res.get('error')}")
    out.append("ratios are case/reference from this run: above 1.0x = more "
               "(better for Gbit/s and conn/s, worse for us)")
    return "\n".join(out)


def ebpf_table(cases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The eBPF ratios: eBPF vs iptables capture, the fast path vs none (same node)."""
    pairs = [("nodeproxy-ebpf", "nodeproxy"), ("nodeproxy-ebpf", "direct"),
             ("same-node-fastpath", "same-node-ebpf")]
    cols = ["metric", "unit", *(f"{a}/{b}" for a, b in pairs), ""]
    rows = [[m.label, m.unit, *(_fmt_ratio(ratio(cases, a, b, m.key)) for a, b in pairs), ""]
            for m in METRICS]
    return _grid(cols, rows)


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
        required = HTTP_REQUIRED[name] if name in HTTP_REQUIRED else tuple(
            m.key for m in METRICS if not (name in BULK_MAY_FAIL and m.key.startswith("tput"))
            and not m.per_proxy)  # a side's proxy may carry nothing (same-node cases)
        for key in required:
            v = res.get("metrics", {}).get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name}.{key} = {v!r} is not a positive number")
    return problems
