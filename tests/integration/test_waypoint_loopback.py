"""A waypoint between two agents on loopback: the L7 data path end to end, in one process.

node1 runs the client pod (127.0.1.1); node2 runs two versions of ``echo`` (127.0.2.1 v1,
127.0.2.2 v2), a ``flaky`` backend, and the waypoint (127.0.2.9).  Real TLS 1.3, real HBONE
both hops (client agent -> waypoint -> destination agent), real HTTP/1.1 servers (aiohttp).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from aiohttp import web

from nodeproxy.app import AgentApp, AgentOptions
from nodeproxy.errors import ProxyError
from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import LocalCaClient
from nodeproxy.metrics import Metrics
from nodeproxy.proxy import tunnel
from nodeproxy.proxy.env import ProxyEnv
from nodeproxy.waypoint.app import WaypointApp, WaypointOptions
from nodeproxy.waypoint.http1 import MessageEnd, ResponseHead, ResponseReader
from nodeproxy.waypoint.proxy import WaypointSettings
from nodeproxy.waypoint.telemetry import WaypointMetrics
from tests.helpers.waiting import eventually
from ztunnel_cfg.explain import HttpQuery, Verdict, explain
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.spiffe import SpiffeId

REPO = Path(__file__).resolve().parents[2]
APP_PORT = 18180
VIP = "10.96.0.10"
FLAKY_VIP = "10.96.0.11"
GRPC_VIP = "10.96.0.12"
LIMITED_VIP = "10.96.0.13"  # echo-v1 alone; http2MaxRequests 1, maxRequestsPerConnection 1
GRPC_LIMITED_VIP = "10.96.0.14"  # grpc on echo-v1 alone; maxConnections 1, 1 request each
# Every connection the grpc-client pod makes goes to the gRPC service (grpcio cannot bind a
# source port, so its original destination is keyed by the pod's listener address).
FIXED_TARGETS = {"127.0.1.3": (GRPC_VIP, 80)}

CONFIG = textwrap.dedent(f"""
    workloads:
    - {{name: client, namespace: default, serviceAccount: client, workloadIps: ["127.0.1.1"],
       node: node1}}
    - name: echo-v1
      namespace: default
      serviceAccount: echo
      workloadIps: ["127.0.2.1"]
      node: node2
      canonicalRevision: v1
      services: {{"default/echo.default.svc.cluster.local": {{80: {APP_PORT}}},
                 "default/flaky.default.svc.cluster.local": {{80: {APP_PORT + 1}}},
                 "default/grpc.default.svc.cluster.local": {{80: {APP_PORT + 2}}},
                 "default/limited.default.svc.cluster.local": {{80: {APP_PORT}}},
                 "default/grpc-limited.default.svc.cluster.local": {{80: {APP_PORT + 2}}}}}
    - name: echo-v2
      namespace: default
      serviceAccount: echo
      workloadIps: ["127.0.2.2"]
      node: node2
      canonicalRevision: v2
      services: {{"default/echo.default.svc.cluster.local": {{80: {APP_PORT}}},
                 "default/flaky.default.svc.cluster.local": {{80: {APP_PORT + 1}}},
                 "default/grpc.default.svc.cluster.local": {{80: {APP_PORT + 2}}}}}
    - {{name: grpc-client, namespace: default, serviceAccount: client,
       workloadIps: ["127.0.1.3"], node: node1}}
    - name: waypoint
      namespace: default
      serviceAccount: waypoint
      workloadIps: ["127.0.2.9"]
      node: node2
      services: {{"default/waypoint.default.svc.cluster.local": {{15008: 15008}}}}
    services:
    - name: echo
      namespace: default
      vips: ["/{VIP}"]
      ports: {{80: {APP_PORT}}}
      waypoint: {{destination: default/waypoint.default.svc.cluster.local}}
    - name: flaky
      namespace: default
      vips: ["/{FLAKY_VIP}"]
      ports: {{80: {APP_PORT + 1}}}
      waypoint: {{destination: default/waypoint.default.svc.cluster.local}}
    - name: grpc
      namespace: default
      vips: ["/{GRPC_VIP}"]
      ports: {{80: {APP_PORT + 2}}}
      waypoint: {{destination: default/waypoint.default.svc.cluster.local}}
    - name: limited
      namespace: default
      vips: ["/{LIMITED_VIP}"]
      ports: {{80: {APP_PORT}}}
      waypoint: {{destination: default/waypoint.default.svc.cluster.local}}
    - name: grpc-limited
      namespace: default
      vips: ["/{GRPC_LIMITED_VIP}"]
      ports: {{80: {APP_PORT + 2}}}
      waypoint: {{destination: default/waypoint.default.svc.cluster.local}}
    - name: waypoint
      namespace: default
      vips: ["/10.96.0.99"]
      ports: {{15008: 15008}}
    waypoints:
    - {{name: waypoint, namespace: default, service: default/waypoint.default.svc.cluster.local}}
    routes:
    - name: echo-canary
      namespace: default
      parentRefs: [{{service: default/echo.default.svc.cluster.local}}]
      rules:
      - matches: [{{path: {{type: PathPrefix, value: /mirrored}}}}]
        filters:
        - type: RequestMirror
          requestMirror: {{backendRef: {{service: default/flaky.default.svc.cluster.local,
                                        port: 80}}}}
        backendRefs: [{{service: default/echo.default.svc.cluster.local, port: 80,
                        subset: {{version: v1}}}}]
      - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
        backendRefs: [{{service: default/echo.default.svc.cluster.local, port: 80}}]
        timeouts: {{request: 300ms}}
      - matches: [{{path: {{type: PathPrefix, value: /slow-try}}}}]
        backendRefs: [{{service: default/echo.default.svc.cluster.local, port: 80}}]
        timeouts: {{backendRequest: 200ms}}
      - matches: [{{path: {{type: PathPrefix, value: /nowhere}}}}]
        backendRefs: [{{service: default/echo.default.svc.cluster.local, port: 80, weight: 0}}]
      - backendRefs:
        - {{service: default/echo.default.svc.cluster.local, port: 80, weight: 90,
           subset: {{version: v1}}}}
        - {{service: default/echo.default.svc.cluster.local, port: 80, weight: 10,
           subset: {{version: v2}}}}
        filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{add: [{{name: x-via, value: waypoint}}],
                                   remove: [x-internal]}}
    - name: flaky
      namespace: default
      parentRefs: [{{service: default/flaky.default.svc.cluster.local}}]
      rules:
      - backendRefs: [{{service: default/flaky.default.svc.cluster.local, port: 80}}]
        retry: {{attempts: 5, retryOn: [5xx], backoff: 1ms}}
    - name: grpc
      namespace: default
      parentRefs: [{{service: default/grpc.default.svc.cluster.local}}]
      rules:
      - backendRefs: [{{service: default/grpc.default.svc.cluster.local, port: 80}}]
        filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{set: [{{name: x-via, value: waypoint-h2}}]}}
    trafficPolicies:
    - name: limited
      namespace: default
      service: default/limited.default.svc.cluster.local
      connectionPool:
        http: {{http2MaxRequests: 1, maxRequestsPerConnection: 1}}
    - name: grpc-limited
      namespace: default
      service: default/grpc-limited.default.svc.cluster.local
      connectionPool:
        tcp: {{maxConnections: 1}}
        http: {{maxRequestsPerConnection: 1}}
    policies:
    - name: no-admin
      namespace: default
      action: Deny
      targetRefs: [{{kind: Service, name: echo}}]
      rules: [[[{{paths: ["/admin*"]}}]]]
