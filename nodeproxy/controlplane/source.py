"""The config from etcd: list, watch from the listed revision + 1, re-list on trouble.

The Cilium/Calico pattern: a full list gives the resources and the store revision R; a watch
from R + 1 then streams every change in order.  When the watch breaks (member gone, leader
lost, compaction of the revision we need) the source re-lists and replaces its whole view,
so keys deleted while it was away disappear too; connection attempts back off exponentially
(with jitter) up to ``backoff_cap``.  A probe (a linearizable read) every ``probe_interval``
notices a store that went silent without closing the stream.

Whatever happens to the store, the last good snapshot stays in force: an unreachable store
only marks the source *stale* (readiness detail, ``/config_dump``, the
``nodeproxy_config_store_connected`` and ``nodeproxy_config_stale_seconds`` metrics); content
that does not validate (a hand-made edit) is rejected with errors naming its keys, exactly
like a bad config file, and never replaces the snapshot.  Nothing here ever un-enrols a pod
because the store went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import aetcd
from aetcd import exceptions as etcd_errors

from nodeproxy.controlplane.client import describe, make_client
from nodeproxy.controlplane.endpoint import StoreSpec
from nodeproxy.controlplane.store import list_config
from ztunnel_cfg.errors import ConfigError, ConfigIssue
from ztunnel_cfg.reload import ReloadState
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.store_layout import (
    CONFIG_PREFIX,
    EntryCache,
    Item,
    decode_value,
    join_resources,
)

log = logging.getLogger("nodeproxy.config")
_EXTRA = {"component": "config"}
_PREFIX = CONFIG_PREFIX.encode()

# What a broken store looks like from here: aetcd's errors, gRPC's, timeouts, OS errors.
_STORE_TROUBLE = (etcd_errors.ClientError, asyncio.TimeoutError, OSError, ConnectionError)


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The source's view of the store (a value: the admin API and readiness read it)."""

    url: str
    connected: bool = False
    revision: int = 0  # store revision of the snapshot in force (0: none yet)
    seen_revision: int = 0  # newest revision read from the store (valid or not)
    stale_since: float | None = None  # when the store was lost (None: connected)
    last_error: str | None = None
    relists: int = 0

    def stale(self) -> bool:
        return not self.connected

    def summary(self, now: float) -> dict[str, object]:
        return {
            "url": self.url,
            "connected": self.connected,
            "state": "live" if self.connected else "stale",
            "revision": self.revision,
            "seenRevision": self.seen_revision,
            "staleSeconds": round(now - self.stale_since, 3) if self.stale_since else 0.0,
            "lastError": self.last_error,
            "relists": self.relists,
        }

    def detail(self, now: float) -> str:
        if self.connected:
            return f"config: etcd revision {self.revision}"
        since = f" for {now - self.stale_since:.0f} s" if self.stale_since else ""
        return (f"config stale: etcd unreachable{since} ({self.last_error}); serving the last "
                f"good snapshot (revision {self.revision})")


class _Relist(Exception):
    """The watch cannot continue; list again."""


