"""One structured access-log line per connection, written at close (never per chunk)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

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


def write(record: AccessRecord) -> None:
    # Extras become key=value pairs (text) or JSON fields (--log-format json).
    fields = asdict(record)
    log.info(
        "connection %s %s -> %s %s",
        record.direction,
        record.src_workload or record.src_addr,
        record.dst_workload or record.dst_addr,
        record.path,
        extra={"component": "access", **{k: v for k, v in fields.items() if v != ""}},
    )
