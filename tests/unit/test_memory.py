"""Giving memory back after load: the policy (pure) and the releaser with an injected trim."""

from __future__ import annotations

import pytest

from nodeproxy.memory import MemoryReleaser, TrimPolicy, glibc_trim


@pytest.mark.parametrize(("observations", "trims"), [
    ([0, 500, 2000, 1500], [False, False, False, False]),  # a drop of 500: keep the heap
    ([0, 2000, 900], [False, False, True]),  # fell by 1,100 to under half the peak
    ([0, 3000, 1800], [False, False, False]),  # fell by 1,200 but still above half
    ([3000, 0, 0, 2000, 0], [False, True, False, False, True]),  # a new peak after a trim
])
def test_trim_policy(observations: list[int], trims: list[bool]) -> None:
    policy = TrimPolicy(min_drop=1000)
    assert [policy.observe(n) for n in observations] == trims


def test_releaser_trims_once_per_drop() -> None:
    calls: list[int] = []
    open_now = [5000]

    def trim() -> bool:
        calls.append(open_now[0])
        return True

    collected: list[bool] = []

    def collect() -> int:
        collected.append(True)
        return 0

    releaser = MemoryReleaser(lambda: open_now[0], trim, collect=collect)
    assert not releaser.tick()
    open_now[0] = 10
    assert releaser.tick()
    assert not releaser.tick()  # no new drop, no new trim
    assert calls == [10]
    assert collected == [True]  # cycles first, so their memory can be trimmed too
    assert releaser.trims == 1


def test_without_malloc_trim_nothing_happens() -> None:
    releaser = MemoryReleaser(lambda: 0, None, TrimPolicy(min_drop=1, peak=10))
    assert not releaser.tick()


def test_glibc_trim_is_found_here() -> None:
    trim = glibc_trim()  # Debian: glibc
    assert trim is not None
    assert isinstance(trim(), bool)
