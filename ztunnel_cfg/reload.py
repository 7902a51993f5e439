"""Reload bookkeeping as a pure value: a bad reload keeps the last good snapshot."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ztunnel_cfg.errors import ConfigError
from ztunnel_cfg.snapshot import Snapshot

__all__ = ["ReloadState"]


@dataclass(frozen=True, slots=True)
class ReloadState:
    current: Snapshot | None = None
    last_error: ConfigError | None = None  # error of the most recent attempt; None if it worked
    ok_count: int = 0
    fail_count: int = 0
    last_attempt: float | None = None
    last_success: float | None = None

    def apply_success(self, snapshot: Snapshot, now: float) -> ReloadState:
        return replace(
            self,
            current=snapshot,
            last_error=None,
            ok_count=self.ok_count + 1,
            last_attempt=now,
            last_success=now,
        )

    def apply_failure(self, err: ConfigError, now: float) -> ReloadState:
        return replace(self, last_error=err, fail_count=self.fail_count + 1, last_attempt=now)

    @property
    def healthy(self) -> bool:
        """True when a snapshot is loaded and the last attempt succeeded."""
        return self.current is not None and self.last_error is None

    def summary(self) -> dict[str, object]:
        """A JSON-friendly view (for the admin API)."""
        return {
            "loaded": self.current is not None,
            "okCount": self.ok_count,
            "failCount": self.fail_count,
            "lastAttempt": self.last_attempt,
            "lastSuccess": self.last_success,
            "lastError": [str(i) for i in self.last_error.issues] if self.last_error else None,
        }
