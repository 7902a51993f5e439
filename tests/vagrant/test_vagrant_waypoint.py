"""The L7 layer across VMs: one canary split and one retry scenario through a real waypoint.

The waypoint ``default/waypoint`` runs on cp's private address as the packaged
``nodeproxy-waypoint@default-waypoint.service`` (laid down by ``nodeproxy install --systemd
--waypoint default/waypoint`` during provisioning; DynamicUser, node credentials of node "cp"
through LoadCredential=).  ``client-0`` (node1) calls the services ``web`` (canary 80/20 by
version: web-v1, web-v2 on node2) and ``flaky`` (web-v1's second app, failing every other
request; the route retries 5xx)::

    client-0 (node1) -> agent node1 =HBONE=> waypoint (cp) =HBONE=> agent node2 -> web-v1/v2

Each scenario is judged by three parties: the client (every answer), the backends (their own
record of every request they got) and the waypoint (its /metrics).  Metrics are compared as
differences.  Runs after test_vagrant_cluster.py; the last test stops the waypoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.vagrant.cluster import POD_IP, Cluster, in_pod, metric_by, metric_sum, poll

WAYPOINT_VM = "cp"
WAYPOINT_UNIT = "nodeproxy-waypoint@default-waypoint.service"
WAYPOINT_ENV = "/etc/nodeproxy/waypoint-default-waypoint.env"
WAYPOINT_METRICS = "http://127.0.0.1:15120/metrics"
WAYPOINT_READY = "http://127.0.0.1:15121/healthz/ready"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
WEB_VIP, FLAKY_VIP = "10.96.0.20", "10.96.0.21"
WEB_HOST, FLAKY_HOST = "web.default.svc.cluster.local", "flaky.default.svc.cluster.local"
WEB_PORT, FLAKY_PORT = 8081, 8082

REQUESTS = "istio_requests_total"
RETRIES = "nodeproxy_waypoint_retries_total"
REJECTED = "nodeproxy_connections_rejected_total"

CANARY_REQUESTS = 200
CANARY_SHARE = 0.20  # web-v2's weight in the route (cluster.yaml: 80/20)
SIGMAS = 4.5  # a correct split fails this about once in 150,000 runs
RETRY_REQUESTS = 30

# The HTTP apps of this module: name -> (pod, port, fail_every).  Run on node2 as transient
# units inside the pods' network namespaces; each records every request it got.
APPS: dict[str, tuple[str, int, int]] = {
    "web-v1": ("web-v1", WEB_PORT, 0),
    "web-v2": ("web-v2", WEB_PORT, 0),
    "flaky": ("web-v1", FLAKY_PORT, 2),
}
RECORDS = "/run/npv-http"


def _record(cluster: Cluster, app: str) -> list[dict[str, Any]]:
    out = cluster.sh("node2", f"cat {RECORDS}/{app}.jsonl").out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _get(cluster: Cluster, vm: str, url: str, count: int, netns: str | None = None,
         timeout: float = 300) -> dict[str, Any]:
    """``count`` sequential GETs (one keep-alive connection) from ``netns`` on ``vm`` (or its
    host network): the client's own account of every answer."""
    prefix = in_pod(netns) if netns else ""
    res = cluster.sh(vm, f"{prefix}python3 /opt/npv-test/podnet.py get '{url}' {count}",
                     timeout=timeout)
    result: dict[str, Any] = json.loads(res.out)
    return result


def _waypoint_metrics(cluster: Cluster) -> str:
    status, text = cluster.http_get(WAYPOINT_VM, WAYPOINT_METRICS)
    assert status == 200, f"waypoint /metrics answered {status}"
    return text


def _node_metrics(cluster: Cluster, vm: str) -> str:
    status, text = cluster.http_get(vm, "http://127.0.0.1:15020/metrics")
    assert status == 200, f"{vm} /metrics answered {status}"
    return text


def _waypoint_log(cluster: Cluster) -> str:
    return cluster.sh(WAYPOINT_VM, f"journalctl -u {WAYPOINT_UNIT} --no-pager -o cat -n 25",
                      check=False).out


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[None]:
    start = [f"rm -rf {RECORDS}; mkdir -p {RECORDS}"]
    for app, (pod, port, fail_every) in APPS.items():
        start.append(
            f"systemctl reset-failed pv-http-{app} 2>/dev/null || true; "
            f"systemd-run -q --unit=pv-http-{app} ip netns exec pv-{pod} /usr/bin/python3 "
            f"/opt/npv-test/podnet.py http {port} {pod} {RECORDS}/{app}.jsonl {fail_every}")
    for app, (pod, port, _) in APPS.items():
        start.append(
            f"for i in $(seq 150); do ip netns exec pv-{pod} ss -Hltn 'sport = :{port}' "
            f"| grep -q . && break; sleep 0.2; done; "
            f"ip netns exec pv-{pod} ss -Hltn 'sport = :{port}' | grep -q . "
            f"|| {{ echo '{app} not listening on {port}'; journalctl -u pv-http-{app}; exit 1; }}")
    cluster.sh("node2", "\n".join(start))
    yield
    cluster.sh("node2", "systemctl stop " + " ".join(f"pv-http-{a}" for a in APPS)
               + f"; rm -rf {RECORDS}", check=False)


