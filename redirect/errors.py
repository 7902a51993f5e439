"""Error family of the redirect package.

Every message names the network namespace, the command or netlink operation that failed and
its stderr, and ``hint`` says what to check.
"""

from __future__ import annotations

from ztunnel_cfg.errors import NodeproxyError


class RedirectError(NodeproxyError):
    """Installing, verifying or removing traffic capture in a namespace failed."""

    def __init__(self, message: str, *, netns: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.netns = netns
