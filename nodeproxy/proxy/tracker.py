"""The accounting of one pod's connections, in one place for the three directions: the live
table (``/debug/connections``), Istio's TCP metrics and one access-log line per connection.

A handler begins a :class:`Tracked` connection, fills in who and what as it learns them, and
always ends it (``finally``); ``opened`` / ``closed`` / ``failed`` count its outcome.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodeproxy import accesslog
from nodeproxy.errors import RejectedError
from nodeproxy.metrics import ConnectionLabels
from nodeproxy.proxy.env import ProxyEnv
from ztunnel_cfg.model import Workload

log = logging.getLogger("nodeproxy.proxy")


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One row of ``/debug/connections`` (istioctl ztunnel-config connections columns)."""

    conn_id: str
    started: float  # wall-clock epoch seconds
    direction: str  # outbound | inbound | inbound_plaintext
    workload: str  # ns/name of the pod this agent proxies for
    local: str  # the pod-side address
    remote: str  # the peer address (dialed address for outbound)
    target: str  # outbound: the original destination; inbound: the CONNECT authority
    protocol: str  # HBONE | TCP

    def to_row(self) -> dict[str, object]:
        return {
            "id": self.conn_id, "started": self.started, "direction": self.direction,
            "workload": self.workload, "local": self.local, "remote": self.remote,
            "target": self.target, "protocol": self.protocol,
        }


class Tracked:
    """One connection's accounting while it runs; handlers set the fields they learn."""

    __slots__ = (
        "conn_id",
        "direction",
        "dst",
        "dst_addr",
        "dst_identity_shown",
        "flags",
        "mtls",
        "path",
        "policy",
        "reason",
        "received",
        "sent",
        "service",
        "src",
        "src_addr",
        "src_principal",
        "started",
    )

    def __init__(self, conn_id: str, direction: str, src_addr: str, path: str) -> None:
        self.conn_id = conn_id
        self.direction = direction
        self.started = time.monotonic()
        self.src_addr = src_addr
        self.dst_addr = ""
        self.path = path  # hbone | waypoint | passthrough | plaintext | denied | failed ...
        self.flags = "-"
        self.reason = ""
        self.policy = ""
        self.sent = 0  # Istio's sent: destination -> source
        self.received = 0  # source -> destination
        self.src: Workload | None = None
        self.src_principal: str | None = None  # verified peer identity (inbound HBONE)
        self.dst: Workload | None = None
        self.service = ""  # destination service hostname (outbound)
        self.mtls = False
        # Outbound shows the destination's identity only when the tunnel verified it.
        self.dst_identity_shown = True

    def labels(self, reporter: str) -> ConnectionLabels:
        src, dst = self.src, self.dst
        return ConnectionLabels(
            reporter=reporter,
            source_workload=src.name if src else "unknown",
            source_workload_namespace=src.namespace if src else "unknown",
            source_principal=self.src_principal or (str(src.identity) if src else "unknown"),
            source_app=src.canonical_name if src else "unknown",
            destination_workload=dst.name if dst else "unknown",
            destination_workload_namespace=dst.namespace if dst else "unknown",
            destination_principal=str(dst.identity) if dst else "unknown",
            destination_app=dst.canonical_name if dst else "unknown",
            destination_service=self.service or "unknown",
            response_flags=self.flags,
            connection_security_policy="mutual_tls" if self.mtls else "unknown",
        )


