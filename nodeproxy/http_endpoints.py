"""The agent's HTTP endpoints (aiohttp): readiness 15021, metrics 15020, admin 15000.

The admin API binds a loopback address only and also refuses any non-loopback peer, so a
misconfiguration cannot expose ``/quitquitquit`` or the config dump to the network.  The
readiness port listens on every address, so its body carries counts only; which pod is
missing and why is on the admin API's ``/healthz/ready``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nodeproxy.errors import ProxyError

log = logging.getLogger("nodeproxy.http")


@dataclass(frozen=True, slots=True)
class AdminHooks:
    ready: Callable[[], bool]
    readiness_detail: Callable[[], str]  # names pods and failures: admin (loopback) only
    readiness_summary: Callable[[], str]  # counts only: the public readiness port
    config_dump: Callable[[], dict[str, object]]
    connections: Callable[[], list[dict[str, object]]]
    quit: Callable[[], Awaitable[None]]


def _is_loopback(addr: str | None) -> bool:
    if not addr:
        return False
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _readiness(hooks: AdminHooks, text: Callable[[], str]) -> web.Response:
    return web.Response(status=200 if hooks.ready() else 503, text=text() + "\n")


def readiness_app(hooks: AdminHooks) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        return _readiness(hooks, hooks.readiness_summary)

    app = web.Application()
    app.router.add_get("/healthz/ready", ready)
    return app


def metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats/prometheus", metrics)
    return app


@web.middleware
async def loopback_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse (403) any admin request whose peer is not a loopback address."""
    if not _is_loopback(request.remote):
        log.warning("admin request from non-loopback %s refused", request.remote,
                    extra={"component": "admin"})
        return web.json_response({"error": "admin API is served to localhost only"},
                                 status=403)
    return await handler(request)


def admin_app(hooks: AdminHooks) -> web.Application:
    async def config_dump(_: web.Request) -> web.Response:
        return web.json_response(hooks.config_dump(), dumps=_dumps)

    async def connections(_: web.Request) -> web.Response:
        return web.json_response(hooks.connections(), dumps=_dumps)

    def current_level() -> web.Response:
        level = logging.getLevelName(logging.getLogger().level).lower()
        return web.json_response({"level": level})

    async def get_logging(request: web.Request) -> web.Response:
        # A GET never changes state (a prefetching browser or a crawler must not turn on
        # debug logging); refuse the old form rather than silently ignore it.
        if "level" in request.query:
            return web.json_response(
                {"error": "GET /logging only reports the level; change it with "
                          "POST /logging?level=debug"}, status=400)
        return current_level()

    async def set_logging(request: web.Request) -> web.Response:
        level = request.query.get("level", "")
        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            return web.json_response(
                {"error": f"unknown level {level!r}: POST /logging?level= one of debug, info, "
                          "warning or error"}, status=400)
        logging.getLogger().setLevel(level.upper())
        return current_level()

    async def ready_detail(_: web.Request) -> web.Response:
        return _readiness(hooks, hooks.readiness_detail)

    async def quit_(_: web.Request) -> web.Response:
        await hooks.quit()
        return web.Response(text="draining\n")

    app = web.Application(middlewares=[loopback_only])
    app.router.add_get("/config_dump", config_dump)
    app.router.add_get("/healthz/ready", ready_detail)
    app.router.add_get("/debug/connections", connections)
    app.router.add_get("/logging", get_logging)
    app.router.add_post("/logging", set_logging)
    app.router.add_post("/quitquitquit", quit_)
    return app


def _dumps(obj: object) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


class HttpEndpoints:
    """Starts/stops the three aiohttp sites."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []

    async def add(self, app: web.Application, host: str, port: int, what: str) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise ProxyError(
                f"cannot serve {what} on {host}:{port}: {exc.strerror}",
                hint="is another agent running in this namespace? choose another port",
            ) from None
        self._runners.append(runner)

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()


def check_admin_address(host: str) -> None:
    if not _is_loopback(host):
        raise ProxyError(
            f"admin address {host} is not a loopback address",
            hint="the admin API can drain the agent; it is served on 127.0.0.1 only",
        )
