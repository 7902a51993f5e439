"""ConfigSource against a real file and a real watcher."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeproxy.config_source import ConfigSource
from ztunnel_cfg import ConfigError, Snapshot, load_config_text, load_snapshot

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


async def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


async def events_read_after(source: ConfigSource, directory: Path) -> None:
    """A barrier: write an unrelated file next to the config and wait until the watcher has
    read its event.  inotify delivers in order, so every earlier event has been read too."""
    before = source.events_seen
    (directory / "unrelated.txt").write_text("barrier")
    await eventually(lambda: source.events_seen > before)


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
        # The watch is in place once the constructor returns: one write is enough.
        replace_atomically(path, TWO)
        await eventually(lambda: len(got) >= 2)
        assert len(got[-1].config.workloads) == 2
        good = source.snapshot
        replace_atomically(path, BROKEN)
        await eventually(lambda: source.fail_count >= 1)
        assert source.snapshot is good  # the bad file did not replace it
        assert source.state.last_error is not None
        # Unrelated files in the same directory are ignored.
        changes = source.changes_seen
        before = source.state.ok_count + source.state.fail_count
        events = source.events_seen
        (tmp_path / "other.yaml").write_text("junk: [")
        await eventually(lambda: source.events_seen > events)
        assert source.changes_seen == changes
        assert source.state.ok_count + source.state.fail_count == before
        replace_atomically(path, ONE)
        await eventually(lambda: source.state.last_error is None)
        assert len(source.snapshot.config.workloads) == 1

    await _with_running(source, body)


async def test_stop_ends_run_promptly(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    source = ConfigSource(path, lambda _s: None)

    async def body() -> None:
        await asyncio.sleep(0.1)

    await _with_running(source, body)


# --- only completed writes, never an empty document, parsed off the loop ----------------------

THREE = TWO + '- {name: c, namespace: default, workloadIps: ["10.0.0.3"], node: n1}\n'


class RecordingLoader:
    """The injected loader: the real one, plus which thread ran it and what it returned."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.workloads: list[int] = []  # workload count of every successful load

    def __call__(self, path: Path) -> Snapshot:
        self.threads.append(threading.get_ident())
        snapshot = load_snapshot(path)
        self.workloads.append(len(snapshot.config.workloads))
        return snapshot


