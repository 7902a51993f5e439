"""Wiring of one waypoint process: identity, the HBONE listener, L7 proxying, admin and metrics.

The waypoint is a mesh workload of its own: an endpoint of the service named by its
``waypoints:`` entry, with that workload's SPIFFE identity.  It terminates HBONE from source
agents on :15008 and opens HBONE to the chosen endpoints with its own identity.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from nodeproxy.controlplane.wiring import (
    AnySource,
    open_config_source,
    registrar_for,
    store_detail,
    store_summary,
)
from nodeproxy.hbone import events as hbone_events
from nodeproxy.hbone.glue import HboneProtocol
from nodeproxy.http_endpoints import (
    AdminHooks,
    HttpEndpoints,
    admin_app,
    check_admin_address,
    metrics_app,
    readiness_app,
)
from nodeproxy.identity.ca_client import CaClient
from nodeproxy.identity.manager import CertificateManager
from nodeproxy.identity.node_credentials import NodeCertRenewer
from nodeproxy.identity.report import certificates_document
from nodeproxy.identity.svid import Svid
from nodeproxy.proxy import tunnel
from nodeproxy.proxy.limits import Limits
from nodeproxy.sdnotify import Notifier, run_watchdog, supervise
from nodeproxy.sockets import SocketFactory, SocketOptions, close_with_reset
from nodeproxy.tls import ContextCache
from nodeproxy.waypoint import http1_proxy, http2_proxy
from nodeproxy.waypoint.proxy import WaypointProxy, WaypointSettings
from nodeproxy.waypoint.target import find_waypoint
from nodeproxy.waypoint.telemetry import WaypointMetrics
from nodeproxy.waypoint.upstream import Upstreams
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.model import WaypointConfig, Workload
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.spiffe import SpiffeId

log = logging.getLogger("nodeproxy.waypoint")
# The protocol handlers load with the process (proxy.py imports them on first use): the first
# requests do not wait ~20 ms for the imports, and their objects are frozen with the rest.
_PRELOADED = (http1_proxy, http2_proxy)


class WaypointSetupError(NodeproxyError):
    """The config does not say which waypoint (and workload) this process is."""
_EXTRA = {"component": "waypoint"}


@dataclass(frozen=True, slots=True)
class WaypointOptions:
    config: str
    name: str  # "namespace/name" of the waypoints: entry
    node: str | None = None  # which of the waypoint's workloads this is (by node) ...
    workload: str | None = None  # ... or by "namespace/name"
    listen_ip: str = "0.0.0.0"
    hbone_port: int = 15008
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    drain_timeout: float = 5.0
    handle_signals: bool = True
    limits: Limits = field(default_factory=Limits)
    settings: WaypointSettings = field(default_factory=WaypointSettings)
    max_connections: int = 16384  # downstream HBONE connections open at once


def choose_self(snapshot: Snapshot, options: WaypointOptions) -> tuple[WaypointConfig, Workload]:
    """This process's waypoint entry and workload; a WaypointSetupError says what to fix."""
    waypoint = find_waypoint(snapshot, options.name)
    if waypoint is None:
        known = ", ".join(f"{w.namespace}/{w.name}" for w in snapshot.config.waypoints)
        raise WaypointSetupError(f"no waypoint {options.name!r} under 'waypoints:' in "
                          f"{options.config} (known: {known or 'none'})")
    members = snapshot.endpoints(waypoint.service)
    if options.node is not None:
        members = tuple(w for w in members if w.node == options.node)
    if options.workload is not None:
        members = tuple(w for w in members if w.key == options.workload)
    if len(members) != 1:
        which = ", ".join(w.key for w in members) or "none"
        raise WaypointSetupError(
            f"waypoint {options.name} needs exactly one workload of service {waypoint.service}"
            f"{' on node ' + options.node if options.node else ''}"
            f"{' named ' + options.workload if options.workload else ''}; found {which}: "
            "list the waypoint's workload with services: {" + waypoint.service + ": ...}, "
            "and pick it with --node or --workload")
    return waypoint, members[0]


def _package_version() -> str:
    try:
        return version("nodeproxy")
    except PackageNotFoundError:
        return "0.0.0+source"


