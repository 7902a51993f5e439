"""The HTTP load's pure part: wrk / h2load command lines and output, the checks that keep an
error path out of the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import httpload
from tests.bench.errors import BenchError
from tests.bench.httpload import HttpLoad

HTTPSERVER = Path(__file__).with_name("httpserver.py")

WRK_STDOUT = """Running 2s test @ http://10.96.0.20:80/
  1 threads and 16 connections
  Latency Distribution
     50%  114.00us
  195054 requests in 2.10s, 205.55MB read
Requests/sec:  92893.47
BENCH-JSON {"requests": 195054, "duration_us": 2099760, "bytes": 215534670, \
"connect_errors": 0, "read_errors": 2, "write_errors": 1, "status_errors": 3, "timeouts": 4, \
"p50_us": 114, "p90_us": 357, "p99_us": 3968, "max_us": 11042, "mean_us": 287.3, \
"rate_target": 1000}
"""

H2LOAD_STDOUT = """starting benchmark...
finished in 3.00s, 10040.00 req/s, 10.01MB/s
requests: 20080 total, 20080 started, 20078 done, 20070 succeeded, 1 failed, 2 errored, 3 timeout
status codes: 20070 2xx, 0 3xx, 5 4xx, 3 5xx
traffic: 20.01MB (20983600) total
"""


def _h2_log(durations: list[int]) -> str:
    return "".join(f"17961850027056{i:02d}\t200\t{d}\n" for i, d in enumerate(durations))


def _load(**changes: object) -> HttpLoad:
    base: dict[str, object] = dict(tool="wrk", requests=1000, rps=500.0, p50_us=100.0,
                                   p90_us=200.0, p99_us=300.0, max_us=400.0, status_errors=0,
                                   socket_errors=0, bytes_per_response=1100.0)
    base.update(changes)
    return HttpLoad(**base)  # type: ignore[arg-type]


def test_wrk_json_line_becomes_a_load() -> None:
    load = httpload.parse_wrk(WRK_STDOUT)
    assert load.requests == 195054
    assert load.rps == pytest.approx(195054 / 2.099760)
    assert (load.p50_us, load.p90_us, load.p99_us, load.max_us) == (114, 357, 3968, 11042)
    assert load.status_errors == 3
    assert load.socket_errors == 2 + 1 + 4  # connect, read, write errors and timeouts
    assert load.bytes_per_response == pytest.approx(215534670 / 195054)
    assert load.rate_target == 1000


@pytest.mark.parametrize(("stdout", "message"), [
    pytest.param("Running 2s test\nRequests/sec: 1.0\n", "no BENCH-JSON line",
                 id="script-not-loaded"),
    pytest.param("BENCH-JSON {not json\n", "malformed", id="broken-json"),
    pytest.param('BENCH-JSON {"requests": 3}\n', "malformed", id="missing-fields"),
])
def test_wrk_output_without_a_result_is_an_error(stdout: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        httpload.parse_wrk(stdout)


def test_wrk_with_no_request_has_no_bytes_per_response() -> None:
    doc = json.loads(WRK_STDOUT.split("BENCH-JSON ")[1])
    doc["requests"] = 0
    load = httpload.parse_wrk(f"BENCH-JSON {json.dumps(doc)}\n")
    assert load.requests == 0
    assert load.bytes_per_response is None


def test_h2load_summary_and_log_become_a_load() -> None:
    durations = list(range(1, 101))  # 1..100 us
    load = httpload.parse_h2load(H2LOAD_STDOUT, _h2_log(list(reversed(durations))))
    assert load.tool == "h2load"
    assert load.requests == 20078  # done, not started
    assert load.rps == 10040.0
    assert (load.p50_us, load.p90_us, load.p99_us, load.max_us) == (50, 90, 99, 100)
    assert load.status_errors == 5 + 3
    assert load.socket_errors == 1 + 2 + 3
    assert load.bytes_per_response is None


@pytest.mark.parametrize(("stdout", "log", "message"), [
    pytest.param("connection refused\n", _h2_log([5]), "no summary", id="no-summary"),
    pytest.param(H2LOAD_STDOUT, "garbage line\n", "log line 1", id="bad-log-line"),
    pytest.param(H2LOAD_STDOUT, "", "logged none", id="requests-done-but-none-logged"),
])
def test_h2load_output_without_a_result_is_an_error(stdout: str, log: str,
                                                    message: str) -> None:
    with pytest.raises(BenchError, match=message):
        httpload.parse_h2load(stdout, log)


def test_h2load_that_completed_nothing_is_reported_by_the_checks() -> None:
    stdout = H2LOAD_STDOUT.replace("20078 done", "0 done")
    load = httpload.parse_h2load(stdout, "")
    assert load.requests == 0
    assert httpload.load_problems(load, "h2", 1024) == ["h2: no request completed (6 failed)"]


@pytest.mark.parametrize(("values", "q", "expected"), [
    pytest.param([7.0], 50, 7.0, id="single"),
    pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.0, id="even-count-lower-middle"),
    pytest.param([float(i) for i in range(1, 101)], 99, 99.0, id="p99-of-100"),
    pytest.param([float(i) for i in range(1, 101)], 100, 100.0, id="p100-is-max"),
    pytest.param([float(i) for i in range(1, 11)], 0, 1.0, id="p0-is-min"),
])
def test_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert httpload.nearest_rank(values, q) == expected


def test_nearest_rank_of_nothing_is_an_error() -> None:
    with pytest.raises(BenchError):
        httpload.nearest_rank([], 50)


@pytest.mark.parametrize(("load", "expected"), [
    pytest.param(_load(), [], id="clean"),
    pytest.param(_load(socket_errors=10), [], id="socket-errors-at-1pct-tolerated"),
    pytest.param(_load(socket_errors=11), ["x: 11 socket errors/timeouts for 1000 requests "
                                           "(over 1%)"], id="socket-errors-over-1pct"),
    pytest.param(_load(status_errors=1), ["x: 1 of 1000 responses were not 2xx/3xx (the proxy "
                                          "answered errors; check its log)"],
                 id="any-status-error"),
    pytest.param(_load(bytes_per_response=159.0),
                 ["x: responses averaged 159 bytes, less than the 1024-byte body: not the "
                  "bench server answering"], id="short-responses"),
    pytest.param(_load(bytes_per_response=None), [], id="h2load-has-no-byte-count"),
    pytest.param(_load(rate_target=1000.0, rps=900.0), [], id="paced-at-90pct"),
    pytest.param(_load(rate_target=1000.0, rps=16.0, requests=16),
                 ["x: 16 requests at 16 req/s, under 90% of the 1,000 req/s it was paced to "
                  "(requests stalled, or the path cannot sustain the rate)"],
                 id="paced-run-stalled"),
    pytest.param(_load(requests=0, socket_errors=3, status_errors=1),
                 ["x: no request completed (3 failed)"], id="nothing-completed"),
])
def test_load_problems(load: HttpLoad, expected: list[str]) -> None:
    assert httpload.load_problems(load, "x", 1024) == expected


@pytest.mark.parametrize(("count", "cpu_seconds", "expected"), [
    pytest.param(4000, 1.0, 4000.0, id="one-cpu-second"),
    pytest.param(5000, 2.5, 2000.0, id="fraction"),
    pytest.param(100, 0.0, None, id="no-measurable-cpu"),
])
def test_per_cpu_second(count: float, cpu_seconds: float, expected: float | None) -> None:
    assert httpload.per_cpu_second(count, cpu_seconds) == expected


def test_command_lines() -> None:
    wrk = httpload.wrk_argv("http://10.96.0.20:80/", 16, 5)
    assert wrk[:7] == ["wrk", "-t", "1", "-c", "16", "-d", "5s"]
    assert "--latency" in wrk
    assert wrk[wrk.index("-s") + 1] == str(httpload.WRK_SCRIPT)
    assert httpload.WRK_SCRIPT.exists()
    h2 = httpload.h2load_argv("http://10.96.0.20:81/", 4, 10, 5, 1, Path("/tmp/x.log"))
    assert h2 == ["h2load", "-t", "1", "-c", "4", "-m", "10", "-D", "5", "--warm-up-time", "1",
                  "--log-file", "/tmp/x.log", "http://10.96.0.20:81/"]


@pytest.fixture
def local_server() -> Iterator[tuple[str, str]]:
    """The bench's HTTP server on free loopback ports: (http1 address, h2 address)."""
    proc = subprocess.Popen([sys.executable, str(HTTPSERVER), "--host", "127.0.0.1",
                             "--http1-port", "0", "--h2-port", "0", "--size", "1024"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        http1, h2 = json.loads(proc.stdout.readline())["listening"]
        yield http1, h2
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def _run_wrk(url: str, seconds: int, rate: int) -> HttpLoad:
    out = subprocess.run(httpload.wrk_argv(url, 4, seconds), capture_output=True, text=True,
                         timeout=seconds + 30, check=False,
                         env={**os.environ, "WRK_RATE": str(rate)})
    assert out.returncode == 0, out.stderr
    return httpload.parse_wrk(out.stdout)


@pytest.mark.slow
def test_wrk_script_paces_to_the_rate_and_reports(local_server: tuple[str, str]) -> None:
    http1, _ = local_server
    paced = _run_wrk(f"http://{http1}/", 2, rate=200)
    assert paced.rate_target == 200
    # The schedule caps the rate (one slot per 5 ms; never a burst beyond 50 ms of debt);
    # the lower bound only needs the machine to manage 200 req/s on loopback.
    assert 300 <= paced.requests <= 2 * 200 + 10 + 4
    assert httpload.load_problems(paced, "paced", 1024) == []
    assert paced.bytes_per_response is not None
    assert paced.bytes_per_response > 1024  # headers + the 1 KB body
    unpaced = _run_wrk(f"http://{http1}/", 1, rate=0)
    assert unpaced.rate_target == 0
    assert unpaced.requests > paced.requests


@pytest.mark.slow
def test_h2load_against_the_h2c_server(local_server: tuple[str, str],
                                       tmp_path: Path) -> None:
    _, h2 = local_server
    log_file = tmp_path / "h2.log"
    argv = httpload.h2load_argv(f"http://{h2}/", 2, 4, 1, 1, log_file)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout[-500:]
    assert "Application protocol: h2c" in out.stdout
    load = httpload.parse_h2load(out.stdout, log_file.read_text())
    assert load.requests > 0
    assert httpload.load_problems(load, "h2", 1024) == []
