"""The L7 layer end to end (root): real agents, a real ``nodeproxy waypoint run`` process in its
pod, HTTP apps in the backend pods and curl in the client pod.

One mesh serves the whole module (``waypoint_mesh``: topology, services, routes, traffic
policies and the L7 policy); each scenario has its own service, starts its own apps and
judges by what three parties observed: the client (curl), the backends (their own record of
every request) and the waypoint (``/metrics``, ``/config_dump``).  Metrics are compared as
differences, so scenarios stay independent of their order.
"""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlab.mesh import NODEPROXY
from tests.netns.mesh_fixtures import metric_value, poll
from tests.netns.waypoint_mesh import (
    APP_V1,
    APP_V2,
    BASE_EJECTION,
    CLIENT_ID,
    CONSECUTIVE_5XX,
    LEGACY,
    LEGACY_SAME_NODE,
    ROUTE_TIMEOUT,
    SERVICES,
    WAYPOINT_POD,
    WaypointLab,
    waypoint_lab,
)

pytestmark = pytest.mark.privileged

REQUESTS = "istio_requests_total"
RETRIES = "nodeproxy_waypoint_retries_total"
EJECTIONS = "nodeproxy_waypoint_ejections_total"
REJECTED = "nodeproxy_connections_rejected_total"


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaypointLab]:
    with waypoint_lab(tmp_path_factory.mktemp("waypoint")) as lab:
        yield lab


@pytest.fixture
def lab(shared_lab: WaypointLab) -> Iterator[WaypointLab]:
    proc = shared_lab.mesh.waypoints[WAYPOINT_POD]
    assert proc.poll() is None, f"the waypoint exited\n{shared_lab.logs()}"
    yield shared_lab
    shared_lab.stop_apps()


def eventually_equal(what: str, read: Callable[[], float], want: float, lab: WaypointLab,
                     timeout: float = 5.0) -> None:
    """The waypoint counts a request once it has answered it: the client may be faster."""
    poll(lambda: read() == want, timeout, lambda: f"{what}: {read()}, want {want}\n{lab.logs()}")


# -- 1. canary ---------------------------------------------------------------------------------

CANARY_REQUESTS = 1000
CANARY_SHARE = 0.10
SIGMAS = 4.5  # a correct split fails this about once in 150,000 runs


def test_canary_90_10_lands_within_a_binomial_tolerance(lab: WaypointLab) -> None:
    v1, v2 = lab.serve(APP_V1, "canary"), lab.serve(APP_V2, "canary")
    before = lab.requests_total("canary", response_code="200")

    results = lab.curl([lab.url("canary", f"/canary/[1-{CANARY_REQUESTS}]")], max_time=5)

    assert len(results) == CANARY_REQUESTS
    assert Counter(r.status for r in results) == {200: CANARY_REQUESTS}, results[:5]
    served = Counter(r.served_by for r in results)
    assert set(served) == {"app-v1", "app-v2"}, served
    mean = CANARY_REQUESTS * CANARY_SHARE
    sigma = math.sqrt(CANARY_REQUESTS * CANARY_SHARE * (1 - CANARY_SHARE))
    assert abs(served["app-v2"] - mean) <= SIGMAS * sigma, (
        f"v2 served {served['app-v2']} of {CANARY_REQUESTS}, want {mean:.0f} ± "
        f"{SIGMAS * sigma:.0f}")
    # The backends' own records agree with the client, request for request.
    assert (len(v1.requests()), len(v2.requests())) == (served["app-v1"], served["app-v2"])
    # ... and so does the waypoint, which reports every one of them.
    eventually_equal("canary 200s", lambda: lab.requests_total("canary", response_code="200"),
                     before + CANARY_REQUESTS, lab)


# -- 2. retries --------------------------------------------------------------------------------

def test_retries_mask_a_backend_failing_half_its_requests(lab: WaypointLab) -> None:
    flaky = lab.serve(APP_V2, "flaky", fail_percent=50)
    host = SERVICES["flaky"].hostname  # labelled as istio_requests_total is
    retries_before = lab.waypoint_metric(RETRIES, destination_service=host)

    results = lab.curl([lab.url("flaky", "/order/[1-20]")])

    assert [r.status for r in results] == [200] * 20, results
    # The backend failed every other request: each first try failed and its retry worked.
    assert flaky.statuses() == [503, 200] * 20
    eventually_equal("retries", lambda: lab.waypoint_metric(RETRIES, destination_service=host),
                     retries_before + 20, lab)
    assert lab.requests_total("flaky", response_code="503") == 0


