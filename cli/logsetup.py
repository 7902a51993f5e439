"""Logging configuration: text (``component=... msg``) or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

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
