"""Resource limits of the data path: what one client (or one pod) may hold of the agent.

Every limit has a safe default and a ``nodeproxy run`` flag (docs/agent.md "Limits"). A
connection refused by a limit is reset (plain TCP) or answered 503 / GOAWAY (HBONE), counted in
``nodeproxy_connections_rejected_total{direction,reason}`` and written to the access log with
its response flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodeproxy.hbone.flood import FloodLimits

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    #: Connections one pod may have open through the agent (its three listeners together);
    #: beyond it new connections are reset. Bounds file descriptors per pod.
    max_connections_per_pod: int = 4096
    #: Inbound HBONE TLS handshakes in progress per pod; a handshake costs ~40 KB of OpenSSL
    #: state before the peer has proved anything.
    max_pending_handshakes: int = 128
    #: Seconds a peer has to complete the TLS handshake on 15008.
    handshake_timeout: float = 10.0
    #: CONNECT streams of one HBONE connection that may be dialling the local pod at once;
    #: further streams wait (at most SETTINGS_MAX_CONCURRENT_STREAMS of them).
    max_dials_per_connection: int = 64
    #: HTTP/2 flood limits per HBONE connection (rapid reset, control frames).
    flood: FloodLimits = field(default_factory=FloodLimits)
    #: Bytes of our answers a peer may leave unread before we stop reading it.
    max_peer_backlog: int = 1 * MIB

    def __post_init__(self) -> None:
        for name in ("max_connections_per_pod", "max_pending_handshakes",
                     "max_dials_per_connection", "max_peer_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1, not {getattr(self, name)}")
        if self.handshake_timeout <= 0:
            raise ValueError(f"handshake timeout must be positive, not {self.handshake_timeout}")