class StoreConfigSource:
    """Same contract as :class:`nodeproxy.config_source.ConfigSource` (``state``,
    ``snapshot``, ``run``/``stop``, ``reload_async``), with the store as the source.

    ``await start()`` returns once the first good snapshot is delivered (retrying, with
    backoff, while the store is unreachable or holds no valid config).
    """

    def __init__(
        self,
        spec: StoreSpec,
        on_snapshot: Callable[[Snapshot], None],
        *,
        clock: Callable[[], float] = time.time,
        registry: object | None = None,
        client_factory: Callable[[StoreSpec], aetcd.Client] = make_client,
        builder: Callable[[list[Item]], Snapshot] | None = None,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        debounce: float = 0.02,
    ) -> None:
        self.spec = spec
        self.path = str(spec)  # what logs and the admin API call the source
        self._on_snapshot = on_snapshot
        self._clock = clock
        self._client_factory = client_factory
        cache = EntryCache()  # used by one rebuild at a time
        self._builder = builder or (
            lambda items: Snapshot.build(join_resources(items, cache).config))
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._probe_interval, self._probe_timeout = probe_interval, probe_timeout
        self._debounce = debounce
        self.state = ReloadState()
        self.status = StoreStatus(str(spec), stale_since=clock())
        self._values: dict[str, bytes] = {}
        self._decoded: dict[str, tuple[bytes, Item | ConfigIssue]] = {}
        self._revision = 0  # of self._values
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()
        self._first = asyncio.Event()
        self._resync = asyncio.Event()
        self.listeners: list[Callable[[StoreStatus], None]] = []
        self._metrics(registry)

    # --- metrics ----------------------------------------------------------------------------
    def _metrics(self, registry: object | None) -> None:
        self._counter = None
        if registry is None:
            return
        from prometheus_client import Counter, Gauge

        self._counter = Counter("nodeproxy_config_reloads", "Config (re)load attempts by result.",
                                ["result"], registry=registry)  # type: ignore[arg-type]
        for result in ("ok", "error"):
            self._counter.labels(result=result)
        Gauge("nodeproxy_config_store_connected",
              "1 while the config store (etcd) is reachable and watched, 0 while stale.",
              registry=registry,  # type: ignore[arg-type]
              ).set_function(lambda: 1.0 if self.status.connected else 0.0)
        Gauge("nodeproxy_config_stale_seconds",
              "Seconds since the config store became unreachable (0 while connected).",
              registry=registry,  # type: ignore[arg-type]
              ).set_function(self._stale_seconds)
        Gauge("nodeproxy_config_revision",
              "Store revision of the config snapshot in force.",
              registry=registry,  # type: ignore[arg-type]
              ).set_function(lambda: float(self.status.revision))

    def _stale_seconds(self) -> float:
        since = self.status.stale_since
        return 0.0 if since is None or self.status.connected else max(0.0, self._clock() - since)

    # --- the ConfigSource contract ------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        assert self.state.current is not None
        return self.state.current

    @property
    def ok_count(self) -> int:
        return self.state.ok_count

    @property
    def fail_count(self) -> int:
        return self.state.fail_count

    async def reload_async(self) -> bool:
        """SIGHUP: re-list from the store now."""
        before = self.state.ok_count
        self._resync.set()
        return self.state.ok_count > before

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Run in the background until the first good snapshot is in force."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._first.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if self._task.done():
            self._task.result()

    _task: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Watch until :meth:`stop` (starting if :meth:`start` was not called)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({self._task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if self._task.done():
                self._task.result()
        finally:
            stopped.cancel()
            self._task.cancel()
            await asyncio.gather(self._task, stopped, return_exceptions=True)

    # --- status ----------------------------------------------------------------------------
    def _set_status(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        for listener in list(self.listeners):
            listener(self.status)

    def _lost(self, exc: BaseException) -> None:
        text = describe(exc)
        if self.status.connected or self.status.last_error != text:
            log.warning("config store %s unreachable (%s): keeping the last good snapshot "
                        "(revision %d)", self.spec, text, self.status.revision, extra=_EXTRA)
        self._set_status(connected=False, last_error=text,
                         stale_since=self.status.stale_since or self._clock())

    # --- the loop ----------------------------------------------------------------------------
    async def _loop(self) -> None:
        attempt = 0
        while True:
            client = self._client_factory(self.spec)
            try:
                await client.connect()
                await self._session(client)
                attempt = 0  # a session ended by _Relist: list again at once
            except _Relist as why:
                self._set_status(relists=self.status.relists + 1)
                log.info("config store %s: re-listing (%s)", self.spec, why, extra=_EXTRA)
            except _STORE_TROUBLE as exc:
                self._lost(exc)
                attempt += 1
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            if attempt:
                delay = min(self._backoff_cap, self._backoff_base * 2 ** (attempt - 1))
                await self._sleep(delay * random.uniform(0.5, 1.0))

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._resync.wait(), delay)
        self._resync.clear()

    async def _session(self, client: aetcd.Client) -> None:
        listing = await asyncio.wait_for(list_config(client, generation=False),
                                         self.spec.timeout * 2)
        self._values = dict(listing.values)
        self._revision = listing.revision
        self._set_status(connected=True, stale_since=None, last_error=None,
                         seen_revision=listing.revision)
        await self._rebuild()
        try:
            watch = await client.watch_prefix(_PREFIX, start_revision=listing.revision + 1)
        except etcd_errors.RevisionCompactedError as exc:
            raise _Relist(f"revision compacted ({exc})") from None
        tasks = [
            asyncio.ensure_future(self._consume(watch)),
            asyncio.ensure_future(self._probe(client)),
            asyncio.ensure_future(self._rebuilder()),
            asyncio.ensure_future(self._wait_resync()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise _Relist("the watch ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def _wait_resync(self) -> None:
        await self._resync.wait()
        self._resync.clear()
        raise _Relist("asked to resync")

    async def _consume(self, watch: Any) -> None:
        try:
            async for event in watch:
                key = event.kv.key.decode(errors="replace")
                if event.kind == "PUT":
                    self._values[key] = bytes(event.kv.value)
                else:
                    self._values.pop(key, None)
                self._revision = max(self._revision, int(event.kv.mod_revision))
                self._dirty.set()
        except etcd_errors.RevisionCompactedError as exc:
            raise _Relist(f"revision compacted ({exc})") from None

    async def _probe(self, client: aetcd.Client) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            # Linearizable: needs a leader, so a member cut off from the cluster fails it.
            await asyncio.wait_for(client.get(_PREFIX), self._probe_timeout)

    async def _rebuilder(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce)  # the rest of a burst
            await self._rebuild()

    async def _rebuild(self) -> None:
        self._dirty.clear()
        revision = self._revision
        values = dict(self._values)
        self._set_status(seen_revision=revision)
        items: list[Item] = []
        issues: list[ConfigIssue] = []
        decoded: dict[str, tuple[bytes, Item | ConfigIssue]] = {}
        for key, raw in values.items():
            cached = self._decoded.get(key)
            found = cached[1] if cached is not None and cached[0] == raw else decode_value(key, raw)
            decoded[key] = (raw, found)
            (items if isinstance(found, Item) else issues).append(found)  # type: ignore[arg-type]
        self._decoded = decoded
        outcome: Snapshot | ConfigError
        if issues:
            outcome = ConfigError(issues)
        else:
            try:
                outcome = await asyncio.to_thread(self._builder, items)
            except ConfigError as exc:
                outcome = exc
        now = self._clock()
        if isinstance(outcome, ConfigError):
            self.state = self.state.apply_failure(outcome, now)
            self._count("error")
            log.error("config in %s at revision %d rejected (%d error%s, %s):\n%s", self.spec,
                      revision, len(outcome.issues), "" if len(outcome.issues) == 1 else "s",
                      "keeping the last good config" if self.state.current else
                      "no config loaded", "\n".join(f"  {i}" for i in outcome.issues),
                      extra=_EXTRA)
            return
        self.state = self.state.apply_success(outcome, now)
        self._count("ok")
        self._set_status(revision=revision)
        log.info("config from %s at revision %d: %r", self.spec, revision, outcome, extra=_EXTRA)
        self._on_snapshot(outcome)
        self._first.set()

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(result=result).inc()