""")


@dataclass
class Lab:
    agents: dict[str, AgentApp]
    waypoint: WaypointApp
    targets: dict[tuple[str, int], tuple[str, int]]
    hits: Counter[str] = field(default_factory=Counter)
    flaky_calls: list[str] = field(default_factory=list)
    # /stream/... responses send their head and a first piece, then wait for this.
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def open_raw(self, target: tuple[str, int]) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection from the client pod as if redirected to ``target``."""
        sock = socket.socket()
        sock.bind(("127.0.1.1", 0))
        sock.setblocking(False)
        self.targets[sock.getsockname()[:2]] = target
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.1.1", 15001))
        return await asyncio.open_connection(sock=sock)

    async def request(self, target: tuple[str, int], method: str, path: str,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 request from the client pod as if redirected to ``target``."""
        [reply] = await self.requests(target, [(method, path, body)], keep_alive=False)
        return reply

    async def requests(self, target: tuple[str, int], calls: list[tuple[str, str, bytes]], *,
                       keep_alive: bool = True) -> list[tuple[int, dict[str, str], bytes]]:
        """Several HTTP/1.1 requests in turn on one connection from the client pod."""
        reader, writer = await self.open_raw(target)
        replies: list[tuple[int, dict[str, str], bytes]] = []
        try:
            for method, path, body in calls:
                connection = "keep-alive" if keep_alive else "close"
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: echo\r\nContent-Length: "
                             f"{len(body)}\r\nConnection: {connection}\r\n\r\n".encode()
                             + body)
                replies.append(await _read_response(reader, method))
            return replies
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader,
                         method: str) -> tuple[int, dict[str, str], bytes]:
    parser = ResponseReader()
    parser.expect_response(method)
    head: ResponseHead | None = None
    chunks: list[bytes] = []
    while True:
        data = await reader.read(65536)
        events = parser.feed(data) if data else parser.feed_eof()
        for event in events:
            if isinstance(event, ResponseHead):
                head = event
            elif isinstance(event, MessageEnd):
                assert head is not None
                return head.status, {n.lower(): v for n, v in head.headers}, b"".join(chunks)
            elif hasattr(event, "data"):
                chunks.append(event.data)
            else:
                raise AssertionError(f"bad response: {event}")
        if not data:
            raise AssertionError("connection closed before the response ended")


async def _backend(lab_hits: Counter[str], flaky_calls: list[str], ip: str,
                   name: str, gate: asyncio.Event) -> list[web.AppRunner]:
    async def echo(request: web.Request) -> web.StreamResponse:
        lab_hits[name] += 1
        if request.path.startswith("/slow"):
            await asyncio.sleep(2)
        if request.path.startswith("/stream"):
            streamed = web.StreamResponse()
            await streamed.prepare(request)
            await streamed.write(f"{name} first|".encode())
            await gate.wait()
            await streamed.write(b"rest")
            await streamed.write_eof()
            return streamed
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.Response(text=f"{name} {request.method} {request.path_qs}", headers={
            "x-internal": "secret", "x-traceparent": request.headers.get("traceparent", ""),
            "x-peer-port": str(peer[1] if peer else "")})

    flaky_count = [0]

    async def flaky(request: web.Request) -> web.Response:
        flaky_count[0] += 1
        failed = flaky_count[0] % 2 == 1  # every other call fails
        flaky_calls.append(f"{name}:{'503' if failed else '200'}:{request.host}")
        return web.Response(status=503 if failed else 200, text=name)

    runners = []
    for port, handler in ((APP_PORT, echo), (APP_PORT + 1, flaky)):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, port).start()
        runners.append(runner)
    return runners


async def _grpc_backend(ip: str, name: str) -> asyncio.subprocess.Process:
    """A grpcio server in its own process (tests/helpers/grpc_app.py)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.grpc_app", "server", ip, str(APP_PORT + 2), name,
        stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"ready", line
    return proc


@contextlib.asynccontextmanager
async def running_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    targets: dict[tuple[str, int], tuple[str, int]] = {}

    def inject(env: ProxyEnv) -> None:
        env.original_dst = lambda sock: targets.get(sock.getpeername()[:2]) or \
            FIXED_TARGETS[sock.getsockname()[0]]

    agents: dict[str, AgentApp] = {}
    tasks = []
    for node in ("node1", "node2"):
        holder: list[AgentApp] = []

        def snap(h: list[AgentApp] = holder) -> Snapshot:
            return h[0].env.snapshot()

        options = AgentOptions(config=str(config), node=node, in_pod=False,
                               readiness_addr=("127.0.0.1", 0), metrics_addr=("127.0.0.1", 0),
                               admin_addr=("127.0.0.1", 0), socket_mark=False,
                               handle_signals=False, drain_timeout=0.5)
        app = AgentApp(options, LocalCaClient(CertificateAuthority.load(ca_dir), node, snap),
                       None, metrics=Metrics(), env_overrides=inject)
        holder.append(app)
        agents[node] = app
        tasks.append(asyncio.create_task(app.run()))
    wp_holder: list[WaypointApp] = []

    def wp_snap() -> Snapshot:
        return wp_holder[0]._current()

    waypoint = WaypointApp(
        WaypointOptions(config=str(config), name="default/waypoint", node="node2",
                        listen_ip="127.0.2.9", readiness_addr=("127.0.0.1", 0),
                        metrics_addr=("127.0.0.1", 0), admin_addr=("127.0.0.1", 0),
                        handle_signals=False, drain_timeout=0.5,
                        settings=WaypointSettings(detection_timeout=0.5,
                                                  request_header_timeout=1.0)),
        LocalCaClient(CertificateAuthority.load(ca_dir), "node2", wp_snap),
        metrics=WaypointMetrics())
    wp_holder.append(waypoint)
    tasks.append(asyncio.create_task(waypoint.run()))
    lab = Lab(agents, waypoint, targets)
    runners = []
    grpc_servers = []
    for ip, name in (("127.0.2.1", "v1"), ("127.0.2.2", "v2")):
        runners += await _backend(lab.hits, lab.flaky_calls, ip, name, lab.gate)
        grpc_servers.append(await _grpc_backend(ip, name))
    try:
        await eventually(
            lambda: all(a.agent.ready for a in agents.values()) and waypoint.ready, 30,
            lambda: f"not ready: waypoint {waypoint.readiness_detail()}")
        yield lab
    finally:
        await waypoint.quit()
        for app in agents.values():
            await app.quit()
        await asyncio.gather(*tasks)
        for runner in runners:
            await runner.cleanup()
        for server in grpc_servers:
            server.terminate()
            await server.wait()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with running_lab(tmp_path) as lab:
        yield lab


def _sample(registry: object, name: str, **labels: str) -> float:
    total = 0.0
    for metric in registry.collect():  # type: ignore[attr-defined]
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_canary_split_retries_timeout_and_deny(lab: Lab) -> None:
    # Canary 90/10 by subset.
    for _ in range(60):
        status, _h, body = await lab.request((VIP, 80), "GET", "/hello")
        assert status == 200, body
    assert lab.hits["v1"] + lab.hits["v2"] == 60
    assert lab.hits["v1"] > lab.hits["v2"] >= 1, lab.hits  # 60 draws of 10%: P(0) ~ 0.2%

    # A backend failing every other call is masked by retries on 5xx.
    for _ in range(10):
        status, _h, _b = await lab.request((FLAKY_VIP, 80), "GET", "/")
        assert status == 200
    assert any(":503:" in c for c in lab.flaky_calls)

    # Route timeout: 504 with flag UT.
    status, _h, _b = await lab.request((VIP, 80), "GET", "/slow")
    assert status == 504

    # L7 deny at the waypoint.
    status, _h, body = await lab.request((VIP, 80), "GET", "/admin/users")
    assert status == 403
    assert b"RBAC: access denied" in body

    reg = lab.waypoint.metrics.registry
    await eventually(lambda: _sample(reg, "istio_requests_total", response_code="504",
                                     response_flags="UT") == 1, 5, "UT counted")
    assert _sample(reg, "istio_requests_total", response_code="403", response_flags="DENY") == 1
    assert _sample(reg, "istio_requests_total", reporter="waypoint", response_code="200",
                   destination_service="echo.default.svc.cluster.local",
                   source_principal="spiffe://cluster.local/ns/default/sa/client") == 60
    assert _sample(reg, "nodeproxy_waypoint_retries_total") >= 1


async def test_keep_alive_connection_carries_several_requests(lab: Lab) -> None:
    # Bodyless and bodied requests, a local reply (403) and a routed one, in turn on one
    # client connection: each gets its answer and the connection stays open.
    calls = [("GET", "/one", b""), ("POST", "/two", b"payload"), ("GET", "/admin/x", b""),
             ("GET", "/three", b"")]
    replies = await lab.requests((VIP, 80), calls)
    assert [status for status, _h, _b in replies] == [200, 200, 403, 200]
    assert replies[1][2].endswith(b"POST /two")
    assert replies[3][2].endswith(b"GET /three")
    assert all(h.get("connection", "keep-alive") != "close" for _s, h, _b in replies)


@pytest.mark.parametrize("target", ["/x/../admin/users", "/%61dmin/users", "/./admin",
                                    "http://echo/admin/users"])
async def test_paths_are_normalized_before_policy(lab: Lab, target: str) -> None:
    # Spellings of /admin/... that a DENY on "/admin*" must still catch (Envoy normalize_path).
    status, _h, body = await lab.request((VIP, 80), "GET", target)
    assert status == 403, body


async def test_normalized_path_is_what_goes_upstream(lab: Lab) -> None:
    status, _h, body = await lab.request((VIP, 80), "GET", "/a/b/../%63?q=/../x")
    assert status == 200, body
    assert body.endswith(b"GET /a/c?q=/../x"), body
    status, _h, body = await lab.request((VIP, 80), "GET", "/bad%zzescape")
    assert status == 400, body


async def test_pod_ip_traffic_goes_through_the_waypoint(lab: Lab) -> None:
    # The client addresses the pod directly; its agent still sends it through the waypoint.
    status, _h, body = await lab.request(("127.0.2.1", APP_PORT), "GET", "/direct")
    assert status == 200
    assert body.startswith(b"v1")
    await eventually(lambda: _sample(lab.waypoint.metrics.registry, "istio_requests_total",
                                     destination_workload="echo-v1") == 1, 5, "via waypoint")
    # The service's L7 policies hold for its pods' addresses too: no bypass by pod IP.
    status, _h, body = await lab.request(("127.0.2.1", APP_PORT), "GET", "/admin/users")
    assert status == 403, body
    assert b"RBAC: access denied" in body


async def test_hbone_that_bypasses_the_waypoint_is_refused(lab: Lab) -> None:
    # A client with a valid mesh identity tunnels straight to the pod: 401, counted.
    client = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")
    ctx = await lab.agents["node1"].contexts.client(client)
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.2.1", 15008))
    conn = await tunnel.connect(sock, ctx, expected=(
        SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo"),),
        trust_domain="cluster.local", timeout=5)
    try:
        with pytest.raises(ProxyError) as refused:
            await conn.open_stream(f"127.0.2.1:{APP_PORT}", [])
        assert refused.value.status == 401
    finally:
        conn.close()
        await conn.wait_closed()
    assert _sample(lab.agents["node2"].metrics.registry,
                   "nodeproxy_connections_rejected_total", reason="waypoint_bypass") == 1
    assert not lab.hits


async def test_grpc_through_the_waypoint(lab: Lab) -> None:
    # A grpcio client in its own process, in the grpc-client pod (127.0.1.3).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.grpc_app", "client", "127.0.1.3:15001",
        stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
    out, _err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    got = json.loads(out)
    assert got["say"] == "hello mesh"
    assert got["served_by"] in ("v1", "v2")
    assert got["trailer"] == f"from-{got['served_by']}"  # trailers pass through
    assert got["fail"] == ["NOT_FOUND", "no cake here"]  # status and message too
    assert len(got["count"]) == 3  # server streaming
    assert got["slow"] == "DEADLINE_EXCEEDED"  # the client's deadline, via grpc-timeout
    reg = lab.waypoint.metrics.registry
    await eventually(lambda: _sample(reg, "istio_requests_total", request_protocol="grpc",
                                     grpc_response_status="5") == 1, 5, "NOT_FOUND counted")
    assert _sample(reg, "istio_requests_total", request_protocol="grpc",
                   grpc_response_status="0") >= 2


async def test_grpc_timeout_is_enforced_by_the_waypoint(lab: Lab) -> None:
    # A raw HTTP/2 client with grpc-timeout: 200m and no deadline of its own: only the
    # waypoint can end the 5 s call, with DEADLINE_EXCEEDED (4) and flag UT.
    reader, writer = await lab.open_raw((GRPC_VIP, 80))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/echo.Echo/Slow"),
                          (":authority", "grpc"), ("content-type", "application/grpc"),
                          ("te", "trailers"), ("grpc-timeout", "200m")])
    conn.send_data(1, b"\x00\x00\x00\x00\x01x", end_stream=True)
    writer.write(conn.data_to_send())
    fields: dict[str, str] = {}
    try:
        async with asyncio.timeout(4):  # well under the server's 5 s
            while "grpc-status" not in fields:
                data = await reader.read(65536)
                assert data, "the waypoint closed without answering"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        fields.update((k.decode(), v.decode()) for k, v in event.headers)
                writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert fields["grpc-status"] == "4", fields
    await eventually(lambda: _sample(lab.waypoint.metrics.registry, "istio_requests_total",
                                     grpc_response_status="4", response_flags="UT") == 1, 5,
                     "DEADLINE_EXCEEDED with UT counted by the waypoint")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/hello", 200),
    ("GET", "/admin/users", 403),
    ("POST", "/admin", 403),
    ("GET", "/slow", 504),
])
async def test_explain_agrees_with_the_waypoint(lab: Lab, method: str, path: str,
                                                status: int) -> None:
    """explain --http and the running waypoint give the same answer for the same request."""
    snapshot = lab.waypoint._current()
    explained = explain(snapshot, "default/client", f"{VIP}:80", HttpQuery(method, path))
    assert explained.l7 is not None
    answered, _h, body = await lab.request((VIP, 80), method, path)
    assert answered == status
    if explained.l7.answer is not None:
        assert explained.l7.answer == answered
        assert explained.verdict is (Verdict.DENIED if status == 403 else Verdict.ANSWERED)
    elif status == 200:
        served = body.split()[0].decode()  # "v1" or "v2"
        subsets = {b.subset for b in explained.l7.backends}
        assert f"version={served}" in subsets
        assert explained.verdict is Verdict.ALLOWED
    else:  # the timeout the waypoint enforced is the one explain reports
        assert explained.l7.timeout == "0.3s"


