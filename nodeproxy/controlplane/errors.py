"""Errors of the control plane (one family, under the project's root)."""

from __future__ import annotations

from ztunnel_cfg.errors import NodeproxyError


class StoreError(NodeproxyError):
    """The config store (etcd) could not be reached or refused an operation."""


class StoreConflictError(StoreError):
    """A compare-and-swap lost: someone changed the store between our read and our write."""

    exit_code = 3
