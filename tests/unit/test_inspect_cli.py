"""`nodeproxy workloads|services|policies|certificates|connections|explain --admin`: golden
output against a fake admin API (a real HTTP server on 127.0.0.1 serving recorded JSON)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli.inspect_cmd import certificates_table, enrollment_failure_lines
from cli.main import cli

DUMP: dict[str, Any] = {
    "trustDomain": "cluster.local",
    "workloads": [
        {"uid": "u1", "name": "client", "namespace": "default", "serviceAccount": "client",
         "workloadIps": ["10.0.1.1"], "node": "node1", "protocol": "HBONE"},
        {"uid": "u2", "name": "web-1", "namespace": "default", "serviceAccount": "web",
         "workloadIps": ["10.0.1.2"], "node": "node1", "protocol": "HBONE",
         "services": {"default/web.default.svc.cluster.local": {"80": 9080}}},
        {"uid": "u3", "name": "web-2", "namespace": "default", "serviceAccount": "web",
         "workloadIps": ["10.0.2.2"], "node": "node2", "protocol": "HBONE", "healthy": False,
         "services": {"default/web.default.svc.cluster.local": {"80": 9080}}},
        {"uid": "u4", "name": "db", "namespace": "legacy", "workloadIps": ["10.0.1.3"],
         "node": "node1", "protocol": "TCP"},
    ],
    "services": [
        {"name": "web", "namespace": "default", "hostname": "web.default.svc.cluster.local",
         "vips": ["/10.96.0.10"], "ports": {"80": 9080}},
    ],
    "policies": [
        {"name": "deny-legacy", "namespace": "default", "scope": "Namespace", "action": "Deny",
         "rules": [[[{"namespaces": ["legacy"]}]]]},
    ],
    "node": "node1",
    "enrolled": ["u1", "u2"],
    "enrollmentFailures": {},
    "certificates": [
        {"identity": "spiffe://cluster.local/ns/default/sa/client", "state": "available",
         "serial": "1a2b", "not_before": "2030-01-01T00:00:00+00:00",
         "not_after": "2030-01-02T00:00:00+00:00", "failures": 0, "last_error": None,
         "chain": [{"type": "Leaf", "serial": "1a2b", "notBefore": "2030-01-01T00:00:00+00:00",
                    "notAfter": "2030-01-02T00:00:00+00:00"}],
         "roots": [{"type": "Root", "serial": "ff01", "notBefore": "2029-01-01T00:00:00+00:00",
                    "notAfter": "2039-01-01T00:00:00+00:00"}]},
        {"identity": "spiffe://cluster.local/ns/default/sa/web", "state": "unavailable",
         "serial": None, "not_before": None, "not_after": None, "failures": 3,
         "last_error": "CA unreachable", "chain": [], "roots": []},
    ],
    "configReloads": {"ok": 1, "failed": 0},
}
CONNECTIONS = [
    {"id": "out-1", "started": 1.0, "direction": "outbound", "workload": "default/client",
     "local": "10.0.1.1:40000", "remote": "10.0.1.2:15008", "target": "10.96.0.10:80",
     "protocol": "HBONE"},
    {"id": "in-2", "started": 2.0, "direction": "inbound", "workload": "default/web-1",
     "local": "10.0.1.2:9080", "remote": "10.0.1.1", "target": "10.0.1.2:9080",
     "protocol": "HBONE"},
]


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, Any]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, {"error": "not found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


def _serve(routes: dict[str, tuple[int, Any]]) -> Iterator[str]:
    handler = type("H", (_Handler,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def admin() -> Iterator[str]:
    yield from _serve({"/config_dump": (200, DUMP), "/debug/connections": (200, CONNECTIONS)})


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_workloads_table(admin: str) -> None:
    code, out = run("workloads", "--admin", admin)
    assert code == 0, out
    assert out == (
        "NAMESPACE POD NAME ADDRESS  NODE  WAYPOINT PROTOCOL\n"
        "default   client   10.0.1.1 node1 None     HBONE\n"
        "default   web-1    10.0.1.2 node1 None     HBONE\n"
        "default   web-2    10.0.2.2 node2 None     HBONE\n"
        "legacy    db       10.0.1.3 node1 None     TCP\n"
    )


def test_enrollment_failures_are_listed_under_the_workloads_table() -> None:
    dump = {**DUMP, "enrollmentFailures": {"u2": "CA service unreachable"}}
    assert enrollment_failure_lines(dump) == [
        "NOT ENROLLED (traffic refused until enrolled): u2: CA service unreachable"]
    assert enrollment_failure_lines(DUMP) == []


def test_services_table_counts_healthy_endpoints(admin: str) -> None:
    code, out = run("services", "--admin", admin)
    assert code == 0, out
    assert out == (
        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS\n"
        "default   web          10.96.0.10  None     1/2\n"
    )


def test_policies_table(admin: str) -> None:
    code, out = run("policies", "--admin", admin)
    assert (code, out) == (0, "NAMESPACE POLICY NAME ACTION SCOPE\n"
                              "default   deny-legacy Deny   Namespace\n")


def test_certificates_table_leaf_and_root_rows() -> None:
    now = datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert certificates_table(DUMP["certificates"], now) == (
        "CERTIFICATE NAME                            TYPE STATUS      VALID CERT SERIAL NUMBER "
        "NOT AFTER            NOT BEFORE\n"
        "spiffe://cluster.local/ns/default/sa/client Leaf Available   true       1a2b          "
        "2030-01-02T00:00:00Z 2030-01-01T00:00:00Z\n"
        "spiffe://cluster.local/ns/default/sa/client Root Available   true       ff01          "
        "2039-01-01T00:00:00Z 2029-01-01T00:00:00Z\n"
        "spiffe://cluster.local/ns/default/sa/web    Leaf Unavailable false      -             "
        "-                    -\n"
    )


def test_certificates_command_marks_not_yet_valid(admin: str) -> None:
    code, out = run("certificates", "--admin", admin)
    assert code == 0, out
    leaf = out.splitlines()[1].split()
    assert leaf[:4] == ["spiffe://cluster.local/ns/default/sa/client", "Leaf", "Available",
                        "false"]  # notBefore is in 2030


def test_connections_table(admin: str) -> None:
    code, out = run("connections", "--admin", admin)
    assert code == 0, out
    assert out == (
        "WORKLOAD       DIRECTION LOCAL          REMOTE         REMOTE TARGET PROTOCOL\n"
        "default/client outbound  10.0.1.1:40000 10.0.1.2:15008 10.96.0.10:80 HBONE\n"
        "default/web-1  inbound   10.0.1.2:9080  10.0.1.1       10.0.1.2:9080 HBONE\n"
    )


@pytest.mark.parametrize(("command", "key"), [
    ("workloads", "workloads"), ("services", "services"), ("policies", "policies"),
    ("certificates", "certificates"),
])
def test_json_and_yaml_give_the_dumped_entries(admin: str, command: str, key: str) -> None:
    code, out = run(command, "--admin", admin, "-o", "json")
    assert code == 0, out
    assert json.loads(out) == DUMP[key]
    code, out = run(command, "--admin", admin, "-o", "yaml")
    assert code == 0, out
    assert yaml.safe_load(out) == DUMP[key]


def test_connections_json(admin: str) -> None:
    code, out = run("connections", "--admin", admin, "-o", "json")
    assert (code, json.loads(out)) == (0, CONNECTIONS)


def test_explain_from_the_live_snapshot(admin: str) -> None:
    code, out = run("explain", "--admin", admin, "--from", "db", "--to", "10.0.1.2:9080",
                    "-o", "json")
    assert code == 0, out
    doc = json.loads(out)
    # A plaintext source has no verified namespace, so the namespace Deny cannot match it.
    assert doc["verdict"] == "allowed"
    [outcome] = doc["outcomes"]
    assert (outcome["path"], outcome["policy"], outcome["mtlsMode"]) == \
        ("PLAINTEXT", None, "PERMISSIVE")
    code, out = run("explain", "--admin", admin, "--from", "client", "--to", "10.96.0.10:80")
    assert code == 0, out
    assert "verdict     allowed" in out
    assert "default/web-2 10.0.2.2 node2 no: unhealthy" in out
    assert "path      HBONE via 10.0.1.2:15008 -> 10.0.1.2:9080" in out
    assert "expects   spiffe://cluster.local/ns/default/sa/web" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", ["workloads", "services", "policies", "certificates",
                                     "connections"])
def test_unreachable_agent_is_one_clear_line(command: str) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    code, out = run(command, "--admin", addr)
    assert code == 1
    assert out == (
        f"error: cannot reach the agent's admin API at {addr}: connection refused (is "
        "`nodeproxy run` running on this node? the admin API listens on localhost only)\n"
    )


def test_refused_admin_request_is_explained() -> None:
    for addr in _serve({"/config_dump": (403, {"error": "admin API is served to localhost "
                                                       "only"})}):
        code, out = run("workloads", "--admin", addr)
        assert code == 1
        assert "answered /config_dump with HTTP 403" in out
        assert "localhost" in out


def test_agent_without_config_is_reported() -> None:
    for addr in _serve({"/config_dump": (200, {"node": "node1", "enrolled": []})}):
        code, out = run("workloads", "--admin", addr)
        assert code == 1
        assert "has no config loaded yet" in out


def test_explain_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: DUMP[k] for k in ("workloads", "services", "policies")}))
    code, out = run("explain", "--config", str(path), "--from", "10.0.1.1",
                    "--to", "10.0.1.3:5432")
    assert code == 0, out
    assert "path      PASSTHROUGH -> 10.0.1.3:5432" in out
    assert "verdict     not enforced" in out
    code, out = run("explain", "--config", str(path), "--admin", "x:1", "--from", "a",
                    "--to", "1.1.1.1:1")
    assert code == 2
    assert "not both" in out


def test_node_certificate_line_reports_renewal_failures() -> None:
    from cli.inspect_cmd import node_certificate_line

    node = {"identity": "spiffe://cluster.local/node/node1", "serial": "ab",
            "not_after": "2026-12-24T00:00:00+00:00", "renew_at": "2026-12-09T00:00:00+00:00",
            "failures": 0, "last_error": None}
    assert node_certificate_line(node) == (
        "node certificate spiffe://cluster.local/node/node1 serial ab valid until "
        "2026-12-24T00:00:00+00:00, renews at 2026-12-09T00:00:00+00:00")
    failing = {**node, "failures": 2, "last_error": "CA service down"}
    assert node_certificate_line(failing).endswith(
        "; 2 renewal failure(s), last: CA service down")