class LogThrottle:
    """At most ``per_second`` lines a second; the next line says how many were dropped.

    Rejections come in floods by nature: one access line each (~35 us) would let a client buy
    agent CPU with connections the agent refuses. Metrics still count every one."""

    def __init__(self, per_second: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        self._second = -1
        self._used = 0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: drop this line. Else the number of lines dropped since the last one."""
        second = int(self._clock())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self._per_second:
            self.suppressed += 1
            return None
        self._used += 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped


class ConnectionTracker:
    """Per pod: the live table, metrics and access log of its connections."""

    def __init__(self, env: ProxyEnv, workload: Callable[[], Workload]) -> None:
        self.env = env
        self._workload = workload
        self.live: dict[str, LiveConnection] = {}
        self._reject_log = LogThrottle()

    def begin(self, direction: str, prefix: str, src_addr: str, path: str) -> Tracked:
        return Tracked(self.env.next_conn_id(prefix), direction, src_addr, path)

    def show(self, conn: Tracked, local: str, remote: str, target: str, protocol: str) -> None:
        """List the connection in ``/debug/connections`` (until :meth:`end`)."""
        workload = conn.dst if conn.direction != "outbound" and conn.dst else self._workload()
        self.live[conn.conn_id] = LiveConnection(conn.conn_id, time.time(), conn.direction,
                                                 workload.key, local, remote, target, protocol)

    def _reporter(self, conn: Tracked) -> str:
        return "source" if conn.direction == "outbound" else "destination"

    def opened(self, conn: Tracked) -> None:
        # Only once the upstream side exists, so opened - closed = open now.
        self.env.metrics.connection_opened(conn.labels(self._reporter(conn)))

    def closed(self, conn: Tracked, sent: int, received: int) -> None:
        """The relay ended; ``sent`` destination -> source, ``received`` the other way."""
        conn.sent, conn.received = sent, received
        self.env.metrics.connection_closed(conn.labels(self._reporter(conn)), sent, received)

    def failed(self, conn: Tracked, exc: BaseException) -> None:
        """The connection was refused or failed: flags, path and reason from ``exc``."""
        conn.flags, conn.reason = failure_flags(exc), str(exc)
        conn.path = "denied" if conn.flags == "DENY" else "failed"
        if isinstance(exc, RejectedError):
            conn.path = "rejected"
            self.env.metrics.connection_rejected(conn.direction, exc.reason)
        self.env.metrics.connection_failed(conn.labels(self._reporter(conn)))

    def end(self, conn: Tracked) -> None:
        """Out of the live table; its access-log line."""
        self.live.pop(conn.conn_id, None)
        src, dst = conn.src, conn.dst
        accesslog.write(accesslog.AccessRecord(
            conn_id=conn.conn_id, direction=conn.direction, src_addr=conn.src_addr,
            dst_addr=conn.dst_addr, src_workload=src.name if src else "",
            src_identity=conn.src_principal or (
                str(src.identity) if src and conn.direction == "outbound" else ""),
            dst_workload=dst.name if dst else "",
            dst_identity=str(dst.identity) if dst and conn.dst_identity_shown else "",
            dst_service=conn.service, path=conn.path, bytes_sent=conn.sent,
            bytes_received=conn.received,
            duration_ms=round((time.monotonic() - conn.started) * 1000, 3),
            response_flags=conn.flags, policy=conn.policy, reason=conn.reason,
        ))

    def log_allowed(self) -> bool:
        """Whether a line about a flood-prone event (accept errors) may be written now."""
        return self._reject_log.allow() is not None

    # -- refused before any handler ran -------------------------------------------------------
    def rejected(self, direction: str, exc: RejectedError, peer: str, dst: str = "") -> None:
        """A connection refused by a limit or a safety rule: counted always, logged at most
        ``LogThrottle`` lines a second."""
        self.env.metrics.connection_rejected(direction, exc.reason)
        dropped = self._reject_log.allow()
        if dropped is None:
            return
        note = f" ({dropped} similar lines dropped)" if dropped else ""
        workload = self._workload()
        accesslog.write(accesslog.AccessRecord(
            conn_id=self.env.next_conn_id("rej"), direction=direction, src_addr=peer,
            dst_addr=dst, src_workload="", src_identity="", dst_workload=workload.name,
            dst_identity=str(workload.identity), dst_service="", path="rejected",
            bytes_sent=0, bytes_received=0, duration_ms=0.0, response_flags=exc.flags,
            policy="", reason=exc.message + note,
        ))


def failure_flags(exc: BaseException) -> str:
    """Istio response_flags for a failure: the error's own, else CONNECT."""
    flags = getattr(exc, "flags", None)
    return flags if isinstance(flags, str) else "CONNECT"


def peer_text(sock: socket.socket) -> str:
    """``ip:port`` of the peer, or "" once it is gone (a client may reset right after SYN)."""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return f"{peer[0]}:{peer[1]}"
