"""The demo's L7 act: its verdict and report from recorded observations (pure), its config
against the L7 decision the waypoint runs (pure), and a sabotaged run (root) that must fail
and leave nothing behind."""

from __future__ import annotations

import dataclasses
import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshlab import ClusterSpec, dump_config, plan_cluster, random_prefix
from meshlab.build import is_lab_netns, list_netns
from meshlab.config import render_config
from meshlab.demo import DEMO_STEM, DemoOptions, build_scenario, run_demo, teardown_leftovers
from meshlab.demo.l7 import (
    L7Observations,
    Reply,
    RequestRow,
    build_l7_scenario,
    check_l7,
    counter_total,
    render_l7,
    summarize_requests,
)
from meshlab.topology import plan_more_pods
from ztunnel_cfg import Snapshot, SpiffeId, load_config_text
from ztunnel_cfg.l7 import Request
from ztunnel_cfg.l7.plan import L7Forward, L7Reply, plan_request
from ztunnel_cfg.routing import is_waypoint

SCENARIO = build_l7_scenario()
OK, DENIED = Reply(200, "reviews-v1", 0.01, "{}"), Reply(403, "", 0.0, "RBAC: access denied\n")


def recorded() -> L7Observations:
    """What a good run observed (shapes as in a real run)."""
    canary = [Reply(200, "reviews-v1", 0.01)] * 181 + [Reply(200, "reviews-v2", 0.01)] * 19
    return L7Observations(
        waypoint="shop/waypoint", waypoint_pod="n2p5", waypoint_node="node2",
        waypoint_identity="spiffe://cluster.local/ns/shop/sa/waypoint",
        canary=tuple(canary), canary_recorded={"reviews-v1": 181, "reviews-v2": 19},
        retries=(Reply(200, "reviews-v1", 0.01),) * 10,
        retry_backend_statuses=(503, 200) * 10, retry_counter=10,
        timeout=Reply(504, "", 0.26), timeout_backend_saw=1,
        breaker=(Reply(200, "reviews-v1", 0.6), Reply(200, "reviews-v1", 1.2),
                 *(Reply(503, "", 0.01),) * 4),
        breaker_backend_saw=2, allowed=OK, denied=DENIED, deny_backend_paths=("/reviews/1",),
        requests=(RequestRow("checkout", "200", "-", 2), RequestRow("checkout", "503", "UO", 4),
                  RequestRow("details", "504", "UT", 1), RequestRow("ratings", "200", "-", 10),
                  RequestRow("reviews", "200", "-", 201),
                  RequestRow("reviews", "403", "DENY", 1)),
        seconds=4.2,
    )


def test_recorded_good_run_passes_and_reads_well() -> None:
    obs = recorded()
    assert check_l7(SCENARIO, obs) == []
    text = render_l7(SCENARIO, obs, [])
    for line in [
        "L7 act: waypoint shop/waypoint in pod n2p5 on node2, in front of reviews, ratings, "
        "details, checkout",
        "✔ canary: 90/10 split of 200 requests to reviews → reviews-v1 x181 · reviews-v2 x19 "
        "(expected reviews-v1 180 ± 19, reviews-v2 20 ± 19); answers 200 x200",
        "✔ retries: 10 requests to ratings, whose app answered 200 x10 · 503 x10: the client "
        "saw 200 x10, the waypoint retried 10 times",
        "✔ timeout: details answers after 1500 ms; its route's 250 ms timeout answered 504 "
        "after 0.26 s (waypoint: 504 UT x1)",
        "✔ circuit breaker: 6 concurrent requests to checkout (maxConnections 1, 1 pending): "
        "200 x2 · 503 x4; the 503s (UO x4) came within 0.01 s, the app saw 2",
        "✔ L7 deny: GET /reviews/1 → 200 from reviews-v1; GET /admin/stats → 403 "
        "'RBAC: access denied'; the app saw /reviews/1",
        "    checkout   200 x2 · 503 UO x4",
        "    reviews    200 x201 · 403 DENY x1",
        "✔ all 5 L7 behaviours observed as configured (219 requests through the waypoint)",
    ]:
        assert line in text, f"missing {line!r} in:\n{text}"
    assert "✘" not in text
    assert "\x1b[" not in text