# -- 3. route timeout --------------------------------------------------------------------------

SLOW_MS = 1500


def test_slow_backend_hits_the_route_timeout(lab: WaypointLab) -> None:
    slow = lab.serve(APP_V2, "slow", delay_ms=SLOW_MS)
    before = lab.requests_total("slow", response_code="504", response_flags="UT")

    [timed] = lab.curl([lab.url("slow", "/report")])
    reply = lab.fetch(lab.url("slow", "/report"))

    assert timed.status == 504
    assert ROUTE_TIMEOUT <= timed.seconds < SLOW_MS / 1000, timed
    assert reply.status == 504
    assert "upstream request timeout" in reply.text()
    assert [r["path"] for r in slow.requests()] == ["/report", "/report"], \
        "the backend got the requests: it was slow, not unreachable"
    eventually_equal("504 UT", lambda: lab.requests_total(
        "slow", response_code="504", response_flags="UT"), before + 2, lab)


# -- 4. circuit breaker ------------------------------------------------------------------------

POOL_DELAY_MS = 1500
CONCURRENT = 6


def test_pending_request_overflow_answers_503_uo(lab: WaypointLab) -> None:
    """maxConnections 1 + http1MaxPendingRequests 1: one request on the connection, one
    waiting for it, every other one refused at once."""
    pool = lab.serve(APP_V2, "pool", delay_ms=POOL_DELAY_MS)
    before = lab.requests_total("pool", response_code="503", response_flags="UO")

    results = lab.curl([lab.url("pool", f"/slow/{i}") for i in range(CONCURRENT)],
                       parallel=CONCURRENT)

    codes = Counter(r.status for r in results)
    assert codes == {200: 2, 503: CONCURRENT - 2}, results
    overflowed = [r for r in results if r.status == 503]
    assert all(r.seconds < POOL_DELAY_MS / 1000 for r in overflowed), \
        f"an overflow waited instead of failing at once: {overflowed}"
    assert len(pool.requests()) == 2, "overflowed requests must not reach the backend"
    eventually_equal("503 UO", lambda: lab.requests_total(
        "pool", response_code="503", response_flags="UO"), before + CONCURRENT - 2, lab)


# -- 5. outlier detection ----------------------------------------------------------------------

def test_failing_endpoint_is_ejected_and_comes_back(lab: WaypointLab) -> None:
    good = lab.serve(APP_V1, "outlier")
    bad = lab.serve(APP_V2, "outlier", fail_percent=100)
    host = SERVICES["outlier"].hostname
    ejections_before = lab.waypoint_metric(EJECTIONS, destination_service=host)

    # Round robin: 2 x CONSECUTIVE_5XX requests give app-v2 its consecutive failures.
    first = lab.curl([lab.url("outlier", f"/warmup/[1-{2 * CONSECUTIVE_5XX}]")])
    assert Counter(r.status for r in first) == {200: CONSECUTIVE_5XX, 503: CONSECUTIVE_5XX}

    def health() -> dict[str, Any]:
        return dict(lab.endpoints("outlier")["app-v2"].get("health") or {})

    poll(lambda: health().get("ejected") is True, 5,
         lambda: f"app-v2 not ejected: {lab.endpoints('outlier')}\n{lab.logs()}")
    assert 0 < health()["seconds_left"] <= BASE_EJECTION + 0.5
    assert lab.waypoint_metric(EJECTIONS, destination_service=host) == ejections_before + 1

    # While ejected, everything goes to app-v1 and app-v2 sees nothing.
    seen_by_bad = len(bad.requests())
    during = lab.curl([lab.url("outlier", "/ejected/[1-10]")])
    still_ejected = health().get("ejected") is True
    assert still_ejected, "app-v2 came back too early for this check: raise BASE_EJECTION"
    assert {(r.status, r.served_by) for r in during} == {(200, "app-v1")}, during
    assert len(bad.requests()) == seen_by_bad

    # Healed, app-v2 comes back once its ejection time is over, and takes traffic again.
    bad.set(fail_percent=0)
    poll(lambda: health().get("ejected") is False, BASE_EJECTION + 5,
         lambda: f"app-v2 never came back: {lab.endpoints('outlier')}\n{lab.logs()}")
    after = lab.curl([lab.url("outlier", "/back/[1-10]")])
    assert Counter(r.status for r in after) == {200: 10}
    assert {r.served_by for r in after} == {"app-v1", "app-v2"}, after
    assert [r["path"] for r in bad.requests()[seen_by_bad:]] == [
        r.url.partition(":80")[2] for r in after if r.served_by == "app-v2"]
    assert len(good.requests()) == CONSECUTIVE_5XX + 10 + 10 - len(bad.requests()[seen_by_bad:])


