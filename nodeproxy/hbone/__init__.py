"""HBONE: HTTP/2 CONNECT over mutual TLS (sans-I/O protocol + asyncio glue)."""

from nodeproxy.hbone.glue import (
    HboneClientConnection,
    HboneProtocol,
    HboneServer,
    HboneStream,
    StreamResetError,
    open_connection,
    start_server,
    status_error,
)
from nodeproxy.hbone.protocol import (
    HboneConnection,
    HboneProtocolError,
    StreamLimitError,
    parse_authority,
)

__all__ = [
    "HboneClientConnection",
    "HboneConnection",
    "HboneProtocol",
    "HboneProtocolError",
    "HboneServer",
    "HboneStream",
    "StreamLimitError",
    "StreamResetError",
    "open_connection",
    "parse_authority",
    "start_server",
    "status_error",
]
