"""Logging configuration: text (``component=... msg``) or one JSON object per line."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Iterator

_last_second = -1
_last_stamp = ""


def _stamp(created: float) -> str:
    """ISO time with milliseconds; the strftime part is cached per second."""
    global _last_second, _last_stamp
    second = int(created)
    if second != _last_second:
        _last_second, _last_stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_stamp}.{int((created - second) * 1000):03d}Z"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        component = getattr(record, "component", record.name)
        extras = _extras(record)
        tail = "".join(f" {k}={v}" for k, v in extras.items())
        level = record.levelname.lower()
        line = (
            f"{_stamp(record.created)} {level:5} component={component}{tail} "
            f"{record.getMessage()}"
        )
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _stamp(record.created),
            "level": record.levelname.lower(),
            "component": getattr(record, "component", record.name),
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "component",
    "asctime",
    "taskName",
    "fields",
}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    # Hot callers (the access log) pass their fields as one dict, skipping the scan below.
    fields = record.__dict__.get("fields")
    if isinstance(fields, dict):
        return fields
    items = record.__dict__.items()
    return {k: v for k, v in items if k not in _STANDARD and not k.startswith("_")}


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    # The access log writes one line per connection on the event loop; the caller's file/line,
    # thread and process fields are never printed, and collecting them (frame walk in
    # findCaller) was measurable in the connections/s benchmark (logging ~18% of agent CPU).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# Records waiting for the writer thread.  Bounded: a writer that cannot keep up (a blocked
# stderr pipe, a slow journald) must cost dropped lines, never the agent's memory.
BACKGROUND_QUEUE_LINES = 10_000
STOP_WAIT = 5.0  # seconds the daemon's exit waits for the writer to drain


class _HandOffHandler(logging.Handler):
    """Appends records as they are to a bounded batch: formatting (f-strings, JSON) and the
    write to stderr happen in the writer thread, not on the event loop that serves traffic.
    The writer is woken once per batch, not per record: a ``queue.Queue`` put (its Condition
    notify, and the GIL hand-over to a thread woken per line) was 14-26% of the client agent's
    CPU at 800 connections/s in issue 13's profile.  A full batch drops the record and counts
    it."""

    def __init__(self, max_lines: int) -> None:
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self.max_lines = max_lines
        self.dropped = 0
        self.wake = threading.Event()
        self.armed = False  # the writer was woken for records not yet drained

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: one serving thread
        if len(self.records) >= self.max_lines:
            self.dropped += 1
            return False
        self.records.append(record)
        if not self.armed:
            self.armed = True
            self.wake.set()
        return True

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        self.handle(record)


class _ReportDrops(logging.Handler):
    """The writer side: writes each record, first saying how many lines were dropped since
    it last said so."""

    def __init__(self, target: logging.Handler, source: _HandOffHandler,
                 queued: int) -> None:
        super().__init__()
        self.target, self.source, self.queued, self.reported = target, source, queued, 0

    def report_drops(self, created: float) -> None:
        lost = self.source.dropped - self.reported
        if lost:
            self.reported += lost
            self.target.handle(logging.makeLogRecord({
                "name": "nodeproxy", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{lost} log lines dropped: the log writer fell behind "
                       f"({self.queued} lines queued)",
                "component": "logging", "created": created}))

    def handle(self, record: logging.LogRecord) -> bool:
        self.report_drops(record.created)
        return self.target.handle(record)

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        self.target.emit(record)


@contextlib.contextmanager
def background_logging(max_lines: int = BACKGROUND_QUEUE_LINES) -> Iterator[None]:
    """For the daemons: while inside, log records are formatted and written by one writer
    thread (the access log writes a line per connection or request; formatting and writing
    it on the event loop cost 9-12% of the agent's CPU in issue 13's profile).  On exit the
    queue is drained and the root logger writes directly again."""
    root = logging.getLogger()
    direct = list(root.handlers)
    if len(direct) != 1:  # not configured by configure_logging (embedded use): leave it
        yield
        return
    hand_off = _HandOffHandler(max_lines)
    writer = _ReportDrops(direct[0], hand_off, max_lines)
    stopping = threading.Event()

    def write_until_stopped() -> None:
        records = hand_off.records
        while True:
            hand_off.wake.wait()  # one wake-up per batch: lines logged meanwhile join it
            hand_off.wake.clear()
            hand_off.armed = False  # records appended from now on wake us again
            while records:
                writer.handle(records.popleft())
            if stopping.is_set() and not records:
                return

    thread = threading.Thread(target=write_until_stopped, name="log-writer", daemon=True)
    thread.start()
    root.handlers[:] = [hand_off]
    try:
        yield
    finally:
        root.handlers[:] = direct
        # Let the writer finish what is queued; a writer stuck on a blocked stderr must not
        # hold the exit forever (it is a daemon thread).
        stopping.set()
        hand_off.wake.set()
        thread.join(STOP_WAIT)
        if not thread.is_alive():
            writer.report_drops(time.time())
