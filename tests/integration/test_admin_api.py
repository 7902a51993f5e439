"""The admin API of real in-process agents (loopback mode): config dump round trip, certificate
chain without keys, the live connection table, the CLI against it, and loopback-only access."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from click.testing import CliRunner

from cli.inspect_cmd import snapshot_from_dump
from cli.main import cli
from nodeproxy.errors import ProxyError
from nodeproxy.http_endpoints import (
    AdminHooks,
    admin_app,
    check_admin_address,
    loopback_only,
    readiness_app,
)
from tests.helpers.waiting import eventually
from tests.integration.test_agent_loopback import CONFIG as LOOPBACK_CONFIG
from tests.integration.test_agent_loopback import Mesh, running_mesh
from ztunnel_cfg.loader import load_config_text

# The loopback suite's config on addresses of our own, so both suites can run at once.
CONFIG = (LOOPBACK_CONFIG.replace("127.0.1.", "127.0.41.").replace("127.0.2.", "127.0.42.")
          .replace("127.0.3.", "127.0.43."))
CLIENT, INTRUDER, SERVER = "127.0.41.1", "127.0.41.2", "127.0.42.1"
APP_PORT = 18480

# -- loopback-only ---------------------------------------------------------------------------


def _request(peer: tuple[str, int] | None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        peer if name == "peername" else default
    )
    return make_mocked_request("GET", "/config_dump", transport=transport)


@pytest.mark.parametrize(("peer", "allowed"), [
    (("127.0.0.1", 5000), True),
    (("127.9.9.9", 5000), True),
    (("::1", 5000), True),
    (("10.1.2.3", 5000), False),
    (("192.168.0.10", 5000), False),
    (("fd00::1", 5000), False),
    (None, False),
])
async def test_admin_middleware_refuses_non_loopback_peers(
    peer: tuple[str, int] | None, allowed: bool
) -> None:
    called: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        called.append(request)
        return web.Response(text="dump")

    resp = await loopback_only(_request(peer), handler)
    if allowed:
        assert (resp.status, len(called)) == (200, 1)
    else:
        assert (resp.status, called) == (403, [])
        assert isinstance(resp, web.Response)
        assert resp.text is not None
        assert "localhost only" in resp.text


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "localhost.example"])
def test_admin_address_must_be_loopback(host: str) -> None:
    with pytest.raises(ProxyError, match="not a loopback address"):
        check_admin_address(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_admin_addresses_are_accepted(host: str) -> None:
    check_admin_address(host)


# -- the admin app with stub hooks -------------------------------------------------------------


async def _no_quit() -> None:
    return None


def _hooks(ready: bool = True) -> AdminHooks:
    return AdminHooks(
        ready=lambda: ready,
        readiness_detail=lambda: "detail",
        readiness_summary=lambda: "summary",
        config_dump=dict,
        connections=list,
        quit=_no_quit,
    )


@pytest.fixture
async def admin() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    root = logging.getLogger()
    saved = root.level
    async with TestClient(TestServer(admin_app(_hooks()), host="127.0.0.1")) as client:
        yield client
    root.setLevel(saved)


async def test_get_logging_reports_and_never_changes_the_level(
    admin: TestClient[web.Request, web.Application],
) -> None:
    logging.getLogger().setLevel(logging.INFO)
    resp = await admin.get("/logging")
    assert (resp.status, await resp.json()) == (200, {"level": "info"})
    resp = await admin.get("/logging?level=debug")
    assert resp.status == 400
    assert "POST /logging?level=debug" in (await resp.json())["error"]
    assert logging.getLogger().level == logging.INFO


async def test_post_logging_sets_the_level(
    admin: TestClient[web.Request, web.Application],
) -> None:
    logging.getLogger().setLevel(logging.INFO)
    resp = await admin.post("/logging?level=debug")
    assert (resp.status, await resp.json()) == (200, {"level": "debug"})
    assert logging.getLogger().level == logging.DEBUG
    for bad in ("/logging?level=verbose", "/logging"):
        resp = await admin.post(bad)
        assert resp.status == 400
        assert "one of debug, info, warning or error" in (await resp.json())["error"]
    assert logging.getLogger().level == logging.DEBUG
    for method in ("PUT", "DELETE", "PATCH"):
        resp = await admin.request(method, "/logging?level=error")
        assert resp.status == 405
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.parametrize("ready", [True, False])
async def test_public_readiness_has_the_summary_and_admin_the_detail(ready: bool) -> None:
    hooks = _hooks(ready)
    status = 200 if ready else 503
    async with TestClient(TestServer(readiness_app(hooks), host="127.0.0.1")) as public:
        resp = await public.get("/healthz/ready")
        assert (resp.status, await resp.text()) == (status, "summary\n")
    async with TestClient(TestServer(admin_app(hooks), host="127.0.0.1")) as admin:
        resp = await admin.get("/healthz/ready")
        assert (resp.status, await resp.text()) == (status, "detail\n")


# -- real agents -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agents(Mesh):
    admin: dict[str, str]


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    admin = {node: f"127.0.0.1:{_free_port()}" for node in ("node1", "node2")}
    async with running_mesh(tmp_path, CONFIG, (SERVER,), APP_PORT, admin) as mesh:
        result = Agents(mesh.apps, mesh.targets, mesh.received, mesh.peers)
        result.admin = admin
        yield result


async def _get(addr: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{addr}{path}") as resp:
        return resp.status, await resp.text()


async def _json(addr: str, path: str) -> Any:
    status, body = await _get(addr, path)
    assert status == 200, body
    return json.loads(body)


async def test_config_dump_round_trips_and_shows_certificates_without_keys(
    agents: Agents,
) -> None:
    status, body = await _get(agents.admin["node1"], "/config_dump")
    assert status == 200
    assert "PRIVATE KEY" not in body
    assert "BEGIN" not in body
    dump = json.loads(body)
    assert snapshot_from_dump(dump, "node1").config == load_config_text(CONFIG)
    assert dump["node"] == "node1"
    assert sorted(dump["enrolled"]) == ["c1//Pod/default/client", "c1//Pod/legacy/intruder"]
    certs = {c["identity"]: c for c in dump["certificates"]}
    assert set(certs) == {"spiffe://cluster.local/ns/default/sa/client",
                          "spiffe://cluster.local/ns/legacy/sa/intruder"}
    for uri, cert in certs.items():
        assert cert["state"] == "available"
        [leaf] = cert["chain"]
        assert (leaf["type"], leaf["serial"], leaf["uriSans"]) == ("Leaf", cert["serial"], [uri])
        assert leaf["notAfter"] == cert["not_after"]
        [root] = cert["roots"]
        assert root["type"] == "Root"
        assert root["subject"] == leaf["issuer"]


async def test_debug_connections_lists_live_connections_on_both_agents(agents: Agents) -> None:
    n1, n2 = agents.admin["node1"], agents.admin["node2"]
    assert await _json(n1, "/debug/connections") == []
    reader, writer = await agents.connect_via(CLIENT, (SERVER, APP_PORT))
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"PING"
    client_port = writer.get_extra_info("sockname")[1]

    [out] = await _json(n1, "/debug/connections")
    assert {k: out[k] for k in ("direction", "workload", "local", "remote", "target",
                                "protocol")} == {
        "direction": "outbound", "workload": "default/client",
        "local": f"{CLIENT}:{client_port}", "remote": f"{SERVER}:15008",
        "target": f"{SERVER}:{APP_PORT}", "protocol": "HBONE",
    }
    [inb] = await _json(n2, "/debug/connections")
    assert {k: inb[k] for k in ("direction", "workload", "target", "protocol")} == {
        "direction": "inbound", "workload": "shop/server", "target": f"{SERVER}:{APP_PORT}",
        "protocol": "HBONE",
    }
    # Loopback mode dials from the agent's namespace, so the tunnel's peer is 127.0.0.1 here
    # (in-pod mode it is the source pod's IP: checked in tests/netns/test_observability.py).
    assert inb["remote"].startswith("127.")

    # The CLI shows the same row (it is synchronous: run it off the event loop).
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["connections", "--admin", n1])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split() == [
        "default/client", "outbound", f"{CLIENT}:{client_port}", f"{SERVER}:15008",
        f"{SERVER}:{APP_PORT}", "HBONE",
    ]

    writer.close()
    await writer.wait_closed()

    async def empty() -> bool:
        return bool(await _json(n1, "/debug/connections") == []
                    and await _json(n2, "/debug/connections") == [])

    await eventually(empty, 5, "the closed connection left /debug/connections")


async def test_cli_against_a_running_agent(agents: Agents) -> None:
    admin = agents.admin["node2"]
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, cli, ["workloads", "--admin", admin,
                                                          "-o", "json"])
    assert result.exit_code == 0, result.output
    assert {w["name"] for w in json.loads(result.output)} == {"client", "intruder", "server",
                                                              "plain"}
    result = await asyncio.to_thread(runner.invoke, cli, ["certificates", "--admin", admin])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:]]
    assert [r[:4] for r in rows] == [
        ["spiffe://cluster.local/ns/shop/sa/server", "Leaf", "Available", "true"],
        ["spiffe://cluster.local/ns/shop/sa/server", "Root", "Available", "true"],
    ]


async def test_explain_agrees_with_the_denied_connection(agents: Agents) -> None:
    """explain says deny-legacy rule 0 denies intruder -> server; the data path does that."""
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["explain", "--admin", agents.admin["node1"], "--from",
                                  "legacy/intruder", "--to", f"{SERVER}:{APP_PORT}",
                                  "-o", "json"])
    assert result.exit_code == 0, result.output
    [outcome] = json.loads(result.output)["outcomes"]
    assert (outcome["path"], outcome["allowed"], outcome["policy"], outcome["rule"]) == \
        ("HBONE", False, "shop/deny-legacy", 0)

    reader, writer = await agents.connect_via(INTRUDER, (SERVER, APP_PORT))
    writer.write(b"sneaky")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await reader.readexactly(1)
    writer.close()
    assert agents.received == []
