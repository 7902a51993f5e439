"""Watches the config file and delivers new snapshots; a bad file keeps the last good one.

Only *completed* writes are acted on: inotify ``IN_CLOSE_WRITE`` (the writer closed the file)
and ``IN_MOVED_TO`` (a file was renamed into place) on the file's directory, for the file's
name.  A truncate-then-write rewrite seen half way is never loaded, and neither is an empty
file (the loader rejects it: removing every workload must be written as ``workloads: []``).
The directory is watched, not the file, so atomic rename-replace is seen; when the file is a
symlink into a sibling entry (a Kubernetes ConfigMap's ``config.yaml -> ..data/config.yaml``)
the kubelet's rename of that entry is seen too.

Parsing and indexing run in a worker thread (a 10,000-workload file takes seconds) so the
data path on the event loop never stalls; the new snapshot is swapped in, and
``on_snapshot`` called, on the loop.  Reload results are kept as a pure
:class:`~ztunnel_cfg.reload.ReloadState` (for the admin API), logged, and counted in
``nodeproxy_config_reloads_total{result="ok|error"}`` when a registry is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Event, Inotify, Mask

from ztunnel_cfg.errors import ConfigError
from ztunnel_cfg.reload import ReloadState
from ztunnel_cfg.snapshot import Snapshot, load_snapshot

log = logging.getLogger("nodeproxy.config")
_EXTRA = {"component": "config"}

# Completed writes only: IN_MODIFY would fire for every write() of a rewrite in progress.
_WATCH_MASK = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.ONLYDIR
_Outcome = Snapshot | ConfigError


class ConfigSource:
    """Load ``path`` now (``ConfigError`` if that fails), then reload on change or on demand.

    ``on_snapshot`` is called with every new good snapshot (including the first), on the
    caller's thread / event loop; it must not raise.  ``loader`` turns the path into a
    snapshot (it runs in a worker thread for :meth:`reload_async` and the watcher).
    ``force_polling`` (or an inotify failure, e.g. the per-user instance limit) makes the
    watcher poll the file's stat every ``poll_interval`` seconds instead, acting on a change
    only once the file has stayed the same for one interval.
    """

    def __init__(
        self,
        path: str | Path,
        on_snapshot: Callable[[Snapshot], None],
        clock: Callable[[], float] = time.time,
        registry: object | None = None,
        debounce_ms: int = 50,
        force_polling: bool = False,
        poll_interval: float = 1.0,
        loader: Callable[[Path], Snapshot] = load_snapshot,
    ) -> None:
        self.path = Path(path)
        self._on_snapshot = on_snapshot
        self._clock = clock
        self._debounce = debounce_ms / 1000
        self._poll_interval = poll_interval
        self._loader = loader
        self._stop = asyncio.Event()
        # Directory events read by the watcher, all of them and those that are completed
        # writes of our file (tests order their writes by these).
        self.events_seen = 0
        self.changes_seen = 0
        # Loads are numbered when they start; a load finishing after a later-started one has
        # been applied is stale (it read an older file) and is dropped.
        self._loads_started = 0
        self._load_applied = 0
        # reload_async(): one at a time; a request made while one runs gets one more after it.
        self._reload_lock = asyncio.Lock()
        self._requests = 0
        self._requests_covered = 0
        self._last_result = False
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "nodeproxy_config_reloads",
                "Config (re)load attempts by result.",
                ["result"],
                registry=registry,  # type: ignore[arg-type]
            )
            for result in ("ok", "error"):
                self._counter.labels(result=result)  # expose zeros from the start
        self.state = ReloadState()
        # Watch before the first load: a write completed in between is queued, not lost.
        self._inotify = None if force_polling else self._start_inotify()
        self._stamp_at_start = self._stamp()
        if not self.reload():
            if self._inotify is not None:
                self._inotify.close()
            assert self.state.last_error is not None
            raise self.state.last_error

    # --- counters as attributes (the admin API reads these) -----------------------------------

    @property
    def snapshot(self) -> Snapshot:
        assert self.state.current is not None  # the constructor guarantees a first snapshot
        return self.state.current

    @property
    def ok_count(self) -> int:
        return self.state.ok_count

    @property
    def fail_count(self) -> int:
        return self.state.fail_count

    # --- reloading ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the file now, blocking the caller.  True if a new snapshot was delivered.

        On a running event loop prefer :meth:`reload_async`, which parses in a thread.
        """
        self._loads_started += 1
        return self._apply(self._loads_started, self._load())

    async def reload_async(self) -> bool:
        """Load the file in a worker thread (e.g. on SIGHUP).  True if a new snapshot was
        delivered.  Requests that arrive while a reload runs share the single reload that
        follows it (which reads the file as it is then)."""
        self._requests += 1
        request = self._requests
        async with self._reload_lock:
            if self._requests_covered >= request:
                return self._last_result  # a reload that started after this request covers it
            covers = self._requests
            self._loads_started += 1
            number = self._loads_started
            outcome = await asyncio.to_thread(self._load)
            self._requests_covered = covers
            self._last_result = self._apply(number, outcome)
            return self._last_result

    def _load(self) -> _Outcome:
        try:
            return self._loader(self.path)
        except ConfigError as exc:
            return exc

    def _apply(self, number: int, outcome: _Outcome) -> bool:
        """Swap in (or reject) a load's result; on the loop thread, never in the worker."""
        if number < self._load_applied:
            log.debug("config %s: dropping a stale load", self.path, extra=_EXTRA)
            return False
        self._load_applied = number
        now = self._clock()
        if isinstance(outcome, ConfigError):
            self.state = self.state.apply_failure(outcome, now)
            self._count("error")
            kept = "keeping the last good config" if self.state.current else "no config loaded"
            log.error(
                "config %s rejected (%d error%s, %s):\n%s",
                self.path,
                len(outcome.issues),
                "" if len(outcome.issues) == 1 else "s",
                kept,
                "\n".join(f"  {issue}" for issue in outcome.issues),
                extra=_EXTRA,
            )
            return False
        self.state = self.state.apply_success(outcome, now)
        self._count("ok")
        log.info("config %s loaded: %r", self.path, outcome, extra=_EXTRA)
        self._on_snapshot(outcome)
        return True

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(result=result).inc()

    # --- watching -------------------------------------------------------------------------------

    def _start_inotify(self) -> Inotify | None:
        try:
            inotify = Inotify()
        except OSError as exc:  # EMFILE: fs.inotify.max_user_instances reached
            self._log_polling(exc)
            return None
        try:
            inotify.add_watch(self.path.parent, _WATCH_MASK)
        except OSError as exc:  # e.g. a filesystem without inotify support
            inotify.close()
            self._log_polling(exc)
            return None
        return inotify

    def _log_polling(self, exc: OSError) -> None:
        log.warning(
            "cannot watch %s with inotify (%s): polling every %.1f s instead",
            self.path.parent,
            exc.strerror or exc,
            self._poll_interval,
            extra=_EXTRA,
        )

    async def run(self) -> None:
        """Watch until :meth:`stop`; a burst of completed writes gives one reload."""
        work = asyncio.ensure_future(self._watch_and_reload())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # the watcher died: re-raise (the app's watchdog notices)
        finally:
            # Cancelling an in-flight reload drops its result (the thread finishes on its own).
            work.cancel()
            stopped.cancel()
            try:
                await asyncio.gather(work, stopped, return_exceptions=True)
            finally:
                # Also when this task is cancelled again while waiting above (the agent's
                # shutdown does that): the inotify and epoll descriptors leaked otherwise.
                if self._inotify is not None:
                    self._inotify.close()
                    self._inotify = None

    def stop(self) -> None:
        self._stop.set()

    async def _watch_and_reload(self) -> None:
        changed = asyncio.Event()
        inotify = self._inotify
        watch = self._poll(changed) if inotify is None else self._read_events(inotify, changed)
        watcher = asyncio.create_task(watch)
        try:
            while True:
                await self._until_set_or_dead(changed, watcher)
                await asyncio.sleep(self._debounce)  # let the rest of a burst arrive
                changed.clear()  # a change from here on gets a reload of its own
                await self.reload_async()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _until_set_or_dead(self, changed: asyncio.Event, watcher: asyncio.Task[None]) -> None:
        async def set_() -> None:
            await changed.wait()

        waiting = asyncio.ensure_future(set_())
        try:
            await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if watcher.done():
            watcher.result()  # its error, if any
            raise RuntimeError(f"the watcher of {self.path} ended")

    async def _read_events(self, inotify: Inotify, changed: asyncio.Event) -> None:
        async for event in inotify:
            self.events_seen += 1
            if self._is_ours(event):
                self.changes_seen += 1
                changed.set()

    def _is_ours(self, event: Event) -> bool:
        if Mask.Q_OVERFLOW in event.mask:
            return True  # events were lost: ours may be among them
        if Mask.IGNORED in event.mask:
            log.error(
                "config directory %s is gone: no more automatic reloads (SIGHUP still works)",
                self.path.parent,
                extra=_EXTRA,
            )
            return False
        return event.name is not None and event.name.name in self._names_to_watch()

    def _names_to_watch(self) -> set[str]:
        names = {self.path.name}
        with contextlib.suppress(OSError):
            target = Path(os.readlink(self.path))
            if not target.is_absolute() and len(target.parts) > 1:
                names.add(target.parts[0])  # config.yaml -> ..data/config.yaml: watch ..data
        return names

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def _poll(self, changed: asyncio.Event) -> None:
        # Without inotify a completed write cannot be told from one in progress: act only
        # once the file has stayed the same for a whole interval.
        loaded = previous = self._stamp_at_start
        while True:
            await asyncio.sleep(self._poll_interval)
            current = self._stamp()
            if current is not None and current == previous and current != loaded:
                loaded = current
                self.changes_seen += 1
                changed.set()
            previous = current
