"""The multi-VM cluster: cp (CA service) + node1/node2 (agents as systemd units), pods as
network namespaces inside the nodes, pod IPs routed over the private network.

Tests run in file order against one cluster; each leaves the agents running and ready.
"""

from __future__ import annotations

import re
import threading
import time

from tests.vagrant.cluster import (
    ECHO_PORT,
    POD_IP,
    Cluster,
    Result,
    cross_vm_hbone_only,
    marker,
)

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"


def test_cross_vm_traffic_is_hbone_tls_only(cluster: Cluster) -> None:
    cross_vm_hbone_only(cluster)


def test_authorization_deny(cluster: Cluster) -> None:
    res = cluster.echo("intruder-0", "echo-0", marker())
    assert res.rc != 0, f"intruder-0 reached echo-0: {res.out}"
    _, metrics = cluster.http_get("node2", "http://127.0.0.1:15020/metrics")
    denied = [
        line for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_") and 'response_flags="DENY"' in line
        and "intruder" in line
    ]
    assert denied, "node2 recorded no DENY for intruder-0"
    # The allowed client still gets through (the deny is per identity, not a broken path).
    ok = cluster.echo("client-0", "echo-0", "still-allowed")
    assert ok.rc == 0, ok.out


def test_journal_shows_ready_and_watchdog_pings(cluster: Cluster) -> None:
    props = cluster.unit_props("node1", "nodeproxy", "Type", "ActiveState", "WatchdogUSec",
                               "NRestarts")
    # Type=notify: systemd logs "Started ..." and reports "active" only after READY=1.
    assert props["Type"] == "notify", props
    assert props["ActiveState"] == "active", props
    assert props["WatchdogUSec"] not in ("0", "infinity", ""), props
    journal = cluster.journal("node1", "nodeproxy")
    assert re.search(r"agent for node node1 started", journal), journal[-2000:]
    assert re.search(r"^Started nodeproxy", journal, re.M), journal[-2000:]
    # Armed is not enough: the agent must keep pinging (every WatchdogSec/2 = 15 s).
    first = cluster.unit_props("node1", "nodeproxy", "WatchdogTimestampMonotonic")
    time.sleep(17)
    second = cluster.unit_props("node1", "nodeproxy", "WatchdogTimestampMonotonic", "NRestarts")
    assert int(second["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"]), (
        first, second)
    assert second["NRestarts"] == props["NRestarts"], (props, second)


def test_restart_recovers(cluster: Cluster) -> None:
    cluster.sh("node1", "systemctl restart nodeproxy")
    cluster.wait_ready("node1")
    secret = marker()
    res = cluster.echo("client-0", "echo-0", secret)
    assert res.rc == 0, res
    assert res.out.strip() == secret, res


def test_stop_fails_closed(cluster: Cluster) -> None:
    cluster.sh("node1", "systemctl stop nodeproxy")
    try:
        assert cluster.sh("node1", "systemctl is-active nodeproxy", check=False).rc != 0
        # Capture rules stay in the pod: with no agent the connection is refused, not sent
        # in plaintext to echo-0.
        res = cluster.echo("client-0", "echo-0", marker())
        assert res.rc == 2, f"expected a failed connect with the agent stopped: {res}"
        rules = cluster.sh("node1", "ip netns exec pv-client-0 iptables-save -t nat").out
        assert "15001" in rules, rules
    finally:
        cluster.sh("node1", "systemctl start nodeproxy")
        cluster.wait_ready("node1")
    res = cluster.echo("client-0", "echo-0", "back")
    assert res.rc == 0, res


_FOREIGN_CSR = """
/opt/nodeproxy/venv/bin/python - <<'PY'
import asyncio, pathlib, re
from nodeproxy.identity.ca import new_key_and_csr
from nodeproxy.identity.ca_client import RemoteCaClient
from ztunnel_cfg.spiffe import SpiffeId
etc = pathlib.Path("/etc/nodeproxy")
cert, key = (etc / "node.crt").read_bytes(), (etc / "node.key").read_bytes()
# The bootstrap certificate lives NPV_NODE_LIFETIME (180 s) and may have expired by now: use
# the agent's renewal when it has one (node.pem: key + chain).
renewed = pathlib.Path("/var/lib/nodeproxy/node.pem")
if renewed.exists():
    pem = renewed.read_bytes()
    pems = re.findall(rb"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----\\n?", pem, re.S)
    key = b"".join(p for p in pems if b"PRIVATE KEY" in p.splitlines()[0])
    cert = b"".join(p for p in pems if b"CERTIFICATE" in p.splitlines()[0])
client = RemoteCaClient("https://172.30.187.10:15012", cert, key, (etc / "bundle.pem").read_bytes())
for uri in ("{own}", "{foreign}"):
    identity = SpiffeId.parse(uri)
    _key, csr = new_key_and_csr(identity)
    try:
        asyncio.run(client.sign(identity, csr))
        print("ISSUED", uri)
    except Exception as exc:
        print("REFUSED", uri, type(exc).__name__, exc)
PY
"""