async def test_non_http_is_proxied_as_tcp_with_fail_closed_policy(lab: Lab) -> None:
    # flaky has no policy: bytes that are not HTTP pass as TCP (the app answers them).
    reader, writer = await lab.open_raw((FLAKY_VIP, 80))
    try:
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        assert b"Received HTTPS traffic on an HTTP port" in answer  # the app saw our bytes
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    # echo has a DENY policy with HTTP fields: as TCP they cannot be checked, so it denies
    # the whole tunnel (fail closed) instead of letting unchecked bytes through.
    reader, writer = await lab.open_raw((VIP, 80))
    try:
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(65536), 10) == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    reg = lab.waypoint.metrics.registry
    assert _sample(reg, "nodeproxy_waypoint_tcp_connections_total",
                   response_flags="DENY") == 1
    await eventually(lambda: _sample(reg, "nodeproxy_waypoint_tcp_connections_total",
                                     destination_service="flaky.default.svc.cluster.local",
                                     response_flags="-") == 1, 5, "TCP tunnel counted")
    assert not lab.hits


async def test_request_mirror_sends_a_shadow_copy(lab: Lab) -> None:
    status, _h, body = await lab.request((VIP, 80), "POST", "/mirrored", b"payload")
    assert status == 200
    assert body.startswith(b"v1 POST /mirrored")
    # The copy reaches the mirror's backend (flaky) with Envoy's -shadow host; its answer
    # (503 or 200) is dropped.
    await eventually(lambda: len(lab.flaky_calls) == 1, 5, "shadow request arrived")
    assert lab.flaky_calls[0].endswith(":echo-shadow")
    await eventually(lambda: _sample(lab.waypoint.metrics.registry,
                                     "nodeproxy_waypoint_mirrored_requests_total",
                                     result="sent") == 1, 5, "mirror counted")


