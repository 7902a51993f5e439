"""The agent's certificate manager: one X.509-SVID per local workload identity, in memory.

- ``get(identity)`` returns a valid SVID; concurrent callers share one in-flight issuance.
- Each certificate is renewed in the background at half of its lifetime.
- Failures back off per identity: 1 s, 2 s, 4 s ... capped at 150 s, with jitter (x0.5-1.0).
  During a back-off ``get`` fails fast with the last error instead of hammering the CA; a
  still-valid certificate keeps being served while its renewal is retried.
- ``on_rotate`` callbacks run for every newly installed certificate (first one included).
- Keys are generated here and never leave memory (CSR flow).

Time is wall-clock seconds (``clock``, default ``time.time``) because it is compared with the
certificates' validity; ``sleep`` and ``rng`` are injected so tests never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import new_key_and_csr
from nodeproxy.identity.ca_client import CaClient
from nodeproxy.identity.svid import Svid, TrustBundle
from ztunnel_cfg.spiffe import SpiffeId

log = logging.getLogger("nodeproxy.identity")

INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 150.0
# Floor between renewals so a certificate issued with a very short life cannot spin the loop.
MIN_REFRESH = 1.0

RotateCallback = Callable[[SpiffeId, Svid], None]


def backoff_delay(failures: int, rng: Callable[[], float]) -> float:
    """Delay before retry number ``failures`` (>= 1): exponential, jittered, <= 150 s."""
    base = min(MAX_BACKOFF, INITIAL_BACKOFF * 2.0 ** min(failures - 1, 16))
    return float(base * (0.5 + 0.5 * rng()))


def refresh_at(svid: Svid) -> float:
    """Epoch seconds of the half-life of ``svid``."""
    start, end = svid.not_before.timestamp(), svid.not_after.timestamp()
    return start + (end - start) / 2


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One row of the admin listing (never any key material)."""

    identity: str
    state: str  # initializing | available | renewal-failed | expired | unavailable
    serial: str | None
    not_before: datetime | None
    not_after: datetime | None
    failures: int
    last_error: str | None


class _Slot:
    __slots__ = ("failures", "inflight", "last_error", "retry_at", "svid", "task")

    def __init__(self) -> None:
        self.svid: Svid | None = None
        self.inflight: asyncio.Future[Svid] | None = None
        self.task: asyncio.Task[None] | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None