def test_ca_refuses_identity_of_other_node(cluster: Cluster) -> None:
    out = cluster.sh("node1", _FOREIGN_CSR.format(own=CLIENT_ID, foreign=ECHO_ID)).out
    assert f"ISSUED {CLIENT_ID}" in out, out
    assert f"REFUSED {ECHO_ID}" in out, out
    refused = next(line for line in out.splitlines() if line.startswith("REFUSED"))
    assert "(403)" in refused, refused


def _issued_serials(cluster: Cluster, identity: str) -> set[str]:
    journal = cluster.journal("cp", "nodeproxy-ca")
    return {
        m.group(1) for line in journal.splitlines()
        if f"identity={identity}" in line and line.rstrip().endswith("issued")
        for m in [re.search(r"serial=(\S+)", line)] if m
    }


def test_rotation_keeps_long_connection(cluster: Cluster) -> None:
    lifetime = cluster.sh("cp", "cat /etc/nodeproxy/ca.env").out
    found = re.search(r"--lifetime (\d+)s", lifetime)
    assert found, f"no --lifetime in cp's ca.env: {lifetime}"
    seconds = int(found.group(1))
    hold = seconds * 0.5 + 40  # past the half-life refresh of every certificate in use
    before = _issued_serials(cluster, CLIENT_ID) | _issued_serials(cluster, ECHO_ID)
    result: dict[str, Result] = {}

    def long_connection() -> None:
        result["res"] = cluster.pod(
            "client-0", f"hold {POD_IP['echo-0']} {ECHO_PORT} {hold:.0f}", timeout=hold + 120)

    t = threading.Thread(target=long_connection)
    t.start()
    t.join(hold + 150)
    res = result.get("res")
    assert res is not None, "long connection did not finish"
    assert res.rc == 0, f"long connection broke during rotation: {res}"
    rounds = int(res.out.strip())
    assert rounds >= hold, f"only {rounds} round trips in {hold:.0f} s"
    after = _issued_serials(cluster, CLIENT_ID) | _issued_serials(cluster, ECHO_ID)
    assert after - before, f"no certificate was rotated in {hold:.0f} s (lifetime {seconds} s)"
    # And new connections work with the rotated certificates.
    assert cluster.echo("client-0", "echo-0", "after-rotation").rc == 0


def _not_after_epoch(cluster: Cluster, vm: str, pem_path: str) -> int:
    """notAfter of the first certificate in ``pem_path`` (the guests have no openssl CLI)."""
    script = (
        "/opt/nodeproxy/venv/bin/python - <<'PY'\n"
        "from cryptography import x509\n"
        f"cert = x509.load_pem_x509_certificates(open({pem_path!r}, 'rb').read())[0]\n"
        "print(int(cert.not_valid_after_utc.timestamp()))\n"
        "PY\n"
    )
    return int(cluster.sh(vm, script).out.strip())


def test_node_certificate_renewed_persisted_and_used_after_restart(cluster: Cluster) -> None:
    # Provisioning issued the bootstrap node certificates with a short lifetime
    # (NPV_NODE_LIFETIME, default 180 s): by now the agents must have renewed them.
    journal = cluster.journal("node1", "nodeproxy")
    assert "node certificate renewed" in journal, journal[-3000:]
    stat = cluster.sh("node1", "stat -c '%a %U' /var/lib/nodeproxy/node.pem").out.split()
    assert stat == ["600", "root"], stat
    # node.pem = key then chain; its leaf must outlive the bootstrap certificate.
    bootstrap_end = _not_after_epoch(cluster, "node1", "/etc/nodeproxy/node.crt")
    stored_end = _not_after_epoch(cluster, "node1", "/var/lib/nodeproxy/node.pem")
    assert stored_end > bootstrap_end
    now = int(cluster.sh("node1", "date +%s").out)
    if now <= bootstrap_end:
        time.sleep(bootstrap_end - now + 2)
    # A restart after the bootstrap certificate expired starts from the stored renewal.
    cluster.sh("node1", "systemctl restart nodeproxy")
    cluster.wait_ready("node1")
    restarted = cluster.sh(
        "node1", "journalctl -u nodeproxy --no-pager -o cat --since '-60s'").out
    assert "stored renewal" in restarted, restarted[-3000:]
    secret = marker()
    res = cluster.echo("client-0", "echo-0", secret)
    assert res.rc == 0, res
    assert res.out.strip() == secret, res
