"""Background logging of the daemons: lines are written by one writer thread, in order, the
queue drained on exit, and a writer that falls behind costs counted drops, not memory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from cli import logsetup


class _Collect(logging.Handler):
    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.threads: set[str] = set()
        self.gate = gate

    def emit(self, record: logging.LogRecord) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.lines.append(record.getMessage())


@pytest.fixture
def root_handler() -> Iterator[list[logging.Handler]]:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.setLevel(logging.INFO)
    try:
        yield root.handlers
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_lines_are_written_by_the_writer_thread_in_order(root_handler: list[logging.Handler]
                                                         ) -> None:
    target = _Collect()
    root_handler[:] = [target]
    log = logging.getLogger("nodeproxy.access")
    with logsetup.background_logging():
        assert logging.getLogger().handlers != [target]
        for n in range(100):
            log.info("line %d", n)
    # Drained on exit, direct writing restored.
    assert target.lines == [f"line {n}" for n in range(100)]
    assert threading.main_thread().name not in target.threads
    assert logging.getLogger().handlers == [target]
    log.info("after")
    assert target.lines[-1] == "after"
    assert threading.main_thread().name in target.threads


def test_a_writer_that_falls_behind_costs_counted_drops(root_handler: list[logging.Handler]
                                                        ) -> None:
    gate = threading.Event()
    target = _Collect(gate)
    root_handler[:] = [target]
    log = logging.getLogger("nodeproxy.access")
    with logsetup.background_logging(max_lines=5):
        for n in range(50):  # the writer is stuck on the first line: the rest queue or drop
            log.info("line %d", n)
        gate.set()
        log.info("last")  # may itself be dropped if the writer has not caught up yet
    kept = [line for line in target.lines if line.startswith("line")]
    drops = [line for line in target.lines if "log lines dropped" in line]
    assert len(kept) <= 1 + 5, "the queue is bounded"
    assert 1 <= len(drops) <= 2, target.lines  # before "last" and/or at exit
    lost = sum(int(line.split()[0]) for line in drops)
    assert lost + len(kept) + target.lines.count("last") == 51


def test_not_configured_by_us_leaves_logging_alone(root_handler: list[logging.Handler]) -> None:
    first, second = _Collect(), _Collect()
    root_handler[:] = [first, second]
    with logsetup.background_logging():
        assert logging.getLogger().handlers == [first, second]