class CertificateManager:
    def __init__(
        self,
        client: CaClient,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._slots: dict[SpiffeId, _Slot] = {}
        self._callbacks: list[RotateCallback] = []
        self._failure_callbacks: list[Callable[[SpiffeId, str], None]] = []
        self._bundle: TrustBundle | None = None
        self._closed = False

    # ---- public API ----------------------------------------------------------------------

    @property
    def bundle(self) -> TrustBundle | None:
        return self._bundle

    def on_rotate(self, callback: RotateCallback) -> None:
        self._callbacks.append(callback)

    def on_failure(self, callback: Callable[[SpiffeId, str], None]) -> None:
        """Called with (identity, error) after every failed issuance (e.g. to count it)."""
        self._failure_callbacks.append(callback)

    def current(self, identity: SpiffeId) -> Svid | None:
        """The installed certificate if it is still valid, without waiting."""
        slot = self._slots.get(identity)
        if slot is None or slot.svid is None or not self._valid(slot.svid):
            return None
        return slot.svid

    async def get(self, identity: SpiffeId) -> Svid:
        if self._closed:
            raise IdentityError("certificate manager is closed")
        slot = self._slots.setdefault(identity, _Slot())
        if slot.svid is not None and self._valid(slot.svid):
            return slot.svid
        if slot.inflight is None:
            now = self._clock()
            if slot.failures and now < slot.retry_at:
                raise IdentityError(
                    f"no certificate for {identity}: {slot.last_error}",
                    hint=f"the CA is retried in {slot.retry_at - now:.0f} s",
                )
            self._start(identity, slot)
        assert slot.inflight is not None
        return await asyncio.shield(slot.inflight)

    def forget(self, identity: SpiffeId) -> None:
        """Drop the identity (workload gone): stop renewing, discard the key."""
        slot = self._slots.pop(identity, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    async def aclose(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        tasks += [s.inflight for s in self._slots.values() if isinstance(s.inflight, asyncio.Task)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._slots.clear()

    def snapshot(self) -> list[CertInfo]:
        now = self._clock()
        rows = []
        for identity, slot in sorted(self._slots.items()):
            svid = slot.svid
            if svid is None:
                state = "unavailable" if slot.failures else "initializing"
            elif svid.not_after.timestamp() <= now:
                state = "expired"
            elif slot.failures:
                state = "renewal-failed"
            else:
                state = "available"
            rows.append(
                CertInfo(
                    identity=identity.uri,
                    state=state,
                    serial=svid.serial_hex if svid else None,
                    not_before=svid.not_before if svid else None,
                    not_after=svid.not_after if svid else None,
                    failures=slot.failures,
                    last_error=slot.last_error,
                )
            )
        return rows

    # ---- internals -----------------------------------------------------------------------

    def _valid(self, svid: Svid) -> bool:
        return self._clock() < svid.not_after.timestamp()

    def _start(self, identity: SpiffeId, slot: _Slot) -> asyncio.Future[Svid]:
        slot.inflight = asyncio.ensure_future(self._issue(identity, slot))
        # Retrieve the exception so an unawaited failed refresh never logs "never retrieved".
        slot.inflight.add_done_callback(_consume)
        return slot.inflight

    async def _issue(self, identity: SpiffeId, slot: _Slot) -> Svid:
        try:
            key, csr = new_key_and_csr(identity)
            chain_pem, bundle_pem = await self._client.sign(identity, csr)
            svid = Svid.from_chain(identity, chain_pem, key)
            bundle = TrustBundle.from_pem(bundle_pem)
        except Exception as exc:
            slot.failures += 1
            delay = backoff_delay(slot.failures, self._rng)
            slot.retry_at = self._clock() + delay
            slot.last_error = str(exc)
            log.warning(
                "certificate issuance failed; retrying with back-off",
                extra={
                    "component": "identity",
                    "identity": identity.uri,
                    "failures": slot.failures,
                    "retry_in": round(delay, 1),
                    "error": str(exc),
                },
            )
            for failed in list(self._failure_callbacks):
                failed(identity, str(exc))
            if not isinstance(exc, IdentityError):
                raise IdentityError(f"issuing a certificate for {identity} failed: {exc}") from exc
            raise
        finally:
            slot.inflight = None
            if self._slots.get(identity) is slot and slot.task is None and not self._closed:
                slot.task = asyncio.ensure_future(self._refresh_loop(identity, slot))
        if self._slots.get(identity) is not slot:  # forgotten meanwhile: discard
            return svid
        slot.svid, slot.failures, slot.last_error = svid, 0, None
        self._bundle = bundle
        log.info(
            "certificate installed",
            extra={
                "component": "identity",
                "identity": identity.uri,
                "serial": svid.serial_hex,
                "not_after": svid.not_after.isoformat(),
            },
        )
        for callback in list(self._callbacks):
            try:
                callback(identity, svid)
            except Exception:
                log.exception("rotation callback failed", extra={"component": "identity"})
        return svid

    def _next_delay(self, slot: _Slot) -> float:
        now = self._clock()
        if slot.failures:
            return max(0.0, slot.retry_at - now)
        if slot.svid is None:
            return 0.0
        return max(MIN_REFRESH, refresh_at(slot.svid) - now)

    async def _refresh_loop(self, identity: SpiffeId, slot: _Slot) -> None:
        while self._slots.get(identity) is slot and not self._closed:
            await self._sleep(self._next_delay(slot))
            if self._slots.get(identity) is not slot:
                return
            fut = slot.inflight or self._start(identity, slot)
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)


def _consume(fut: asyncio.Future[Svid]) -> None:
    if not fut.cancelled():
        fut.exception()