def _active_requests(lab: Lab) -> dict[str, int]:
    """activeRequests per endpoint address of every cluster (admin /config_dump's figures)."""
    active: Counter[str] = Counter()
    for cluster in lab.waypoint.proxy.dump()["clusters"]:  # type: ignore[attr-defined]
        for endpoint in cluster["endpoints"]:
            active[endpoint["address"]] += endpoint["activeRequests"]
    return dict(active)


async def _read_until(reader: asyncio.StreamReader, got: bytes,
                      done: Callable[[bytes], bool]) -> bytes:
    """Read onto ``got`` until ``done(got)``; the peer closing first fails the test."""
    async with asyncio.timeout(10):
        while not done(got):
            data = await reader.read(65536)
            assert data, got
            got += data
    return got


def _requests_in_flight(lab: Lab, service: str) -> int:
    """The circuit breaker's requests gauge of the service's clusters (/config_dump)."""
    return sum(cluster["circuitBreaker"]["requests"]["active"]
               for cluster in lab.waypoint.proxy.dump()["clusters"]  # type: ignore[attr-defined]
               if cluster["cluster"].startswith(f"default/{service}."))


async def test_a_request_is_active_until_its_response_has_been_sent(lab: Lab) -> None:
    # LEAST_REQUEST and activeRequests count a request until its whole response went out,
    # not only until its response head arrived.
    reader, writer = await lab.open_raw((VIP, 80))
    try:
        writer.write(b"GET /stream/x HTTP/1.1\r\nHost: echo\r\n\r\n")
        got = b""
        got = await _read_until(reader, got, lambda got: b"first|" in got)
        assert got.startswith(b"HTTP/1.1 200 ")
        # Head and a first piece are at the client; the rest is held by the endpoint.
        assert sum(_active_requests(lab).values()) == 1, _active_requests(lab)
        lab.gate.set()
        got = await _read_until(reader, got, lambda got: got.endswith(b"rest\r\n0\r\n\r\n"))
        await eventually(lambda: sum(_active_requests(lab).values()) == 0, 5,
                         lambda: f"still active after the response: {_active_requests(lab)}")
    finally:
        lab.gate.set()  # never leave the endpoint's handler waiting
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("framing", ["chunked", "large"])
async def test_expect_100_continue_with_a_streamed_body(lab: Lab, framing: str) -> None:
    # As curl does: send the head, wait for 100 Continue, only then the body.  A chunked body
    # or one larger than the replay buffer is streamed, not held.
    size = 100 * 1024 if framing == "large" else 10
    framing_header = (b"Transfer-Encoding: chunked" if framing == "chunked"
                      else f"Content-Length: {size}".encode())
    reader, writer = await lab.open_raw((VIP, 80))
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\n"
                     + framing_header + b"\r\nConnection: close\r\n\r\n")
        got = b""
        got = await _read_until(reader, got, lambda got: b"\r\n\r\n" in got)
        interim, _sep, got = got.partition(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue", interim
        body = b"x" * size
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (size, body) if framing == "chunked" else body)
        async with asyncio.timeout(10):
            got += await reader.read()
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert b"v1 POST /upload" in got or b"v2 POST /upload" in got
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _raw_exchange(lab: Lab, target: tuple[str, int], request: bytes,
                        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request written as given (head and body) on a new connection; its response."""
    reader, writer = await lab.open_raw(target)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await _read_response(reader, method)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_retry_goes_to_the_other_endpoint(lab: Lab) -> None:
    # flaky has two endpoints, each failing every other call: a request's second try goes
    # to the endpoint its first try did not use (previous hosts).
    retried = 0
    for _ in range(6):
        lab.flaky_calls.clear()
        status, _h, _b = await lab.request((FLAKY_VIP, 80), "GET", "/")
        assert status == 200
        names = [call.split(":")[0] for call in lab.flaky_calls]
        if len(names) >= 2:
            retried += 1
            assert names[0] != names[1], lab.flaky_calls
    assert retried >= 1  # every endpoint's first call fails


@pytest.mark.parametrize("framing", ["large", "chunked"])
async def test_a_body_that_cannot_be_replayed_is_not_retried(lab: Lab, framing: str) -> None:
    # The first call to a flaky endpoint fails; flaky's route retries 5xx, but this body is
    # larger than the replay buffer (64 KiB) or chunked, so the 503 is the answer.
    if framing == "large":
        body = b"x" * (100 * 1024)
        request = (b"POST / HTTP/1.1\r\nHost: flaky\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body)
    else:
        request = b"POST / HTTP/1.1\r\nHost: flaky\r\nTransfer-Encoding: chunked\r\n\r\n" \
                  b"5\r\nhello\r\n0\r\n\r\n"
    status, _h, _b = await _raw_exchange(lab, (FLAKY_VIP, 80), request, "POST")
    assert status == 503
    assert [call.split(":")[1] for call in lab.flaky_calls] == ["503"]
    # A small body is held, so the same failure is retried.
    status, _h, _b = await lab.request((FLAKY_VIP, 80), "POST", "/", b"small")
    assert status == 200


async def test_per_try_timeout_on_the_data_path(lab: Lab) -> None:
    # timeouts.backendRequest 200ms bounds each try of /slow-try (the endpoint takes 2 s).
    status, _h, body = await lab.request((VIP, 80), "GET", "/slow-try")
    assert status == 504, body
    assert body == b"upstream request timeout\n"
    await eventually(lambda: _sample(lab.waypoint.metrics.registry, "istio_requests_total",
                                     response_code="504", response_flags="UT") == 1, 5,
                     "per-try timeout counted with UT")


async def test_http2_max_requests_overflow_answers_503_uo(lab: Lab) -> None:
    # limited allows one request at a time: hold one (its response waits for the gate),
    # the next is refused at once.
    reader, writer = await lab.open_raw((LIMITED_VIP, 80))
    try:
        writer.write(b"GET /stream/held HTTP/1.1\r\nHost: limited\r\n\r\n")
        got = b""
        got = await _read_until(reader, got, lambda got: b"first|" in got)
        status, _h, body = await lab.request((LIMITED_VIP, 80), "GET", "/second")
        assert status == 503, body
        assert body == b"upstream overflow (circuit breaker)\n"
        lab.gate.set()
        got = await _read_until(reader, got, lambda got: got.endswith(b"rest\r\n0\r\n\r\n"))
    finally:
        lab.gate.set()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    reg = lab.waypoint.metrics.registry
    await eventually(lambda: _sample(reg, "istio_requests_total", response_code="503",
                                     response_flags="UO") == 1, 5, "overflow counted")
    assert _sample(reg, "nodeproxy_waypoint_overflow_total",
                   destination_service="limited.default.svc.cluster.local",
                   limit="requests") == 1
    # Once the held request is done there is room again.
    await eventually(lambda: _requests_in_flight(lab, "limited") == 0, 5, "request released")
    status, _h, _b = await lab.request((LIMITED_VIP, 80), "GET", "/third")
    assert status == 200


async def test_max_requests_per_connection_on_the_data_path(lab: Lab) -> None:
    # limited: maxRequestsPerConnection 1, so every request reaches the endpoint on a new
    # connection; echo (no limit) reuses its pooled connection.
    replies = await lab.requests((LIMITED_VIP, 80), [("GET", f"/r{i}", b"") for i in range(3)])
    ports = [headers["x-peer-port"] for _s, headers, _b in replies]
    assert len(set(ports)) == 3, ports
    replies = await lab.requests(("127.0.2.1", APP_PORT),
                                 [("GET", f"/r{i}", b"") for i in range(3)])
    ports = [headers["x-peer-port"] for _s, headers, _b in replies]
    assert len(set(ports)) == 1, ports


async def test_response_header_modifier_http1(lab: Lab) -> None:
    status, headers, _b = await lab.request((VIP, 80), "GET", "/hello")
    assert status == 200
    assert headers["x-via"] == "waypoint"
    assert "x-internal" not in headers  # removed by the filter
    # A request that no rule with the filter serves keeps the endpoint's headers.
    status, headers, _b = await lab.request(("127.0.2.1", APP_PORT), "GET", "/direct")
    assert status == 200
    assert "x-via" not in headers
    assert headers["x-internal"] == "secret"


async def test_response_header_modifier_http2(lab: Lab) -> None:
    reader, writer = await lab.open_raw((GRPC_VIP, 80))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/echo.Echo/Say"),
                          (":authority", "grpc"), ("content-type", "application/grpc"),
                          ("te", "trailers")])
    conn.send_data(1, b"\x00\x00\x00\x00\x04mesh", end_stream=True)
    writer.write(conn.data_to_send())
    fields: dict[str, str] = {}
    try:
        async with asyncio.timeout(10):
            while ":status" not in fields:
                data = await reader.read(65536)
                assert data, "the waypoint closed without answering"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        fields.update((k.decode(), v.decode()) for k, v in event.headers)
                writer.write(conn.data_to_send())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert fields[":status"] == "200", fields
    assert fields["x-via"] == "waypoint-h2"


async def test_all_weights_zero_answers_500(lab: Lab) -> None:
    status, _h, _b = await lab.request((VIP, 80), "GET", "/nowhere")
    assert status == 500
    assert not lab.hits


class _Lines(logging.Handler):
    """Collects the waypoint's request lines (an injected handler; the waypoint's logging is
    not replaced).  The agents' connection lines, on the same logger, are left out."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "method" in getattr(record, "fields", {}):
            self.records.append(record)


