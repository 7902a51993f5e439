"""One structured access-log line per connection, written at close (never per chunk)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

log = logging.getLogger("nodeproxy.access")


@dataclass(frozen=True, slots=True)
class AccessRecord:
    conn_id: str
    direction: str  # outbound | inbound | inbound_plaintext
    src_addr: str
    dst_addr: str
    src_workload: str
    src_identity: str
    dst_workload: str
    dst_identity: str
    dst_service: str
    path: str  # hbone | waypoint | passthrough | plaintext | denied | failed
    bytes_sent: int
    bytes_received: int
    duration_ms: float
    response_flags: str
    policy: str
    reason: str = ""


_FIELDS = tuple(f.name for f in fields(AccessRecord))


def write(record: AccessRecord) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    # Extras become key=value pairs (text) or JSON fields (--log-format json).  A flat getattr
    # loop: dataclasses.asdict deep-copies and cost ~60 us of a ~100 us access line.
    fields: dict[str, object] = {}
    for name in _FIELDS:
        value = getattr(record, name)
        if value != "":
            fields[name] = value
    log.info(
        "connection %s %s -> %s %s",
        record.direction,
        record.src_workload or record.src_addr,
        record.dst_workload or record.dst_addr,
        record.path,
        extra={"component": "access", "fields": fields},
    )