def test_waypoint_runs_as_the_packaged_unprivileged_unit(cluster: Cluster) -> None:
    props = cluster.unit_props(
        WAYPOINT_VM, WAYPOINT_UNIT, "Type", "ActiveState", "SubState", "DynamicUser",
        "WatchdogUSec", "NRestarts", "FragmentPath", "MainPID")
    assert props["Type"] == "notify", props
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["DynamicUser"] == "yes", props
    assert props["WatchdogUSec"] not in ("0", "infinity", ""), props
    assert props["NRestarts"] == "0", props
    assert props["FragmentPath"] == "/etc/systemd/system/nodeproxy-waypoint@.service", props
    # What the process really got: a dynamic uid, no capability, no_new_privs.
    status = cluster.sh(WAYPOINT_VM, f"cat /proc/{props['MainPID']}/status").out
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields["Uid"].split()
    assert "0" not in uids, fields["Uid"]
    assert len(set(uids)) == 1, fields["Uid"]
    assert int(fields["CapEff"], 16) == 0, status
    assert int(fields["CapBnd"], 16) == 0, status
    assert fields["NoNewPrivs"].strip() == "1", status
    # The env file is the one `nodeproxy install --waypoint` wrote (0640, root).
    env = cluster.sh(WAYPOINT_VM, f"stat -c '%a %U' {WAYPOINT_ENV}; cat {WAYPOINT_ENV}").out
    assert env.startswith("640 root\n"), env
    assert "--listen-ip 172.30.187.10" in env, env
    # systemd logs "Started ..." only after READY=1; readiness answers on the + 100 port.
    journal = cluster.journal(WAYPOINT_VM, WAYPOINT_UNIT)
    assert re.search(rf"^Started {re.escape(WAYPOINT_UNIT)} - nodeproxy waypoint proxy "
                     "default/waypoint", journal, re.M), journal[-2000:]
    assert "waypoint default/waypoint serving" in journal, journal[-2000:]
    assert cluster.http_get(WAYPOINT_VM, WAYPOINT_READY)[0] == 200


def test_canary_split_across_vms(cluster: Cluster, apps: None) -> None:
    before = metric_by(_waypoint_metrics(cluster), REQUESTS, "destination_workload",
                       reporter="waypoint", destination_service=WEB_HOST, response_code="200",
                       source_principal=CLIENT_ID)

    got = _get(cluster, "node1", f"http://{WEB_VIP}/canary/{{i}}", CANARY_REQUESTS,
               netns="client-0")

    assert got["errors"] == [], got
    assert got["statuses"] == {"200": CANARY_REQUESTS}, got
    pods = got["pods"]
    assert set(pods) <= {"web-v1", "web-v2"}, got
    assert sum(pods.values()) == CANARY_REQUESTS, got
    # Keep-alive: every request on the one connection the client opened.
    assert got["connections"] == 1, got
    v2 = pods.get("web-v2", 0)
    mean = CANARY_REQUESTS * CANARY_SHARE
    sigma = math.sqrt(CANARY_REQUESTS * CANARY_SHARE * (1 - CANARY_SHARE))
    assert abs(v2 - mean) <= SIGMAS * sigma, (
        f"web-v2 got {v2} of {CANARY_REQUESTS} requests, want {mean:.0f} +- "
        f"{SIGMAS * sigma:.1f} ({SIGMAS} sigma of a {CANARY_SHARE:.0%} split)")
    # Each backend's own record agrees with what the client saw, request for request.
    for app in ("web-v1", "web-v2"):
        paths = [r["path"] for r in _record(cluster, app) if r["path"].startswith("/canary/")]
        assert len(paths) == pods.get(app, 0), (app, len(paths), pods)
    # And so does the waypoint: istio_requests_total per destination workload, from client-0.
    def split() -> dict[str, float]:
        after = metric_by(_waypoint_metrics(cluster), REQUESTS, "destination_workload",
                          reporter="waypoint", destination_service=WEB_HOST,
                          response_code="200", source_principal=CLIENT_ID)
        return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k)}

    want = {k: float(v) for k, v in pods.items()}
    poll(lambda: split() == want, 20, lambda: f"waypoint counted {split()}, client saw {want}")