Sabotage = Callable[[L7Observations], L7Observations]


def _swap(**changes: object) -> Sabotage:
    return lambda obs: dataclasses.replace(obs, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sabotage", "problem"), [
    (_swap(canary=(Reply(200, "reviews-v1", 0.01),) * 200,
           canary_recorded={"reviews-v1": 200, "reviews-v2": 0}),
     "canary: reviews-v2 served 0 of 200, want 20 ± 19"),
    (_swap(canary_recorded={"reviews-v1": 180, "reviews-v2": 19}),
     "canary: the apps recorded"),
    (_swap(retries=(Reply(503, "reviews-v1", 0.01),) * 10), "retries: the client saw"),
    (_swap(retry_backend_statuses=(200,) * 10, retry_counter=0),
     "retries: the flaky app never failed"),
    (_swap(retry_counter=3), "retries: the waypoint retried 3 times for 10 failures"),
    (_swap(timeout=Reply(200, "reviews-v2", 1.51)), "timeout: want 504, got 200"),
    (_swap(timeout_backend_saw=0), "timeout: the slow app did not get the request"),
    (_swap(breaker=(Reply(200, "reviews-v1", 0.6),) * 6, breaker_backend_saw=6),
     "circuit breaker: want 200s and 503s"),
    (_swap(breaker_backend_saw=6), "circuit breaker: the app saw 6 requests, 2 were answered"),
    (_swap(denied=Reply(200, "reviews-v1", 0.0, "{}"),
           deny_backend_paths=("/reviews/1", "/admin/stats")),
     "L7 deny: the denied path got 200"),
    (_swap(deny_backend_paths=("/reviews/1", "/admin/stats")),
     "L7 deny: the denied request reached the app"),
    (_swap(requests=()), "L7 deny: the waypoint counted 0 x 403 DENY"),
], ids=["canary-no-v2", "canary-records-disagree", "retries-not-masked", "nothing-to-retry",
        "retry-counter-off", "no-timeout", "timeout-never-reached-app", "breaker-never-opened",
        "breaker-leaked", "deny-let-through", "deny-reached-app", "no-metrics"])
def test_sabotaged_observations_are_problems(sabotage: Sabotage, problem: str) -> None:
    obs = sabotage(recorded())
    problems = check_l7(SCENARIO, obs)
    assert any(p.startswith(problem) for p in problems), problems
    text = render_l7(SCENARIO, obs, problems)
    assert "✘ the waypoint did not behave as configured" in text
    assert f"problem: {problem}" in text


def test_metrics_are_read_from_the_exposition() -> None:
    text = "\n".join([
        "# TYPE istio_requests_total counter",
        'istio_requests_total{reporter="waypoint",destination_service_name="reviews",'
        'response_code="200",response_flags="-",source_workload="a"} 3.0',
        'istio_requests_total{reporter="waypoint",destination_service_name="reviews",'
        'response_code="200",response_flags="-",source_workload="b"} 2.0',
        'istio_requests_total{reporter="waypoint",destination_service_name="checkout",'
        'response_code="503",response_flags="UO"} 4.0',
        "# TYPE nodeproxy_waypoint_retries_total counter",
        'nodeproxy_waypoint_retries_total{destination_service="r.shop.svc.cluster.local",'
        'reason="503"} 7.0',
    ])
    assert summarize_requests(text) == (RequestRow("checkout", "503", "UO", 4),
                                        RequestRow("reviews", "200", "-", 5))
    assert counter_total(text, "nodeproxy_waypoint_retries_total",
                         destination_service="r.shop.svc.cluster.local") == 7


