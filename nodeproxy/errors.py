"""Error family of the nodeproxy package.

``ProxyError`` carries the HBONE status to answer and the metrics ``response_flags``;
messages say what the operator should check.  OS errors are translated once, at the
socket boundary, with :func:`from_os_error`.
"""

from __future__ import annotations

import errno

from ztunnel_cfg.errors import NodeproxyError


class IdentityError(NodeproxyError):
    """Certificates, keys, the CA, SPIFFE identities on the wire."""


class ProxyError(NodeproxyError):
    """A connection could not be proxied.  ``status`` is the HBONE status, ``flags`` the
    Istio ``response_flags`` value recorded in metrics and access logs."""

    def __init__(
        self, message: str, *, status: int = 503, flags: str = "CONNECT", hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.flags = flags


class RejectedError(ProxyError):
    """Refused by a limit or a safety rule (not by policy, not by a failure). ``reason`` is the
    ``nodeproxy_connections_rejected_total`` label, e.g. ``own_port`` or ``dial_limit``."""

    def __init__(self, message: str, *, reason: str, status: int, flags: str,
                 hint: str | None = None) -> None:
        super().__init__(message, status=status, flags=flags, hint=hint)
        self.reason = reason


def from_os_error(exc: OSError, what: str, target: str) -> ProxyError:
    """Translate an OSError from connecting/binding into a ProxyError with a useful hint."""
    code = exc.errno
    if isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
        hint = f"is {target} reachable, and is the port open between nodes?"
        reason = "timed out"
    elif code == errno.ECONNREFUSED:
        hint = f"is anything listening on {target}?"
        reason = "was refused"
    elif code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        hint = "check routes between the nodes"
        reason = "has no route"
    elif code == errno.EADDRINUSE:
        hint = "is another agent or process bound to it?"
        reason = "address already in use"
    elif code in (errno.EPERM, errno.EACCES):
        hint = "the agent needs root or CAP_NET_ADMIN/CAP_NET_RAW"
        reason = "not permitted"
    else:
        hint = None
        reason = exc.strerror or str(exc)
    return ProxyError(f"{what} {target} {reason}", status=503, flags="CONNECT", hint=hint)
