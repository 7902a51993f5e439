"""CertificateManager with a fake clock and sleep: no real waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nodeproxy.errors import IdentityError
from nodeproxy.identity.ca import CertificateAuthority
from nodeproxy.identity.ca_client import LocalCaClient
from nodeproxy.identity.manager import (
    MAX_BACKOFF,
    CertificateManager,
    backoff_delay,
)
from nodeproxy.identity.svid import Svid
from ztunnel_cfg.spiffe import SpiffeId

A = SpiffeId.of("default", "a")
B = SpiffeId.of("default", "b")
START = 1_700_000_000.0
HALF_LIFE = 12 * 3600 - 30  # 24 h lifetime, not_before backdated by 60 s


class FakeTime:
    def __init__(self) -> None:
        self.now = START
        self.waiters: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((delay, fut))
        await fut

    async def next_sleep(self) -> float:
        for _ in range(200):
            self.waiters = [(d, f) for d, f in self.waiters if not f.done()]
            if self.waiters:
                return self.waiters[0][0]
            await asyncio.sleep(0)
        raise AssertionError("nobody is sleeping")

    async def advance(self) -> float:
        delay = await self.next_sleep()
        _, fut = self.waiters.pop(0)
        self.now += delay
        fut.set_result(None)
        for _ in range(20):  # let the woken task run its issuance
            await asyncio.sleep(0)
        return delay


class FlakyClient:
    """Wraps a real LocalCaClient; fails while ``failing`` is set; counts calls."""

    def __init__(self, inner: LocalCaClient) -> None:
        self.inner = inner
        self.failing = False
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def sign(self, identity: SpiffeId, csr_pem: bytes) -> tuple[bytes, bytes]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise IdentityError("CA unreachable (test)")
        return await self.inner.sign(identity, csr_pem)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(tmp_path: Path, fake: FakeTime) -> FlakyClient:
    ca = CertificateAuthority.init(tmp_path / "ca", clock=fake.utc)
    return FlakyClient(LocalCaClient(ca, "node1"))


@pytest.fixture
async def manager(client: FlakyClient, fake: FakeTime) -> AsyncIterator[CertificateManager]:
    mgr = CertificateManager(client, clock=fake.clock, sleep=fake.sleep, rng=lambda: 1.0)
    yield mgr
    await mgr.aclose()


async def test_concurrent_callers_share_one_issuance(
    manager: CertificateManager, client: FlakyClient
) -> None:
    client.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(manager.get(A)) for _ in range(10)]
    await asyncio.sleep(0)
    client.gate.set()
    svids = await asyncio.gather(*tasks)
    assert client.calls == 1
    assert len({s.serial for s in svids}) == 1
    assert svids[0].identity == A
    assert await manager.get(A) is svids[0]
    assert client.calls == 1
    assert manager.bundle is not None
    assert len(manager.bundle) == 1
    assert manager.current(A) is svids[0]
    assert manager.current(B) is None


async def test_refresh_at_half_life_and_rotation_callback(
    manager: CertificateManager, client: FlakyClient, fake: FakeTime
) -> None:
    rotated: list[tuple[SpiffeId, Svid]] = []
    manager.on_rotate(lambda ident, svid: rotated.append((ident, svid)))
    first = await manager.get(A)
    assert await fake.next_sleep() == pytest.approx(HALF_LIFE)
    await fake.advance()
    second = manager.current(A)
    assert second is not None
    assert second.serial != first.serial
    assert second.not_before > first.not_before
    assert [s.serial for _, s in rotated] == [first.serial, second.serial]
    assert client.calls == 2
    assert await fake.next_sleep() == pytest.approx(HALF_LIFE)  # the next renewal is planned


async def test_renewal_failures_back_off_exponentially_capped(
    manager: CertificateManager, client: FlakyClient, fake: FakeTime
) -> None:
    first = await manager.get(A)
    client.failing = True
    await fake.advance()  # half-life: first renewal attempt fails
    delays = [await fake.advance() for _ in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    assert manager.current(A) is first  # still valid, still served
    row = manager.snapshot()[0]
    assert row.state == "renewal-failed"
    assert row.failures == 11
    assert "CA unreachable" in (row.last_error or "")
    client.failing = False
    await fake.advance()
    renewed = manager.current(A)
    assert renewed is not None
    assert renewed.serial != first.serial
    assert manager.snapshot()[0].state == "available"
    assert await fake.next_sleep() == pytest.approx(HALF_LIFE)


def test_backoff_jitter_stays_within_bounds() -> None:
    for failures in range(1, 30):
        low = backoff_delay(failures, lambda: 0.0)
        high = backoff_delay(failures, lambda: 0.999999)
        assert 0 < low <= high <= MAX_BACKOFF
        assert low == pytest.approx(high / 2, rel=1e-3)
    assert backoff_delay(40, lambda: 0.999999) < MAX_BACKOFF + 1e-9


async def test_initial_failure_fails_fast_then_recovers(
    manager: CertificateManager, client: FlakyClient, fake: FakeTime
) -> None:
    client.failing = True
    with pytest.raises(IdentityError, match="CA unreachable"):
        await manager.get(A)
    assert client.calls == 1
    with pytest.raises(IdentityError, match="retried in"):
        await manager.get(A)  # inside the back-off window: no new CA call
    assert client.calls == 1
    assert manager.snapshot()[0].state == "unavailable"
    client.failing = False
    assert await fake.advance() == 1  # the background retry
    svid = manager.current(A)
    assert svid is not None
    assert await manager.get(A) is svid
    assert client.calls == 2


async def test_expired_certificate_is_not_served(
    manager: CertificateManager, client: FlakyClient, fake: FakeTime
) -> None:
    first = await manager.get(A)
    client.failing = True
    while fake.now < first.not_after.timestamp():
        await fake.advance()
    assert manager.current(A) is None
    assert manager.snapshot()[0].state == "expired"
    with pytest.raises(IdentityError):
        await manager.get(A)


async def test_forget_stops_renewal(
    manager: CertificateManager, client: FlakyClient, fake: FakeTime
) -> None:
    await manager.get(A)
    await manager.get(B)
    assert await fake.next_sleep() > 0
    manager.forget(A)
    await asyncio.sleep(0)
    assert manager.current(A) is None
    assert [row.identity for row in manager.snapshot()] == [B.uri]
    await fake.advance()
    assert client.calls == 3  # only B renewed
    assert manager.current(B) is not None
    assert [d for d, f in fake.waiters if not f.done()] == [pytest.approx(HALF_LIFE)]


async def test_snapshot_never_contains_keys(manager: CertificateManager) -> None:
    svid = await manager.get(A)
    rows = manager.snapshot()
    assert len(rows) == 1
    doc = asdict(rows[0])
    assert doc["identity"] == A.uri
    assert doc["serial"] == svid.serial_hex
    assert doc["not_after"] == svid.not_after
    assert doc["state"] == "available"
    assert "PRIVATE" not in repr(doc)


async def test_callback_errors_do_not_break_issuance(manager: CertificateManager) -> None:
    def boom(_i: SpiffeId, _s: Svid) -> None:
        raise RuntimeError("callback bug")

    seen: list[SpiffeId] = []
    manager.on_rotate(boom)
    manager.on_rotate(lambda i, _s: seen.append(i))
    await manager.get(A)
    assert seen == [A]


async def test_closed_manager_refuses(manager: CertificateManager) -> None:
    await manager.aclose()
    with pytest.raises(IdentityError, match="closed"):
        await manager.get(A)
