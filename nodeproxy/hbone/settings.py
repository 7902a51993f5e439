"""HTTP/2 and pool settings of the HBONE tunnel, copied from ztunnel (DESIGN §4)."""

from __future__ import annotations

from typing import Final

MIB: Final = 1024 * 1024

#: Per-stream receive window we advertise (SETTINGS_INITIAL_WINDOW_SIZE).
STREAM_WINDOW: Final = 4 * MIB
#: Connection-level receive window (raised from 65535 by a WINDOW_UPDATE on stream 0).
CONNECTION_WINDOW: Final = 16 * MIB
#: SETTINGS_MAX_FRAME_SIZE we accept.
MAX_FRAME_SIZE: Final = 1 * MIB
#: SETTINGS_MAX_CONCURRENT_STREAMS a server advertises.
SERVER_MAX_CONCURRENT_STREAMS: Final = 200
#: What a client advertises (it never accepts streams; push is off).
CLIENT_MAX_CONCURRENT_STREAMS: Final = 0
ENABLE_PUSH: Final = 0
#: Largest header block we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
MAX_HEADER_LIST_SIZE: Final = 64 * 1024

#: Send a PING after this long without receiving anything.
KEEPALIVE_INTERVAL: Final = 10.0
#: Connection error if the PING is not acknowledged within this long.
KEEPALIVE_TIMEOUT: Final = 20.0
#: How often the glue calls ``HboneConnection.tick``.
TICK_INTERVAL: Final = 1.0

#: Pool: open another connection before one would exceed this many streams.
POOL_MAX_STREAMS_PER_CONNECTION: Final = 100
#: Pool: close connections idle for this long.
POOL_IDLE_TIMEOUT: Final = 300.0

#: Read size for plain TCP and TLS sides of a relay: 256 KiB reads took C proxies from
#: ~4 to ~6.5 Gbit/s on this machine kind (issue 3).
RELAY_READ_SIZE: Final = 256 * 1024
#: A spliced stream stops its source once this much waits for window or transport.
SPLICE_PENDING_HIGH_WATER: Final = 4 * RELAY_READ_SIZE

HBONE_PORT: Final = 15008
