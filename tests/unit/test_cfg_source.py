"""ConfigSource against a real file and a real watcher."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.config_source import ConfigSource
from ztunnel_cfg import ConfigError, Snapshot

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"

ONE = """\
workloads:
- {name: a, namespace: default, workloadIps: ["10.0.0.1"], node: n1}
"""
TWO = ONE + '- {name: b, namespace: default, workloadIps: ["10.0.0.2"], node: n1}\n'
BROKEN = ONE + '- {name: c, namespace: default, workloadIps: ["10.0.0.300"], node: n1}\n'


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def reloads(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("nodeproxy_config_reloads_total", {"result": result})
    assert value is not None
    return value


async def until(
    condition: Callable[[], bool], poke: Callable[[], None], timeout: float = 20.0
) -> None:
    """Repeat ``poke`` (a file write) until ``condition`` holds: the watcher may still be
    starting when the first write happens, so one write is not enough."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the watcher never delivered the change"
        poke()
        for _ in range(20):
            await asyncio.sleep(0.05)
            if condition():
                return


def test_initial_load_delivers_snapshot_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(EXAMPLE.read_text())
    got: list[Snapshot] = []
    registry = CollectorRegistry()
    source = ConfigSource(path, got.append, clock=Clock(), registry=registry)
    assert len(got) == 1
    assert got[0] is source.snapshot is source.state.current
    assert len(source.snapshot.config.workloads) == 8
    assert (source.ok_count, source.fail_count) == (1, 0)
    assert source.state.last_success == 1001.0
    assert reloads(registry, "ok") == 1
    assert reloads(registry, "error") == 0


def test_initial_failure_raises(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(BROKEN)
    got: list[Snapshot] = []
    with pytest.raises(ConfigError) as info:
        ConfigSource(path, got.append)
    assert got == []
    assert "'10.0.0.300' is not an IP address" in str(info.value)
    with pytest.raises(ConfigError):
        ConfigSource(tmp_path / "missing.yaml", got.append)


def test_manual_reload_keeps_last_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    got: list[Snapshot] = []
    registry = CollectorRegistry()
    source = ConfigSource(path, got.append, registry=registry)
    first = source.snapshot
    path.write_text(BROKEN)
    with caplog.at_level(logging.ERROR, logger="nodeproxy.config"):
        assert source.reload() is False
    assert source.snapshot is first
    assert len(got) == 1
    assert source.fail_count == 1
    assert source.state.last_error is not None
    (record,) = [
        r for r in caplog.records if r.name == "nodeproxy.config" and r.levelno >= logging.ERROR
    ]
    assert record.component == "config"  # type: ignore[attr-defined]
    assert "keeping the last good config" in record.getMessage()
    assert "mesh.yaml:3:" in record.getMessage()
    assert reloads(registry, "error") == 1
    path.write_text(TWO)
    assert source.reload() is True
    assert len(got) == 2
    assert len(source.snapshot.config.workloads) == 2
    assert source.state.last_error is None
    assert reloads(registry, "ok") == 2


async def _with_running(source: ConfigSource, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(source.run())
    try:
        await body()
    finally:
        source.stop()
        await asyncio.wait_for(task, 10)
    assert task.done()
    assert task.exception() is None


async def test_watch_picks_up_atomic_replace_and_survives_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    got: list[Snapshot] = []
    source = ConfigSource(path, got.append, debounce_ms=50)

    async def body() -> None:
        await until(lambda: len(got) >= 2, lambda: replace_atomically(path, TWO))
        assert len(got[-1].config.workloads) == 2
        good = source.snapshot
        await until(lambda: source.fail_count >= 1, lambda: replace_atomically(path, BROKEN))
        assert source.snapshot is good  # the bad file did not replace it
        assert source.state.last_error is not None
        # Unrelated files in the same directory are ignored.
        before = source.state.ok_count + source.state.fail_count
        (tmp_path / "other.yaml").write_text("junk: [")
        await asyncio.sleep(0.5)
        assert source.state.ok_count + source.state.fail_count == before
        await until(lambda: source.state.last_error is None, lambda: replace_atomically(path, ONE))
        assert len(source.snapshot.config.workloads) == 1

    await _with_running(source, body)


async def test_stop_ends_run_promptly(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    source = ConfigSource(path, lambda _s: None)

    async def body() -> None:
        await asyncio.sleep(0.1)

    await _with_running(source, body)