class WaypointApp:
    def __init__(self, options: WaypointOptions, ca_client: CaClient, *,
                 metrics: WaypointMetrics | None = None, notifier: Notifier | None = None,
                 node_renewer: NodeCertRenewer | None = None,
                 sockets: SocketFactory | None = None) -> None:
        self.options = options
        self.metrics = metrics or WaypointMetrics()
        self.certs = CertificateManager(ca_client)
        self.contexts = ContextCache(self.certs)
        self.certs.on_rotate(self._rotated)
        self.node_renewer = node_renewer
        self.notifier = notifier or Notifier()
        self.sockets = sockets or SocketFactory(SocketOptions(mark=None))
        self._snapshot: Snapshot | None = None
        self.waypoint: WaypointConfig | None = None
        self.workload: Workload | None = None
        self.config: AnySource | None = None
        self.upstreams = Upstreams(self._identity, self.contexts, self.sockets,
                                   connect_timeout=options.settings.connect_timeout)
        self.proxy = WaypointProxy(self._current, self._waypoint, self.upstreams, self.metrics,
                                   options.settings)
        self._hbone: tunnel.InboundServer | None = None  # made once the identity is known
        self._http = HttpEndpoints()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._listener: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._handshakes = 0
        self._closing = False
        self.config_error: str | None = None

    # -- state --------------------------------------------------------------------------------
    def _current(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def _waypoint(self) -> WaypointConfig | None:
        return self.waypoint

    def _identity(self) -> SpiffeId:
        assert self.workload is not None
        return self.workload.identity

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        try:
            waypoint, workload = choose_self(snapshot, self.options)
        except WaypointSetupError as exc:
            # A valid config that no longer lists this waypoint: keep the last good one, and
            # say so (readiness fails) rather than serve someone else's identity.
            self.config_error = str(exc)
            log.error("config change ignored: %s", exc, extra=_EXTRA)
            return
        if self.workload is not None and workload.identity != self.workload.identity:
            self.config_error = (f"the waypoint's identity changed to {workload.identity}: "
                                 "restart the waypoint to take it")
            log.error("config change ignored: %s", self.config_error, extra=_EXTRA)
            return
        self.config_error = None
        self._snapshot, self.waypoint, self.workload = snapshot, waypoint, workload
        self.proxy.snapshot_changed(snapshot)

    def _rotated(self, identity: SpiffeId, svid: Svid) -> None:
        self.contexts.on_rotate(identity, svid)

    @property
    def ready(self) -> bool:
        return self.started.is_set() and self.config_error is None

    def readiness_detail(self) -> str:
        if not self.started.is_set():
            return "starting"
        if self.config_error is not None:
            return f"config: {self.config_error}"
        serving = f"serving {self.options.name} as {self.workload.key if self.workload else '?'}"
        store = store_detail(self.config)
        return f"{serving}; {store}" if store else serving

    # -- admin --------------------------------------------------------------------------------
    def config_dump(self) -> dict[str, object]:
        snapshot = self._snapshot
        doc: dict[str, object] = config_to_document(snapshot.config) if snapshot else {}
        doc["waypoint"] = {
            "name": self.options.name,
            "workload": self.workload.key if self.workload else None,
            "identity": str(self.workload.identity) if self.workload else None,
            "configError": self.config_error,
        }
        doc.update(self.proxy.dump())
        doc["certificates"] = certificates_document(self.certs)
        store = store_summary(self.config)
        if store is not None:
            doc["configStore"] = store
        if self.config is not None:
            state = self.config.state
            doc["configReloads"] = {"ok": state.ok_count, "failed": state.fail_count}
            if state.last_error is not None:
                doc["configErrors"] = [str(issue) for issue in state.last_error.issues]
        return doc

    def connections(self) -> list[dict[str, object]]:
        return self.proxy.live_rows()

    async def quit(self) -> None:
        self._stop.set()

    # -- run ----------------------------------------------------------------------------------
    async def run(self) -> None:
        opts = self.options
        check_admin_address(opts.admin_addr[0])
        self.config = await open_config_source(opts.config, self._on_snapshot,
                                               registry=self.metrics.registry)
        if self.workload is None:
            self.config.stop()
            await self.config.run()  # returns at once; closes the file watch
            raise WaypointSetupError(self.config_error or "no waypoint workload")
        identity = self.workload.identity
        await self.certs.get(identity)  # fail closed: no certificate, no listener
        server_ctx = await self.contexts.rotating_server_context(identity)
        self._hbone = tunnel.inbound_server(
            self.proxy.on_connect, trust_domain=identity.trust_domain,
            flood_limits=opts.limits.flood, max_backlog=opts.limits.max_peer_backlog,
            on_connection_error=self._on_hbone_error)
        hooks = AdminHooks(ready=lambda: self.ready, readiness_detail=self.readiness_detail,
                           readiness_summary=self.readiness_detail,
                           config_dump=self.config_dump, connections=self.connections,
                           quit=self.quit)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if opts.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._signalled, sig)
        watcher = loop.create_task(self.config.run(), name="config-watch")
        renewal = (loop.create_task(self.node_renewer.run(), name="node-cert-renewal")
                   if self.node_renewer is not None else None)
        registrar = registrar_for(self.config, opts.name, "waypoint", _package_version(),
                                  tuple)
        registration = (loop.create_task(registrar.run(), name="registration")
                        if registrar is not None else None)
        sd_stop = asyncio.Event()
        sd_tasks = [
            loop.create_task(supervise(self.notifier, lambda: self.ready, self.readiness_detail,
                                       sd_stop), name="sd-notify"),
            loop.create_task(run_watchdog(self.notifier, lambda: not watcher.done(), sd_stop),
                             name="sd-watchdog"),
        ]
        accept: asyncio.Task[None] | None = None
        try:
            self._listener = await self.sockets.listener(opts.listen_ip, opts.hbone_port)
            self.upstreams.start()
            accept = loop.create_task(self._accept_loop(self._listener, server_ctx),
                                      name="waypoint-accept")
            await self._http.add(readiness_app(hooks), *opts.readiness_addr, "readiness")
            await self._http.add(metrics_app(self.metrics.registry), *opts.metrics_addr,
                                 "metrics")
            await self._http.add(admin_app(hooks), *opts.admin_addr, "admin")
            self.started.set()
            # What start-up built (modules, pydantic schemas, the config) lives as long as the
            # process: out of the collector's sight, a full collection no longer walks ~68k
            # objects (77 ms measured, a stall of the loop each time it ran).
            gc.freeze()
            log.info("waypoint %s serving as %s (%s) on %s:%d", opts.name, self.workload.key,
                     identity, opts.listen_ip, opts.hbone_port, extra=_EXTRA)
            await self._stop.wait()
            self.notifier.stopping()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._closing = True
            self.config.stop()
            if accept is not None:
                accept.cancel()
            if self._listener is not None:
                self._listener.close()
            if self._hbone is not None:
                await self._hbone.close(opts.drain_timeout)
            if self._conns:
                await asyncio.wait(set(self._conns), timeout=opts.drain_timeout)
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, *([accept] if accept else []),
                                 return_exceptions=True)
            await self.proxy.aclose()
            await self.upstreams.aclose(timeout=max(opts.drain_timeout, 0.5))
            if renewal is not None:
                renewal.cancel()
            if registrar is not None and registration is not None:
                registrar.stop()  # leave the fleet (lease revoked)
                await registration
            watcher.cancel()
            await asyncio.gather(watcher, *([renewal] if renewal else []),
                                 return_exceptions=True)
            await self._http.close()
            await self.certs.aclose()
            sd_stop.set()
            await asyncio.gather(*sd_tasks, return_exceptions=True)
            self.notifier.close()
            self.sockets.close()
            self.metrics.flush_access()
            log.info("waypoint stopped", extra=_EXTRA)

    def _signalled(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            assert self.config is not None
            task = asyncio.get_running_loop().create_task(self.config.reload_async())
            self._conns.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self._conns.discard)
            return
        log.info("received %s", sig.name, extra=_EXTRA)
        self._stop.set()

    async def _accept_loop(self, lsock: socket.socket, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        while not self._closing:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if self._closing:
                    return
                log.warning("accept failed: %s", exc, extra=_EXTRA)
                await asyncio.sleep(0.05)
                continue
            limits = self.options.limits
            if len(self._conns) >= self.options.max_connections:
                self._refuse(conn, "connection_limit")
                continue
            if self._handshakes >= limits.max_pending_handshakes:
                self._refuse(conn, "handshake_limit")
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, ctx))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        close_with_reset(sock)
        self.metrics.rejected.labels(reason=reason).inc()

    async def _serve(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        limits = self.options.limits
        self._handshakes += 1
        started = time.monotonic()
        assert self._hbone is not None
        try:
            proto = await self._hbone.accept(sock, ctx, handshake_timeout=limits.handshake_timeout)
        except (OSError, NodeproxyError) as exc:  # the transport closed the socket
            late = time.monotonic() - started >= 0.95 * limits.handshake_timeout
            self.metrics.rejected.labels(
                reason="handshake_timeout" if late else "tls_failure").inc()
            log.debug("TLS handshake failed: %s", exc, extra=_EXTRA)
            return
        finally:
            self._handshakes -= 1
        await proto.closed

    def _on_hbone_error(self, proto: HboneProtocol, event: hbone_events.ConnectionError) -> None:
        if event.kind in ("reset_flood", "control_flood"):
            self.metrics.rejected.labels(reason=event.kind).inc()
            log.warning("HBONE connection from %s closed with GOAWAY ENHANCE_YOUR_CALM: %s",
                        proto.peer_identity, event.reason, extra=_EXTRA)