@contextlib.contextmanager
def _access_log() -> Iterator[_Lines]:
    logger = logging.getLogger("nodeproxy.access")
    lines, level = _Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


async def test_an_access_log_line_per_request(lab: Lab) -> None:
    with _access_log() as lines:
        await lab.request((VIP, 80), "GET", "/one")
        await lab.request((VIP, 80), "GET", "/admin/two")
        await eventually(lambda: len(lines.records) == 2, 5,
                         lambda: f"access log lines: {[r.getMessage() for r in lines.records]}")
    one, two = (getattr(r, "fields") for r in lines.records)  # noqa: B009
    assert (one["method"], one["path"], one["response_code"]) == ("GET", "/one", 200)
    assert one["response_flags"] == "-"
    assert one["upstream"] in (f"127.0.2.1:{APP_PORT}", f"127.0.2.2:{APP_PORT}")
    assert (two["path"], two["response_code"], two["response_flags"]) == (
        "/admin/two", 403, "DENY")
    assert lines.records[0].getMessage() == 'request "GET /one" 200 -'


async def test_traceparent_kept_or_started(lab: Lab) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, headers, _b = await _raw_exchange(
        lab, (VIP, 80), f"GET /t HTTP/1.1\r\nHost: echo\r\ntraceparent: {incoming}\r\n"
                        "Connection: close\r\n\r\n".encode())
    assert status == 200
    assert headers["x-traceparent"] == incoming
    status, headers, _b = await lab.request((VIP, 80), "GET", "/t")
    assert status == 200
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", headers["x-traceparent"]), headers


