"""Pure part of the HTTP load (no I/O): wrk and h2load command lines, and their output turned
into one :class:`HttpLoad` shape, with the checks that keep an error path out of the figures.

- HTTP/1.1: ``wrk -t 1 -c N --latency -s wrk_bench.lua``; the script's ``done()`` prints one
  ``BENCH-JSON {...}`` line (totals, percentiles in us from wrk's own histogram).  With
  ``WRK_RATE`` in the environment the same script paces requests (wrk2 is not packaged).
- HTTP/2: ``h2load -c C -m M -D S --warm-up-time W --log-file F`` (h2c, prior knowledge); rates
  and counts come from its summary, percentiles from the per-request log (h2load prints only
  min/max/mean).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tests.bench.errors import BenchError

WRK_SCRIPT = Path(__file__).with_name("wrk_bench.lua")
WRK_JSON_MARK = "BENCH-JSON "
# A load with more failed requests than this is not measured: errors are cheap to answer, so
# rates would be the error path's.  Status errors (non-2xx/3xx) are never tolerated.
MAX_SOCKET_ERROR_SHARE = 0.01
# A paced run that falls this far short of its rate did not measure the path "at" that rate.
MIN_PACED_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class HttpLoad:
    """What one run of a load tool measured."""

    tool: str  # "wrk" | "h2load"
    requests: int  # completed requests (any status)
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    status_errors: int  # responses that were not 2xx/3xx
    socket_errors: int  # connect/read/write errors, timeouts, resets, failed streams
    bytes_per_response: float | None = None  # wrk only: headers + body, as read
    rate_target: float = 0.0  # requests/s the run was paced to; 0 = as fast as it goes

    def to_document(self) -> dict[str, float | int | str | None]:
        return {"tool": self.tool, "requests": self.requests, "rps": self.rps,
                "p50_us": self.p50_us, "p90_us": self.p90_us, "p99_us": self.p99_us,
                "max_us": self.max_us, "status_errors": self.status_errors,
                "socket_errors": self.socket_errors,
                "bytes_per_response": self.bytes_per_response,
                "rate_target": self.rate_target}


def wrk_argv(url: str, connections: int, seconds: int,
             script: Path = WRK_SCRIPT) -> list[str]:
    """One wrk thread (the client side has one CPU; the pacing schedule is per thread)."""
    return ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
            "-s", str(script), url]


def h2load_argv(url: str, clients: int, streams: int, seconds: int, warmup_seconds: int,
                log_file: Path) -> list[str]:
    """``http://`` makes h2load speak HTTP/2 with prior knowledge (h2c, no Upgrade)."""
    return ["h2load", "-t", "1", "-c", str(clients), "-m", str(streams), "-D", str(seconds),
            "--warm-up-time", str(warmup_seconds), "--log-file", str(log_file), url]


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list: the smallest value with
    at least ``q`` % of the samples at or below it."""
    if not sorted_values:
        raise BenchError("no samples to take a percentile of")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def parse_wrk(stdout: str) -> HttpLoad:
    """The ``BENCH-JSON`` line of wrk_bench.lua's ``done()``."""
    lines = [line for line in stdout.splitlines() if line.startswith(WRK_JSON_MARK)]
    if not lines:
        raise BenchError(f"wrk printed no {WRK_JSON_MARK.strip()} line (is {WRK_SCRIPT.name} "
                         f"loaded with -s?): {stdout.strip()[-300:]!r}")
    try:
        doc = json.loads(lines[-1][len(WRK_JSON_MARK):])
        requests = int(doc["requests"])
        seconds = int(doc["duration_us"]) / 1e6
        socket_errors = sum(int(doc[k]) for k in ("connect_errors", "read_errors",
                                                   "write_errors", "timeouts"))
        return HttpLoad(
            tool="wrk", requests=requests, rps=requests / seconds if seconds > 0 else 0.0,
            p50_us=float(doc["p50_us"]), p90_us=float(doc["p90_us"]),
            p99_us=float(doc["p99_us"]), max_us=float(doc["max_us"]),
            status_errors=int(doc["status_errors"]), socket_errors=socket_errors,
            bytes_per_response=int(doc["bytes"]) / requests if requests else None,
            rate_target=float(doc.get("rate_target", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"wrk's {WRK_JSON_MARK.strip()} line is malformed ({exc}): "
                         f"{lines[-1][:300]!r}") from None


_FINISHED = re.compile(r"^finished in [\d.]+\w+, ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout", re.MULTILINE)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)


def parse_h2load(stdout: str, log_text: str) -> HttpLoad:
    """h2load's summary plus its ``--log-file`` (start us, status, duration us per request of
    the measured period)."""
    finished, counts, status = (_FINISHED.search(stdout), _REQUESTS.search(stdout),
                                _STATUS.search(stdout))
    if finished is None or counts is None or status is None:
        raise BenchError(f"h2load printed no summary (finished/requests/status codes): "
                         f"{stdout.strip()[-300:]!r}")
    durations = []
    for number, line in enumerate(log_text.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 3 or not fields[2].strip().isdigit():
            raise BenchError(f"h2load log line {number} is not 'start<TAB>status<TAB>us': "
                             f"{line[:100]!r}")
        durations.append(float(fields[2]))
    _total, done, _ok, failed, errored, timeout = (int(g) for g in counts.groups())
    _2xx, _3xx, c4xx, c5xx = (int(g) for g in status.groups())
    if not durations and done:
        raise BenchError(f"h2load completed {done} requests but logged none (--log-file)")
    durations.sort()
    # Nothing completed: no latency to report; load_problems() says why the run is void.
    p50, p90, p99, top = ((nearest_rank(durations, 50), nearest_rank(durations, 90),
                           nearest_rank(durations, 99), durations[-1]) if durations
                          else (0.0, 0.0, 0.0, 0.0))
    return HttpLoad(
        tool="h2load", requests=done, rps=float(finished.group(1)), p50_us=p50, p90_us=p90,
        p99_us=p99, max_us=top, status_errors=c4xx + c5xx,
        socket_errors=failed + errored + timeout)


def load_problems(load: HttpLoad, what: str, body_size: int) -> list[str]:
    """Why a run's figures must not be reported (empty: they can be)."""
    problems = []
    if load.requests <= 0:
        problems.append(f"{what}: no request completed ({load.socket_errors} failed)")
        return problems
    if load.status_errors:
        problems.append(f"{what}: {load.status_errors} of {load.requests} responses were not "
                        "2xx/3xx (the proxy answered errors; check its log)")
    if load.socket_errors > MAX_SOCKET_ERROR_SHARE * load.requests:
        problems.append(f"{what}: {load.socket_errors} socket errors/timeouts for "
                        f"{load.requests} requests (over {MAX_SOCKET_ERROR_SHARE:.0%})")
    if load.rate_target and load.rps < MIN_PACED_SHARE * load.rate_target:
        problems.append(f"{what}: {load.requests} requests at {load.rps:,.0f} req/s, under "
                        f"{MIN_PACED_SHARE:.0%} of the {load.rate_target:,.0f} req/s it was paced "
                        "to (requests stalled, or the path cannot sustain the rate)")
    if load.bytes_per_response is not None and load.bytes_per_response < body_size:
        problems.append(f"{what}: responses averaged {load.bytes_per_response:.0f} bytes, less "
                        f"than the {body_size}-byte body: not the bench server answering")
    return problems


def per_cpu_second(count: float, cpu_seconds: float) -> float | None:
    """``count`` per CPU-second: requests/s divided by CPU-seconds per second over the same
    window is requests per CPU-second.  None when the process used no measurable CPU (the
    kernel counts in clock ticks)."""
    return count / cpu_seconds if cpu_seconds > 0 else None
