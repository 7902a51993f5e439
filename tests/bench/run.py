"""End-to-end benchmark in one run (docs/bench.md): direct vs haproxy mTLS vs nodeproxy HBONE
(L4), and HTTP through haproxy (mode http, mTLS), the agents alone and a waypoint (L7).

    sudo .venv/bin/python -m tests.bench.run [--quick] [--http-seconds N]
        [--json bench-results.json]
        [--cases direct,haproxy,haproxy-http1,nodeproxy,l4-http1,waypoint-http1,waypoint-http2]

Prints progress lines, then a table of absolute figures with ratios to haproxy and to direct
(L4) and a table of HTTP figures (L7), with the issues' targets next to them (printed, never
asserted), and writes the JSON.  Every namespace and process it started is gone when it
exits, also on Ctrl-C, SIGTERM or failure (the lab cluster's destroy(); leftovers of a killed
run: ``python -m meshlab down 'nb????-'``); when a case failed, the proxies' logs are kept
(the path is printed).  Exit status: 0 when every case ran, 1 when a case failed, 2 on a setup
error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from meshlab import random_prefix
from tests.bench import report
from tests.bench.harness import (
    REPO,
    Bench,
    BenchError,
    Params,
    log,
    missing_tools,
    tool_versions,
)

PREFIX_STEM = "nb"  # lab prefix nbXXXX-: distinct from the test suite's np????-


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same cleanup as Ctrl-C


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="shorter measurements (about a third of the time)")
    ap.add_argument("--json", default=str(REPO / "bench-results.json"),
                    help="where to write the results (default: bench-results.json in the repo)")
    ap.add_argument("--cases", default=",".join(report.CASES),
                    help=f"comma-separated subset of {','.join(report.CASES)}")
    ap.add_argument("--http-seconds", type=int, default=None,
                    help="seconds of each HTTP load (saturating and paced runs; default 5, "
                         "--quick 2): shorter for development")
    # Fault injection for the tests (a waypoint that crashes or never gets ready).
    ap.add_argument("--waypoint-arg", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--profile", metavar="DIR",
                    help="after the nodeproxy measurements, profile both agents with py-spy "
                         "in extra passes (1-stream iperf3, connections/s), and the waypoint "
                         "in an extra pass of its saturating load; raw stacks in DIR")
    ap.add_argument("--py-spy", default=None, help="py-spy executable (default: PATH or venv)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(report.CASES))
    if unknown or not cases:
        ap.error(f"--cases: unknown {unknown}; choose from {', '.join(report.CASES)}")
    if args.http_seconds is not None and args.http_seconds < 1:
        ap.error("--http-seconds: at least 1")
    # Run in the canonical order: agent cases last, since agents leave capture rules in the
    # pods (traffic fails closed) until the namespaces are deleted.
    args.cases = [c for c in report.CASES if c in cases]
    return args


def keep_logs(workdir: Path) -> list[Path]:
    """After a failed case: remove everything in ``workdir`` but the proxies' logs (the
    certificates and the CA key go), so the log files named in the errors still exist."""
    kept = []
    for path in sorted(workdir.iterdir()):
        if path.is_file() and path.suffix == ".log":
            kept.append(path)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces); run 'sudo make bench'", file=sys.stderr)
        return 2
    missing = missing_tools(http_cases=any(c in report.HTTP_CASES for c in args.cases))
    if missing:
        print(f"bench: missing {', '.join(missing)}; 'make deps' installs them", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 CPUs (client side pinned to CPU 0, server side to CPU 1)",
              file=sys.stderr)
        return 2
    py_spy = args.py_spy or shutil.which("py-spy") or str(Path(sys.executable).with_name(
        "py-spy"))
    if args.profile and not Path(py_spy).exists():
        print(f"bench: --profile needs py-spy ({py_spy} not found; pip install py-spy, or "
              "give --py-spy PATH)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    params = Params.for_mode(args.quick, args.http_seconds)
    prefix = random_prefix(PREFIX_STEM)
    workdir = Path(tempfile.mkdtemp(prefix="nodeproxy-bench-"))
    started = time.time()
    doc: dict[str, Any] = {
        "version": 1,
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "prefix": prefix,
        "host": tool_versions(),
        "pinning": {"client_side_cpu": params.client_cpu, "server_side_cpu": params.server_cpu,
                    "client_side": "client programs (iperf3, tcpload, wrk, h2load), haproxy "
                                   "A, agent node1",
                    "server_side": "iperf3 -s, echo server, HTTP servers, haproxy B, agent "
                                   "node2, waypoint (pod n2p2 on node2)"},
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "cases": {},
    }
    log(f"mode {doc['mode']}, cases {', '.join(args.cases)}, work dir {workdir}")
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f} before starting; other work on this machine "
            "shares the pinned CPUs and makes figures noisy (compare ratios, rerun to confirm)")
    try:
        with Bench.create(params, workdir, prefix) as bench:
            pki = bench.make_pki()
            log("certificates issued from one CA (nodeproxy ca init / ca issue)")
            if args.profile:
                bench.profile_dir, bench.py_spy = Path(args.profile).resolve(), py_spy
            bench.waypoint_extra_args = tuple(args.waypoint_arg)
            bench.start_servers()
            log("iperf3, echo and HTTP servers listening in pod B (CPU 1)")
            for case in args.cases:
                log(f"--- case {case} ---")
                doc["cases"][case] = bench.run_case(case, pki)
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    except BenchError as exc:
        log(f"setup failed: {exc}")
        return 2
    finally:
        if any(not r["ok"] for r in doc["cases"].values()) and workdir.exists():
            kept = keep_logs(workdir)
            log(f"a case failed: {len(kept)} log files kept in {workdir} (remove it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    doc["seconds"] = round(time.time() - started, 1)
    doc["ratios"] = report.ratios(doc["cases"])
    doc["targets"] = report.targets(doc["cases"])
    problems = report.check_result_document(doc)
    if problems:
        log(f"result problems: {'; '.join(problems)}")
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(report.table(doc["cases"], doc["params"]))
    print()
    log(f"results written to {args.json} ({doc['seconds']:.0f}s)")
    failed = [c for c, r in doc["cases"].items() if not r["ok"]]
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
