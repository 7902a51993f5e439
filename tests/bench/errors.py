"""The benchmark's one error family (re-exported by harness.py)."""

from __future__ import annotations


class BenchError(Exception):
    """A case could not be set up or measured; the message says what to check."""
