"""The lab's L7 helpers without namespaces: the HTTP app over loopback (run as a process, as
in pods), reading curl's output, and the waypoint pieces of the rendered config."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlab import ClusterSpec, PodRole, ServiceDef, dump_config, plan_cluster
from meshlab.apps import should_fail
from meshlab.config import WaypointDef, render_config
from meshlab.web import (
    CurlResult,
    HttpApp,
    curl_argv,
    fetch_argv,
    parse_curl_results,
    parse_http_reply,
)
from ztunnel_cfg import Snapshot, load_config_text
from ztunnel_cfg.routing import is_waypoint, waypoints_of

# -- failing exactly N% ------------------------------------------------------------------------


@pytest.mark.parametrize(("percent", "first_ten"), [
    (0, ".........."),
    (100, "XXXXXXXXXX"),
    (50, "X.X.X.X.X."),
    (10, "X........."),
    (30, "X..X..X..."),
], ids=["never", "always", "every-other-one", "one-in-ten", "thirty-spread"])
def test_should_fail_spreads_failures_evenly_failure_first(percent: int, first_ten: str) -> None:
    got = "".join("X" if should_fail(n, percent) else "." for n in range(1, 11))
    assert got == first_ten


@pytest.mark.parametrize("percent", [0, 1, 7, 33, 50, 99, 100])
def test_should_fail_is_exact_over_any_prefix(percent: int) -> None:
    for n in range(1, 301):
        failed = sum(should_fail(k, percent) for k in range(1, n + 1))
        assert failed == -(-n * percent // 100)  # ceil(n * percent / 100)


# -- reading curl -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("200\tapp-v1\t0.004\t0\t1\thttp://10.96.1.1:80/a\t\n",
     [CurlResult(200, "app-v1", 0.004, 0, "http://10.96.1.1:80/a", "", connects=1)]),
    ("000\t\t0.001\t7\t0\thttp://x/\tFailed to connect: refused\tand a tab\n",
     [CurlResult(0, "", 0.001, 7, "http://x/", "Failed to connect: refused\tand a tab")]),
    ("curl: (56) Recv failure\n503\t\t0.2\t0\t0\thttp://x/b\t\n",
     [CurlResult(503, "", 0.2, 0, "http://x/b", "")]),
    ("", []),
], ids=["answered", "connect-failed", "noise-skipped", "nothing"])
def test_parse_curl_results(text: str, want: list[CurlResult]) -> None:
    assert parse_curl_results(text) == want


def test_parse_http_reply_skips_interim_heads_and_keeps_the_body() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-A: 1\r\n\r\n"
           b"RBAC: access denied\n"
           b"\n--meshlab-curl-end--\t403\t0\t\n")
    reply = parse_http_reply(raw)
    assert (reply.status, reply.exit_code) == (403, 0)
    assert reply.headers == {"content-type": "text/plain", "x-a": "1"}
    assert reply.text() == "RBAC: access denied\n"


def test_parse_http_reply_without_an_answer() -> None:
    reply = parse_http_reply(b"\n--meshlab-curl-end--\t000\t56\tRecv failure: reset\n")
    assert (reply.status, reply.exit_code, reply.error) == (0, 56, "Recv failure: reset")
    assert reply.body == b""


@pytest.mark.parametrize(("kw", "present", "absent"), [
    ({}, ["--output", "/dev/null", "--noproxy"], ["--parallel"]),
    ({"parallel": 4}, ["--parallel", "--parallel-immediate", "4"], []),
    ({"headers": ["Connection: close"]}, ["--header", "Connection: close"], []),
], ids=["sequential", "parallel", "headers"])
def test_curl_argv(kw: dict[str, object], present: list[str], absent: list[str]) -> None:
    argv = curl_argv(["http://a/1", "http://a/2"], **kw)  # type: ignore[arg-type]
    assert argv[0] == "curl"
    assert argv.count("/dev/null") == 2, "every URL's body is discarded"
    assert all(p in argv for p in present), argv
    assert not any(a in argv for a in absent), argv
    assert "/dev/null" not in fetch_argv("http://a/")
    assert "--include" in fetch_argv("http://a/")


# -- the HTTP app, as a process ------------------------------------------------------------------

@pytest.fixture
def http_app(tmp_path: Path) -> Iterator[HttpApp]:
    record = tmp_path / "rec.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlab.apps", "http", "--host", "127.0.0.1", "--port", "0",
         "--tag", "v9", "--fail-percent", "50", "--record", str(record)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["listening"][1]
    app = HttpApp(proc, pod="loopback", port=port, tag="v9", record=record)
    yield app
    app.stop()


def _curl(app: HttpApp, *urls: str) -> list[CurlResult]:
    out = subprocess.run(curl_argv([f"http://127.0.0.1:{app.port}{u}" for u in urls]),
                         capture_output=True, text=True, timeout=30, check=False)
    return parse_curl_results(out.stdout)


def test_http_app_names_itself_fails_half_and_records(http_app: HttpApp) -> None:
    results = _curl(http_app, "/a", "/b", "/c", "/d")  # one keep-alive connection
    assert [(r.status, r.served_by) for r in results] == [
        (503, "v9"), (200, "v9"), (503, "v9"), (200, "v9")]
    recorded = http_app.requests()
    assert [(r["n"], r["path"], r["status"]) for r in recorded] == [
        (1, "/a", 503), (2, "/b", 200), (3, "/c", 503), (4, "/d", 200)]
    assert len({r["peer"] for r in recorded}) == 1, "keep-alive: one connection"


def test_http_app_changes_behaviour_at_run_time(http_app: HttpApp) -> None:
    assert http_app.set(fail_percent=0, delay_ms=300) == {
        "fail_percent": 0, "fail_status": 503, "delay_ms": 300}
    [slow] = _curl(http_app, "/slow")
    assert (slow.status, slow.seconds >= 0.3) == (200, True)
    assert http_app.set(delay_ms=0, fail_percent=100, fail_status=500)["fail_status"] == 500
    assert [r.status for r in _curl(http_app, "/x", "/y")] == [500, 500]
    with pytest.raises(Exception, match="unknown setting"):
        http_app.set(bogus=1)


def test_http_app_reply_body_says_who_answered(http_app: HttpApp) -> None:
    http_app.set(fail_percent=0)
    out = subprocess.run(fetch_argv(f"http://127.0.0.1:{http_app.port}/who?x=1"),
                         capture_output=True, timeout=30, check=False)
    reply = parse_http_reply(out.stdout)
    assert reply.status == 200
    assert reply.headers["x-served-by"] == "v9"
    body = json.loads(reply.body)
    assert (body["tag"], body["path"], body["method"]) == ("v9", "/who?x=1", "GET")
    assert body["peer"].startswith("127.0.0.1:")


# -- waypoints in the rendered config ------------------------------------------------------------

def test_render_config_with_a_waypoint_loads_and_selects_it() -> None:
    plan = plan_cluster(ClusterSpec("np0000-", nodes=2, pods_per_node=2))
    wp = WaypointDef("waypoint", "10.96.1.100", "n2p1")
    roles = {"n1p2": PodRole("default", "app", name="app-v2", labels={"version": "v2"}),
             "n2p1": PodRole("default", "waypoint", name="waypoint")}
    svc = ServiceDef("shop", "10.96.1.6", {80: 8006}, ["app-v2"], waypoint=wp)
    doc = render_config(plan, roles, [svc], waypoints=[wp])
    assert doc["waypoints"] == [{"name": "waypoint", "namespace": "default",
                                 "service": "default/waypoint.default.svc.cluster.local"}]
    snap = Snapshot.build(load_config_text(dump_config(doc)))
    waypoint = snap.workload_by_ip(plan.pod("n2p1").ip)
    app = snap.workload_by_ip(plan.pod("n1p2").ip)
    assert waypoint is not None
    assert app is not None
    assert is_waypoint(snap, waypoint), "agents must not capture the waypoint pod"
    assert not is_waypoint(snap, app)
    assert [r.destination for r in waypoints_of(snap, app)] == [wp.service.key]
    assert app.effective_labels()["version"] == "v2"
