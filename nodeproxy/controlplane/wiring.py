"""One entry point for the daemons: ``--config`` is a file path or an ``etcd://`` URL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from nodeproxy.config_source import ConfigSource
from nodeproxy.controlplane.endpoint import is_store_url, parse_store_url

if TYPE_CHECKING:  # aetcd and grpc (~12 MiB) are imported only by daemons using a store
    from nodeproxy.controlplane.registration import Registrar, Registration
    from nodeproxy.controlplane.source import StoreConfigSource
from ztunnel_cfg.snapshot import Snapshot

AnySource: TypeAlias = "ConfigSource | StoreConfigSource"


async def open_config_source(config: str, on_snapshot: Callable[[Snapshot], None],
                             registry: object | None = None) -> AnySource:
    """The source for ``config``, with its first snapshot delivered.

    A file that does not load raises ``ConfigError``; a store is waited for (with backoff)
    until it holds a valid config.
    """
    if not is_store_url(config):
        return ConfigSource(config, on_snapshot, registry=registry)
    from nodeproxy.controlplane.source import StoreConfigSource

    source = StoreConfigSource(parse_store_url(config), on_snapshot, registry=registry)
    await source.start()
    return source


def store_detail(source: AnySource | None) -> str | None:
    """The readiness line about the store (None for a file)."""
    if source is not None and not isinstance(source, ConfigSource):
        return source.status.detail(time.time())
    return None


def store_summary(source: AnySource | None) -> dict[str, object] | None:
    if source is not None and not isinstance(source, ConfigSource):
        return source.status.summary(time.time())
    return None


async def fetch_snapshot(config: str) -> Snapshot:
    """One good snapshot of ``config`` now (file or store), for start-up decisions."""
    if not is_store_url(config):
        from ztunnel_cfg.snapshot import load_snapshot

        return load_snapshot(config)
    from nodeproxy.controlplane.source import StoreConfigSource

    got: list[Snapshot] = []
    source = StoreConfigSource(parse_store_url(config), got.append)
    runner = asyncio.ensure_future(source.run())
    try:
        await source.start()
    finally:
        source.stop()
        await runner
    return got[-1]


def load_snapshot_any(config: str) -> Snapshot:
    """:func:`fetch_snapshot` for synchronous callers (the CLI before its loop runs)."""
    return asyncio.run(fetch_snapshot(config))


class StoreSnapshots:
    """The CA service's placement source backed by the store: ``get()`` is the last good
    snapshot (kept while the store is unreachable); ``run()`` keeps it current."""

    def __init__(self, config: str) -> None:
        from nodeproxy.controlplane.source import StoreConfigSource

        self.path = config
        self.source = StoreConfigSource(parse_store_url(config), lambda _s: None)
        self.last_error: str | None = None

    async def start(self) -> None:
        await self.source.start()

    async def run(self) -> None:
        await self.source.run()

    def stop(self) -> None:
        self.source.stop()

    def get(self) -> Snapshot:
        state = self.source.state
        self.last_error = "; ".join(str(i) for i in state.last_error.issues) \
            if state.last_error else None
        return self.source.snapshot


def registrar_for(source: AnySource | None, name: str, kind: str, version: str,
                  enrolled: Callable[[], tuple[str, ...]]) -> Registrar | None:
    """A fleet registration for a daemon whose config comes from the store (else None)."""
    if source is None or isinstance(source, ConfigSource):
        return None
    from nodeproxy.controlplane.registration import Registrar, Registration

    def info() -> Registration:
        status = source.status
        return Registration(name=name, kind=kind, version=version,
                            config_revision=status.revision, enrolled=enrolled(),
                            stale=status.stale())

    registrar = Registrar(source.spec, info)
    source.listeners.append(registrar.poke)
    return registrar