def test_retries_mask_a_flaky_backend_across_vms(cluster: Cluster, apps: None) -> None:
    def counts() -> tuple[float, ...]:
        """(retries, answers 200, answers 503) of the waypoint for flaky."""
        text = _waypoint_metrics(cluster)
        return (metric_sum(text, RETRIES, destination_service=FLAKY_HOST),
                *(metric_sum(text, REQUESTS, reporter="waypoint", destination_service=FLAKY_HOST,
                             response_code=code) for code in ("200", "503")))

    before = counts()

    got = _get(cluster, "node1", f"http://{FLAKY_VIP}/order/{{i}}", RETRY_REQUESTS,
               netns="client-0")

    assert got["errors"] == [], got
    assert got["statuses"] == {"200": RETRY_REQUESTS}, got
    assert got["pods"] == {"web-v1": RETRY_REQUESTS}, got
    # The backend failed every other request it got: each first try, and the retry worked.
    record = _record(cluster, "flaky")
    assert [r["status"] for r in record] == [503, 200] * RETRY_REQUESTS, record
    assert [r["path"] for r in record[1::2]] == [
        f"/order/{i}" for i in range(1, RETRY_REQUESTS + 1)]
    # The waypoint retried each once and answered the client 200 every time, never 503.
    want = (RETRY_REQUESTS, RETRY_REQUESTS, 0)
    last: list[tuple[float, ...]] = []

    def grown() -> bool:
        last[:] = [tuple(a - b for a, b in zip(counts(), before, strict=True))]
        return last[0] == want

    poll(grown, 20, lambda: f"(retries, 200, 503) grew by {last}, want {want}\n"
                            f"{_waypoint_log(cluster)}")


_HBONE_BYPASS = """
d=$(mktemp -d)
trap 'rm -rf $d' EXIT
cat > $d/bypass.py <<'PY'
import pathlib, sys
from nodeproxy.hbone.client_tool import ConnectOptions, connect
from nodeproxy.identity.ca import CertificateAuthority, new_key_and_csr
from nodeproxy.identity.svid import private_key_pem
from ztunnel_cfg.spiffe import SpiffeId
from datetime import timedelta
d = pathlib.Path(sys.argv[1])
ca = CertificateAuthority.load("/var/lib/nodeproxy/ca")
identity = SpiffeId.parse("{client}")
key, csr = new_key_and_csr(identity)
issued = ca.sign_csr(csr, identity, timedelta(minutes=10))
(d / "c.crt").write_bytes(issued.chain_pem)
(d / "c.key").write_bytes(private_key_pem(key))
(d / "ca.pem").write_bytes(ca.trust_bundle_pem)
sys.exit(connect(ConnectOptions("{target}", 15008, "{authority}", d / "c.crt", d / "c.key",
                                d / "ca.pem", timeout=10)))
PY
printf 'GET /bypass-hbone HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' \\
  | /opt/nodeproxy/venv/bin/python $d/bypass.py $d
"""


def test_bypassing_the_waypoint_is_refused(cluster: Cluster, apps: None) -> None:
    direct = f"{POD_IP['web-v1']}:{WEB_PORT}"

    def rejected() -> float:
        return metric_sum(_node_metrics(cluster, "node2"), REJECTED, reason="waypoint_bypass")

    before = rejected()
    # Plaintext straight to the pod, from node1's host network (outside the mesh).
    plain = _get(cluster, "node1", f"http://{direct}/bypass-plaintext", 1, timeout=60)
    assert plain["statuses"] == {}, plain
    assert plain["errors"], plain
    # HBONE with a valid mesh identity (client's, issued by the CA on cp) that is not the
    # waypoint's: refused with 401 on the CONNECT.  One process does what `nodeproxy ca issue`
    # + `nodeproxy hbone connect` do (the CLI's imports cost ~12 s per command on cp).
    hbone = cluster.sh(WAYPOINT_VM, _HBONE_BYPASS.format(
        client=CLIENT_ID, target=f"{POD_IP['web-v1']}", authority=direct), check=False)
    assert hbone.rc == 4, f"want exit 4 (denied, 401): {hbone}"
    assert "401" in hbone.out + hbone.err, hbone
    assert not [r for r in _record(cluster, "web-v1") if r["path"].startswith("/bypass")]
    poll(lambda: rejected() - before == 2, 20,
         lambda: f"node2 waypoint_bypass rejections: {rejected() - before}, want 2")


def test_waypoint_stops_cleanly_and_its_services_fail_closed(cluster: Cluster,
                                                              apps: None) -> None:
    cluster.sh(WAYPOINT_VM, f"systemctl stop {WAYPOINT_UNIT}; systemctl disable -q "
                            f"{WAYPOINT_UNIT}")
    props = cluster.unit_props(WAYPOINT_VM, WAYPOINT_UNIT, "ActiveState", "Result",
                               "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
        props, _waypoint_log(cluster))
    # No waypoint, no way around it: the client's requests fail instead of going direct.
    got = _get(cluster, "node1", f"http://{WEB_VIP}/after-stop", 1, netns="client-0",
               timeout=60)
    assert "200" not in got["statuses"], got
    assert not [r for r in _record(cluster, "web-v1") if r["path"] == "/after-stop"]