# -- 6. L7 authorization -----------------------------------------------------------------------

def test_l7_deny_is_403_while_the_allowed_path_works(lab: WaypointLab) -> None:
    shop = lab.serve(APP_V1, "shop")
    before = lab.requests_total("shop", response_code="403", response_flags="DENY")

    allowed = lab.fetch(lab.url("shop", "/items"))
    denied = lab.fetch(lab.url("shop", "/admin/users"))

    assert (allowed.status, allowed.headers.get("x-served-by")) == (200, "app-v1")
    assert denied.status == 403
    assert denied.text().strip() == "RBAC: access denied"
    assert [r["path"] for r in shop.requests()] == ["/items"], "the denied path reached the app"
    eventually_equal("403 DENY", lambda: lab.requests_total(
        "shop", response_code="403", response_flags="DENY"), before + 1, lab)


# -- 7. no bypass ------------------------------------------------------------------------------

def _client_certificate(lab: WaypointLab) -> tuple[Path, Path, Path]:
    """A valid mesh identity (the client's) that is not the waypoint's."""
    out = lab.workdir / "bypass"
    cert, key, bundle = out.with_suffix(".crt"), out.with_suffix(".key"), out.with_suffix(".ca")
    proc = subprocess.run(
        [*NODEPROXY, "ca", "issue", "--dir", str(lab.mesh.ca_dir), "--spiffe-id", CLIENT_ID,
         "--out-cert", str(cert), "--out-key", str(key), "--out-bundle", str(bundle),
         "--force"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return cert, key, bundle


def test_clients_that_bypass_the_waypoint_are_refused(lab: WaypointLab) -> None:
    app = lab.serve(APP_V2, "flaky")
    pod = lab.cluster.pod(APP_V2)
    direct = f"{pod.ip}:{app.port}"

    def rejected() -> float:
        return metric_value(lab.mesh.metrics(pod.node), REJECTED, reason="waypoint_bypass")

    before = rejected()
    # Positive control: the same app answers through the waypoint.
    assert [r.status for r in lab.curl([lab.url("flaky", "/via-waypoint")])] == [200]

    # Plaintext from a pod outside the mesh, straight to the pod.
    [plain] = lab.curl([f"http://{direct}/plaintext"], pod=LEGACY, max_time=5)
    assert plain.status == 0, f"plaintext bypass got an HTTP answer: {plain}"
    # The agent resets the connection it accepted: depending on timing curl calls that a
    # failed connect (7), an empty reply (52) or a receive failure (56).
    assert plain.exit_code in (7, 52, 56), plain

    # HBONE with a valid mesh identity that is not the waypoint's: 401 on the CONNECT.
    cert, key, bundle = _client_certificate(lab)
    hbone = lab.cluster.exec(LEGACY_SAME_NODE, [
        *NODEPROXY, "hbone", "connect", f"{pod.ip}:15008", "--authority", direct,
        "--cert", str(cert), "--key", str(key), "--ca", str(bundle), "--timeout", "5",
    ], input="GET /hbone HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert hbone.returncode == 4, f"want exit 4 (denied, 401): {hbone.returncode} " \
                                  f"{hbone.stdout} {hbone.stderr}"
    assert "401" in hbone.stdout + hbone.stderr

    assert [r["path"] for r in app.requests()] == ["/via-waypoint"]
    eventually_equal("waypoint_bypass rejections", rejected, before + 2, lab)


# -- keep-alive ---------------------------------------------------------------------------------

def test_keep_alive_requests_share_one_tunnel(lab: WaypointLab) -> None:
    app = lab.serve(APP_V1, "shop")
    results = lab.curl([lab.url("shop", "/keep/[1-3]")], headers=())  # curl's keep-alive
    assert [r.status for r in results] == [200] * 3
    assert len(app.requests()) == 3
    # One connection for all three: the waypoint answered each request on the same one
    # (a stalled answer makes curl give up on it and open another).
    assert [r.connects for r in results] == [1, 0, 0], results