async def test_a_rewrite_in_two_writes_reloads_once_after_close(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(THREE)
    loader = RecordingLoader()
    got: list[Snapshot] = []
    source = ConfigSource(path, got.append, loader=loader, debounce_ms=20)
    complete = TWO
    first_half = ONE  # cut after the first workload: valid YAML, a smaller mesh
    assert len(load_config_text(first_half).workloads) == 1

    async def body() -> None:
        with path.open("w") as f:  # truncate, then write in two parts
            f.write(first_half)
            f.flush()
            os.fsync(f.fileno())
            await events_read_after(source, tmp_path)
            assert source.changes_seen == 0, "a write in progress was taken as a change"
            assert loader.workloads == [3]
            f.write(complete[len(first_half) :])
        await eventually(lambda: len(got) == 2)
        await events_read_after(source, tmp_path)
        assert source.changes_seen == 1
        assert loader.workloads == [3, 2]
        assert len(source.snapshot.config.workloads) == 2
        assert source.fail_count == 0

    await _with_running(source, body)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("", "is empty", id="empty"),
        pytest.param("# all gone\n", "is empty", id="comment-only"),
        pytest.param("services: []\n", "has no top-level 'workloads' list", id="no-workloads"),
    ],
)
async def test_an_empty_write_is_rejected_and_the_last_snapshot_kept(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(TWO)
    got: list[Snapshot] = []
    registry = CollectorRegistry()
    source = ConfigSource(path, got.append, registry=registry, debounce_ms=20)
    first = source.snapshot

    async def body() -> None:
        path.write_text(text)
        await eventually(lambda: reloads(registry, "error") == 1)
        assert source.snapshot is first
        assert got == [first]
        assert reloads(registry, "ok") == 1
        error = source.state.last_error
        assert error is not None
        assert f"{path} {problem}" in str(error)
        assert "workloads: []" in str(error)

    await _with_running(source, body)


async def test_reloads_parse_off_the_loop_and_deliver_on_it(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    loader = RecordingLoader()
    delivered_on: list[int] = []
    source = ConfigSource(
        path, lambda _s: delivered_on.append(threading.get_ident()), loader=loader
    )
    loop_thread = threading.get_ident()
    assert loader.threads == [loop_thread]  # the constructor's first load is synchronous

    async def body() -> None:
        replace_atomically(path, TWO)  # the watcher's reload
        await eventually(lambda: len(delivered_on) == 2)
        path.write_text(THREE)
        assert await source.reload_async() is True  # the SIGHUP reload
        assert loader.workloads == [1, 2, 3]
        assert loop_thread not in loader.threads[1:]
        assert delivered_on == [loop_thread] * 3

    await _with_running(source, body)


class GatedLoader(RecordingLoader):
    """Holds its second load (the first after the constructor's), after reading the file,
    until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> Snapshot:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            snapshot = super().__call__(path)
            if len(self.threads) == 2:
                self.entered.set()
                assert self.release.wait(20)
            return snapshot
        finally:
            with self._lock:
                self.running -= 1


async def test_reloads_requested_during_a_reload_give_exactly_one_more(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    got: list[Snapshot] = []
    loader = GatedLoader()
    # run() is not started: only reload_async() reloads (polling: no inotify fd is held).
    source = ConfigSource(path, got.append, loader=loader, force_polling=True)

    path.write_text(TWO)
    running = asyncio.create_task(source.reload_async())
    await eventually(loader.entered.is_set)
    path.write_text(THREE)  # written while the first reload runs: must not be lost
    waiting = [asyncio.create_task(source.reload_async()) for _ in range(3)]
    await asyncio.sleep(0)  # let them queue behind the running reload
    loader.release.set()
    assert await running is True
    assert await asyncio.gather(*waiting) == [True, True, True]
    assert loader.workloads == [1, 2, 3]  # one reload after the running one, not three
    assert loader.most_at_once == 1
    assert [len(s.config.workloads) for s in got] == [1, 2, 3]


async def test_a_load_finishing_after_a_newer_one_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    got: list[Snapshot] = []
    loader = GatedLoader()
    source = ConfigSource(path, got.append, loader=loader, force_polling=True)

    path.write_text(TWO)
    slow = asyncio.create_task(source.reload_async())  # reads TWO, then is held
    await eventually(loader.entered.is_set)
    path.write_text(THREE)
    assert source.reload() is True  # a synchronous reload reads THREE and wins
    loader.release.set()
    assert await slow is False  # TWO is older than what is loaded: dropped
    assert len(source.snapshot.config.workloads) == 3
    assert [len(s.config.workloads) for s in got] == [1, 3]


async def test_a_burst_of_writes_gives_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    loader = RecordingLoader()
    source = ConfigSource(path, lambda _s: None, loader=loader, debounce_ms=300)

    async def body() -> None:
        for text in (TWO, ONE, TWO, ONE, THREE):
            replace_atomically(path, text)
        await eventually(lambda: len(loader.workloads) == 2)
        await events_read_after(source, tmp_path)
        replace_atomically(path, TWO)  # a later, separate change: its own reload
        await eventually(lambda: len(loader.workloads) == 3)
        assert loader.workloads == [1, 3, 2]

    await _with_running(source, body)


async def test_kubernetes_configmap_symlink_swap_reloads(tmp_path: Path) -> None:
    # The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>;
    # an update renames a new ..data_tmp symlink over ..data.
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "config.yaml").write_text(ONE)
    (tmp_path / "..data").symlink_to("..v1")
    path = tmp_path / "config.yaml"
    path.symlink_to("..data/config.yaml")
    got: list[Snapshot] = []
    source = ConfigSource(path, got.append, debounce_ms=20)

    async def body() -> None:
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "config.yaml").write_text(TWO)
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await eventually(lambda: len(got) == 2)
        assert len(source.snapshot.config.workloads) == 2

    await _with_running(source, body)


async def test_polling_fallback_reloads_a_settled_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE)
    got: list[Snapshot] = []
    source = ConfigSource(path, got.append, force_polling=True, poll_interval=0.02)

    async def body() -> None:
        replace_atomically(path, TWO)
        await eventually(lambda: len(got) == 2)
        assert len(source.snapshot.config.workloads) == 2

    await _with_running(source, body)