def test_the_act_config_agrees_with_the_waypoint_decision() -> None:
    """The demo's combined config loads, the waypoint pod is not captured, and the L7 decision
    the waypoint runs denies exactly the denied path, splitting the rest by weight."""
    l4 = build_scenario(2)
    plan = plan_cluster(ClusterSpec("npd0000-", 2, l4.pods_per_node))
    roles = dict(l4.roles)
    for node, role in SCENARIO.pods:
        plan, [pod] = plan_more_pods(plan, node, 1)
        roles[pod.name] = role
    doc = render_config(plan, roles, [*l4.services, *SCENARIO.services],
                        [*l4.policies, *SCENARIO.policies], waypoints=[SCENARIO.waypoint],
                        extra=SCENARIO.extra_config())
    snap = Snapshot.build(load_config_text(dump_config(doc)))
    [waypoint] = snap.config.waypoints
    wp_pod = next(p for p, r in roles.items() if r.name == "waypoint")
    wp_workload = snap.workload_by_ip(plan.pod(wp_pod).ip)
    assert wp_workload is not None
    assert is_waypoint(snap, wp_workload)
    reviews = snap.service_by_key(SCENARIO.service("reviews").key)
    client = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/frontend")

    def decide(path: str, draw: float) -> L7Reply | L7Forward:
        return plan_request(snap, waypoint, reviews, 80, Request("GET", path, "reviews", ()),
                            source_identity=client, source_ip=plan.pod("n1p1").ip,
                            destination_ip=SCENARIO.service("reviews").vip, draw=draw)

    denied = decide(SCENARIO.denied_path, 0.5)
    assert isinstance(denied, L7Reply)
    assert (denied.status, denied.flags) == (403, "DENY")
    assert isinstance(decide(SCENARIO.allowed_path, 0.5), L7Forward)


# -- a sabotaged run (root) --------------------------------------------------------------------

@pytest.mark.privileged
def test_demo_l7_act_fails_loudly_when_the_waypoint_misbehaves(tmp_path: Path) -> None:
    """The act's config lacks its DENY policy: the denied path gets through, and the verdict,
    built from observations, must say so, fail the run and still remove everything."""
    prefix = random_prefix(DEMO_STEM)
    out = io.StringIO()
    try:
        result = run_demo(DemoOptions(
            prefix=prefix, workdir_root=str(tmp_path),
            l7=SCENARIO.without_policy("reviews-no-admin")), out)
        kept = sorted(p.name for p in result.workdir.glob("*.log"))
    finally:
        left = [n for n in list_netns() if is_lab_netns(n, prefix)]
        teardown_leftovers(prefix, str(tmp_path))
    text = out.getvalue()
    assert not left, f"the demo left namespaces behind: {left}"
    assert result.exit_code == 1, text
    assert result.observations is not None
    assert result.l7 is not None
    assert result.problems, text
    assert all(p.startswith("L7 act: L7 deny") for p in result.problems), result.problems
    assert "✔ all 10 connections behaved as the config says" in text
    assert "✘ L7 deny: GET /reviews/1 → 200" in text
    assert "→ 200 from reviews-" in text.split("GET /admin/stats")[1]
    assert "✘ the waypoint did not behave as configured" in text
    assert "[L7 3/3] removing the act: waypoint stopped, config back, its pods deleted ... ok" \
        in text
    assert "waypoint-n2p5.log" in kept, f"logs are kept after a failure: {kept}"


@pytest.mark.privileged
def test_demo_interrupted_in_the_l7_act_tears_everything_down(tmp_path: Path) -> None:
    """Ctrl-C while the waypoint serves: exit 130, no namespace and no process left."""
    prefix = random_prefix(DEMO_STEM)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "demo", "--prefix", prefix,
                             "--no-color"], env={**os.environ, "TMPDIR": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = ""
    try:
        deadline = time.monotonic() + 90
        while "[L7 2/3]" not in seen:  # the waypoint is up and requests are under way
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096).decode()
                assert chunk, f"demo exited early: {seen}"
                seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = [n for n in list_netns() if is_lab_netns(n, prefix)]
        teardown_leftovers(prefix, str(tmp_path))
    out = seen + rest
    assert proc.returncode == 130, out
    assert "tearing everything down ... ok" in out
    assert not left, f"the demo left namespaces behind: {left}"
    pids = subprocess.run(["pgrep", "-f", prefix], capture_output=True, text=True,
                          check=False).stdout.split()
    assert not pids, f"processes of the demo still run: {pids}"
