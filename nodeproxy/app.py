"""Wiring: builds the agent from options and runs it until SIGTERM or /quitquitquit.

Everything the agent needs is constructed here and handed down (socket factories, the
certificate manager, the redirector, the metrics registry), so tests can assemble the same
pieces differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from nodeproxy.agent import Agent, PodProxy, Redirector
from nodeproxy.controlplane.wiring import (
    AnySource,
    open_config_source,
    registrar_for,
    store_detail,
    store_summary,
)
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
from nodeproxy.memory import MemoryReleaser, glibc_trim
from nodeproxy.metrics import Metrics
from nodeproxy.proxy.env import Ports, ProxyEnv
from nodeproxy.proxy.limits import Limits
from nodeproxy.proxy.pod import PodProxy as PodProxyImpl
from nodeproxy.sdnotify import Notifier, run_watchdog, supervise
from nodeproxy.sockets import NetnsSocketFactory, SocketFactory, SocketOptions
from nodeproxy.tls import ContextCache
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.model import Workload
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.spiffe import SpiffeId

if TYPE_CHECKING:  # aetcd/grpc load only when a store is used
    from nodeproxy.controlplane.registration import Registrar

log = logging.getLogger("nodeproxy.app")


def _version() -> str:
    try:
        return version("nodeproxy")
    except PackageNotFoundError:  # a source tree without installation
        return "0.0.0+source"


_EXTRA = {"component": "agent"}


@dataclass(frozen=True, slots=True)
class AgentOptions:
    config: str
    node: str
    in_pod: bool = True  # False: --no-redirect, listeners on workload IPs in this namespace
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    ports: Ports = field(default_factory=Ports)
    drain_timeout: float = 5.0
    cleanup_on_exit: bool = False
    socket_mark: bool = True
    retry_interval: float = 5.0
    handle_signals: bool = True  # False when several agents share one loop (tests)
    limits: Limits = field(default_factory=Limits)
    idle_timeout: float = 3600.0  # a relayed connection silent this long is reset both ways
    memory_check_interval: float = 30.0  # how often to consider giving freed memory back


class AgentApp:
    def __init__(
        self,
        options: AgentOptions,
        ca_client: CaClient,
        redirector: Redirector | None,
        *,
        metrics: Metrics | None = None,
        env_overrides: Callable[[ProxyEnv], None] | None = None,
        notifier: Notifier | None = None,
        node_renewer: NodeCertRenewer | None = None,
    ) -> None:
        self.options = options
        self.node_renewer = node_renewer
        self.metrics = metrics or Metrics()
        self.certs = CertificateManager(ca_client)
        self.contexts = ContextCache(self.certs)
        self.certs.on_rotate(self._rotated)
        self.certs.on_failure(
            lambda identity, _error: self.metrics.cert_failures.labels(
                identity=str(identity)).inc()
        )
        self._agent_gauges()
        self._snapshot: Snapshot | None = None
        self.env = ProxyEnv(snapshot=self._current, metrics=self.metrics, node=options.node,
                            ports=options.ports, limits=options.limits,
                            idle_timeout=options.idle_timeout)
        if not options.in_pod:
            self.env.preserve_source_ip = False
        if env_overrides is not None:
            env_overrides(self.env)
        self.agent = Agent(
            options.node, self._make_pod, self.metrics, redirector,
            drain_timeout=options.drain_timeout, cleanup_on_exit=options.cleanup_on_exit,
            in_pod=options.in_pod,
        )
        self._sockopts = SocketOptions(mark=0x539 if options.socket_mark else None)
        self._pending: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._http = HttpEndpoints()
        self.config: AnySource | None = None
        self.registrar: Registrar | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = notifier or Notifier()  # no-op unless run by systemd (NOTIFY_SOCKET)
        self.memory = MemoryReleaser(self._open_connection_count, glibc_trim())

    # -- wiring -------------------------------------------------------------------------------
    def _agent_gauges(self) -> None:
        """Health gauges computed at scrape time from the live objects (nothing to keep in
        sync on the data path)."""
        metrics = self.metrics
        metrics.build.info({"version": _version(), "python": platform.python_version()})

        def pool(field: str) -> float:
            return float(sum(p.pool.stats()[field] for p in self._pod_impls()))

        metrics.pool_connections.set_function(lambda: pool("connections"))
        metrics.pool_streams.set_function(lambda: pool("streams"))
        def open_in(direction: str) -> Callable[[], float]:
            return lambda: float(sum(
                1 for p in self._pod_impls() for c in p.live.values() if c.direction == direction
            ))

        for direction in ("outbound", "inbound", "inbound_plaintext"):
            metrics.open_connections.labels(direction=direction).set_function(open_in(direction))
        renewer = self.node_renewer
        if renewer is not None:  # the node certificate counts down like the SVIDs
            metrics.cert_expiry.labels(identity=str(renewer.current.node_id)).set_function(
                lambda: max(0.0, renewer.current.not_after.timestamp() - time.time()))

    def _open_connection_count(self) -> int:
        return sum(len(p.live) for p in self._pod_impls())

    def _pod_impls(self) -> list[PodProxyImpl]:
        return [p for p in self.agent.pods.values() if isinstance(p, PodProxyImpl)]

    def _current(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def _rotated(self, identity: SpiffeId, svid: Svid) -> None:
        self.contexts.on_rotate(identity, svid)
        # Computed at scrape time, so the gauge counts down between rotations.
        self.metrics.cert_expiry.labels(identity=str(identity)).set_function(
            lambda: max(0.0, svid.not_after.timestamp() - time.time())
        )

    async def _make_pod(self, workload: Workload) -> PodProxy:
        sockets: SocketFactory
        if self.options.in_pod:
            assert workload.netns is not None
            sockets = await asyncio.to_thread(NetnsSocketFactory, workload.netns, self._sockopts)
        else:
            sockets = SocketFactory(self._sockopts)
        return PodProxyImpl(workload, self.env, sockets, self.certs, self.contexts)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # Policy changes apply to new connections at once: the data path reads this reference.
        self._snapshot = snapshot
        self._spawn(self.agent.apply(snapshot))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- admin hooks --------------------------------------------------------------------------
    def config_dump(self) -> dict[str, object]:
        snapshot = self._snapshot
        doc: dict[str, object] = config_to_document(snapshot.config) if snapshot else {}
        doc["node"] = self.options.node
        doc["enrolled"] = sorted(self.agent.pods)
        doc["enrollmentFailures"] = {uid: f.reason for uid, f in self.agent.failures.items()}
        doc["certificates"] = certificates_document(self.certs)
        if self.node_renewer is not None:
            node = self.node_renewer.current
            doc["nodeCertificate"] = {
                "identity": str(node.node_id), "serial": node.serial_hex,
                "not_before": node.not_before.isoformat(), "not_after": node.not_after.isoformat(),
                "renew_at": datetime.fromtimestamp(node.renew_at(), UTC).isoformat(),
                "failures": self.node_renewer.failures,
                "last_error": self.node_renewer.last_error,
            }
        store = store_summary(self.config)
        if store is not None:
            doc["configStore"] = store
        if self.config is not None:
            state = self.config.state
            doc["configReloads"] = {"ok": state.ok_count, "failed": state.fail_count}
            if state.last_error is not None:
                doc["configErrors"] = [str(issue) for issue in state.last_error.issues]
        return doc

    def readiness_detail(self) -> str:
        store = store_detail(self.config)
        detail = self.agent.readiness_detail()
        return f"{detail}; {store}" if store else detail

    def readiness_summary(self) -> str:
        store = store_detail(self.config)
        summary = self.agent.readiness_summary()
        if store is None:
            return summary
        return f"{summary}; config stale" if store.startswith("config stale") else summary

    def connections(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for pod in list(self.agent.pods.values()):
            live = getattr(pod, "live_connections", None)
            if live is not None:
                rows.extend(conn.to_row() for conn in live())
        rows.sort(key=lambda row: (str(row["workload"]), str(row["started"])))
        return rows

    async def quit(self) -> None:
        self._stop.set()

    # -- run ----------------------------------------------------------------------------------
    async def run(self) -> None:
        opts = self.options
        check_admin_address(opts.admin_addr[0])
        self.config = await open_config_source(opts.config, self._on_snapshot,
                                               registry=self.metrics.registry)
        hooks = AdminHooks(
            ready=lambda: self.agent.ready,
            readiness_detail=self.readiness_detail,
            readiness_summary=self.readiness_summary,
            config_dump=self.config_dump,
            connections=self.connections,
            quit=self.quit,
        )
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if opts.handle_signals else ()
        for sig in signals:
            if sig == signal.SIGHUP:
                loop.add_signal_handler(sig, self._sighup)
            else:
                loop.add_signal_handler(sig, self._signalled, sig)
        watcher = loop.create_task(self.config.run(), name="config-watch")
        retry = loop.create_task(self._retry_loop(), name="enroll-retry")
        memory = loop.create_task(self._memory_loop(), name="memory-release")
        renewal = (loop.create_task(self.node_renewer.run(), name="node-cert-renewal")
                   if self.node_renewer is not None else None)
        self.registrar = registrar_for(self.config, opts.node, "agent", _version(),
                                       lambda: tuple(sorted(self.agent.pods)))
        registration = (loop.create_task(self.registrar.run(), name="registration")
                        if self.registrar is not None else None)
        sd_stop = asyncio.Event()
        sd_tasks = [
            loop.create_task(supervise(self.notifier, self._sd_ready,
                                       self.agent.readiness_detail, sd_stop), name="sd-notify"),
            # Pings come from this loop, so a wedged loop (or a dead config watcher) stops them.
            loop.create_task(run_watchdog(self.notifier, lambda: not watcher.done(), sd_stop),
                             name="sd-watchdog"),
        ]
        try:
            await self._http.add(readiness_app(hooks), *opts.readiness_addr, "readiness")
            await self._http.add(metrics_app(self.metrics.registry), *opts.metrics_addr,
                                 "metrics")
            await self._http.add(admin_app(hooks), *opts.admin_addr, "admin")
            self.started.set()
            log.info("agent for node %s started (%s mode)", opts.node,
                     "in-pod" if opts.in_pod else "no-redirect", extra=_EXTRA)
            await self._stop.wait()
            self.notifier.stopping()
            log.info("draining (deadline %.1f s)", opts.drain_timeout, extra=_EXTRA)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self.config.stop()
            retry.cancel()
            memory.cancel()
            if renewal is not None:
                renewal.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(BaseException):
                    await task
            await self.agent.shutdown()
            if self.registrar is not None and registration is not None:
                self.registrar.stop()  # leave the fleet (lease revoked)
                await registration
            watcher.cancel()
            await asyncio.gather(watcher, retry, memory, *([renewal] if renewal else []),
                                 return_exceptions=True)
            await self._http.close()
            await self.certs.aclose()
            sd_stop.set()  # after the drain: the watchdog keeps pinging while connections finish
            await asyncio.gather(*sd_tasks, return_exceptions=True)
            self.notifier.close()
            log.info("agent stopped", extra=_EXTRA)

    def _signalled(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name, extra=_EXTRA)
        self._stop.set()

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading config", extra=_EXTRA)
        self._spawn(self._reload())

    async def _reload(self) -> None:
        assert self.config is not None
        self.notifier.reloading()
        try:
            await self.config.reload_async()  # parsed off the event loop
        finally:
            self.notifier.ready(self.agent.readiness_detail())  # ends systemd's "reloading"

    def _sd_ready(self) -> bool:
        # systemd readiness = serving, config loaded and applied once; NOT "every pod enrolled"
        # (that is /healthz/ready): one broken pod netns must not fail the unit's start and
        # restart-loop the agent for every other pod of the node.
        return self.started.is_set() and self._snapshot is not None and not self._tasks

    async def _memory_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.memory_check_interval)
            self.memory.tick()

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.retry_interval)
            if self.agent.failures:
                await self.agent.retry_failed()



# -- certificates in the config dump (certificates only: never key material) ----------------------
