"""Watches the config file and delivers new snapshots; a bad file keeps the last good one.

The parent directory is watched (not the file) so that editors and tools that replace the
file by an atomic rename are seen.  Reload results are kept as a pure
:class:`~ztunnel_cfg.reload.ReloadState` (for the admin API), logged, and counted in
``nodeproxy_config_reloads_total{result="ok|error"}`` when a registry is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import watchfiles

from ztunnel_cfg.errors import ConfigError
from ztunnel_cfg.reload import ReloadState
from ztunnel_cfg.snapshot import Snapshot, load_snapshot

log = logging.getLogger("nodeproxy.config")
_EXTRA = {"component": "config"}


class ConfigSource:
    """Load ``path`` now (``ConfigError`` if that fails), then reload on change or on demand.

    ``on_snapshot`` is called with every new good snapshot (including the first), on the
    caller's thread / event loop; it must not raise.
    """

    def __init__(
        self,
        path: str | Path,
        on_snapshot: Callable[[Snapshot], None],
        clock: Callable[[], float] = time.time,
        registry: object | None = None,
        debounce_ms: int = 200,
        force_polling: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self._on_snapshot = on_snapshot
        self._clock = clock
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling
        self._stop = asyncio.Event()
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
        if not self.reload():
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
        """Load the file now (e.g. on SIGHUP).  True if a new snapshot was delivered."""
        now = self._clock()
        try:
            snapshot = load_snapshot(self.path)
        except ConfigError as exc:
            self.state = self.state.apply_failure(exc, now)
            self._count("error")
            kept = "keeping the last good config" if self.state.current else "no config loaded"
            log.error(
                "config %s rejected (%d error%s, %s):\n%s",
                self.path,
                len(exc.issues),
                "" if len(exc.issues) == 1 else "s",
                kept,
                "\n".join(f"  {issue}" for issue in exc.issues),
                extra=_EXTRA,
            )
            return False
        self.state = self.state.apply_success(snapshot, now)
        self._count("ok")
        log.info("config %s loaded: %r", self.path, snapshot, extra=_EXTRA)
        self._on_snapshot(snapshot)
        return True

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(result=result).inc()

    def _is_our_file(self, _change: watchfiles.Change, changed: str) -> bool:
        return Path(changed).name == self.path.name

    async def run(self) -> None:
        """Watch until :meth:`stop`; each batch of changes to the file triggers one reload."""
        async for _changes in watchfiles.awatch(
            self.path.parent,
            watch_filter=self._is_our_file,
            debounce=self._debounce_ms,
            stop_event=self._stop,
            recursive=False,
            force_polling=self._force_polling,
        ):
            self.reload()

    def stop(self) -> None:
        self._stop.set()