async def test_duration_and_size_histograms_are_observed(lab: Lab) -> None:
    status, _h, body = await lab.request((VIP, 80), "POST", "/sized", b"0123456789")
    assert status == 200
    reg = lab.waypoint.metrics.registry
    labels = {"response_code": "200", "request_protocol": "http"}
    await eventually(lambda: _sample(reg, "istio_request_duration_milliseconds_count",
                                     **labels) == 1, 5, "duration observed")
    assert _sample(reg, "istio_request_duration_milliseconds_sum", **labels) > 0
    assert _sample(reg, "istio_request_bytes_count", **labels) == 1
    assert _sample(reg, "istio_request_bytes_sum", **labels) == 10
    assert _sample(reg, "istio_response_bytes_count", **labels) == 1
    assert _sample(reg, "istio_response_bytes_sum", **labels) == len(body)


async def test_http2_upstream_connections_count_against_max_connections(lab: Lab) -> None:
    # grpc-limited: one upstream connection at most, and it carries one request.  While a
    # slow call holds it, the next call finds no connection with room and cannot open one:
    # 503 UO from the waypoint (gRPC UNAVAILABLE), counted as a connections overflow.
    reader, writer = await lab.open_raw((GRPC_LIMITED_VIP, 80))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()

    def call(stream_id: int, method: str) -> None:
        conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", f"/echo.Echo/{method}"),
            (":authority", "grpc-limited"), ("content-type", "application/grpc"),
            ("te", "trailers")])
        conn.send_data(stream_id, b"\x00\x00\x00\x00\x01x", end_stream=True)

    reg = lab.waypoint.metrics.registry
    fields: dict[str, str] = {}
    try:
        call(1, "Slow")
        writer.write(conn.data_to_send())
        await eventually(lambda: _requests_in_flight(lab, "grpc-limited") == 1, 5,
                         "slow call in flight")
        await eventually(lambda: _connections_open(lab, "grpc-limited") == 1, 5,
                         "upstream connection of the slow call")
        call(3, "Say")
        writer.write(conn.data_to_send())
        async with asyncio.timeout(4):  # well under the slow call's 5 s
            while "grpc-status" not in fields:
                data = await reader.read(65536)
                assert data, "the waypoint closed without answering"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived) \
                            and event.stream_id == 3:
                        fields.update((k.decode(), v.decode()) for k, v in event.headers)
                writer.write(conn.data_to_send())
        conn.reset_stream(1)
        writer.write(conn.data_to_send())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert fields["grpc-status"] == "14", fields
    assert _sample(reg, "nodeproxy_waypoint_overflow_total",
                   destination_service="grpc-limited.default.svc.cluster.local",
                   limit="connections") == 1
    await eventually(lambda: _sample(reg, "istio_requests_total", grpc_response_status="14",
                                     response_flags="UO") == 1, 5, "overflow counted")
    # The slow call's connection closes with it: the breaker gives its place back.
    await eventually(lambda: _connections_open(lab, "grpc-limited") == 0, 5,
                     "upstream connection released")


def _connections_open(lab: Lab, service: str) -> int:
    """The circuit breaker's connections gauge of the service's clusters (/config_dump)."""
    return sum(cluster["circuitBreaker"]["connections"]["active"]
               for cluster in lab.waypoint.proxy.dump()["clusters"]  # type: ignore[attr-defined]
               if cluster["cluster"].startswith(f"default/{service}."))
