"""ops.install / verify / remove with an in-memory backend and routing: convergence, drift in
words, and rollback when a failure is injected at each step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from redirect import ops
from redirect.errors import RedirectError
from redirect.plan import plan_iptables
from redirect.routing import RoutingState, routing_plan
from redirect.ruleset import Rule
from redirect.spec import RedirectSpec

SPEC = RedirectSpec()
OTHER = RedirectSpec(exclude_uids=(1000,), route_table=140)


class Faults:
    """Fail the n-th call (1-based) of a named operation."""

    def __init__(self, op: str | None = None, nth: int = 1) -> None:
        self.op, self.nth, self.seen = op, nth, 0

    def hit(self, op: str) -> None:
        if op == self.op:
            self.seen += 1
            if self.seen == self.nth:
                raise RedirectError(f"injected failure in {op}")


class MemBackend:
    name = "mem"

    def __init__(self, faults: Faults) -> None:
        self.rules: tuple[Rule, ...] = ()
        self.faults = faults
        self.tamper_after_restore = False

    def preflight(self, netns: str) -> None:
        self.faults.hit("preflight")

    def desired(self, spec: RedirectSpec) -> tuple[Rule, ...]:
        return plan_iptables(spec).rules

    def capture(self, netns: str) -> tuple[Rule, ...]:
        self.faults.hit("capture")
        return self.rules

    def restore(self, netns: str, rules: Sequence[Rule]) -> None:
        self.faults.hit("restore")
        self.rules = tuple(rules)
        if self.tamper_after_restore and rules:
            self.rules = self.rules[:-1]

    def present(self, netns: str) -> bool:
        return bool(self.rules)

    def show(self, netns: str) -> str:
        return "\n".join(r.text for r in self.rules)


class MemRouting:
    def __init__(self, faults: Faults) -> None:
        self.state = RoutingState()
        self.faults = faults

    def capture(self, netns: str) -> RoutingState:
        self.faults.hit("route-capture")
        return self.state

    def restore(self, netns: str, state: RoutingState) -> None:
        self.faults.hit("route-restore")
        self.state = state


@pytest.fixture
def netns(tmp_path: Path) -> str:
    path = tmp_path / "pod-ns"
    path.touch()
    return str(path)


def _pair(op: str | None = None, nth: int = 1) -> tuple[MemBackend, MemRouting]:
    faults = Faults(op, nth)
    return MemBackend(faults), MemRouting(faults)


def test_install_converges(netns: str) -> None:
    backend, routing = _pair()
    first = ops.install(netns, SPEC, backend, routing=routing)
    state = (backend.rules, routing.state)
    second = ops.install(netns, SPEC, backend, routing=routing)
    assert first.changed
    assert not second.changed
    assert (backend.rules, routing.state) == state
    assert routing.state == routing_plan(SPEC)
    assert first.rules == 17
    assert ops.verify(netns, SPEC, backend, routing=routing).ok


def test_install_with_new_spec_replaces(netns: str) -> None:
    backend, routing = _pair()
    ops.install(netns, SPEC, backend, routing=routing)
    report = ops.install(netns, OTHER, backend, routing=routing)
    assert report.changed
    assert backend.rules == plan_iptables(OTHER).rules
    assert routing.state == routing_plan(OTHER)


# Every step of install that can fail, as (operation, n-th call).  Steps: preflight, capture
# before (rules, routing), routing restore, rules restore, capture after (rules, routing).
STEPS = [
    ("preflight", 1),
    ("capture", 1),
    ("route-capture", 1),
    ("route-restore", 1),
    ("restore", 1),
    ("capture", 2),
    ("route-capture", 2),
]


@pytest.mark.parametrize(("op", "nth"), STEPS, ids=[f"{o}#{n}" for o, n in STEPS])
@pytest.mark.parametrize("previous", [None, OTHER], ids=["fresh", "reinstall"])
def test_failure_at_each_step_leaves_previous_state(
    netns: str, op: str, nth: int, previous: RedirectSpec | None
) -> None:
    backend, routing = _pair()
    if previous is not None:
        ops.install(netns, previous, backend, routing=routing)
    before = (backend.rules, routing.state)
    backend.faults.op, backend.faults.nth = op, nth
    with pytest.raises(RedirectError, match="injected failure"):
        ops.install(netns, SPEC, backend, routing=routing)
    assert (backend.rules, routing.state) == before


def test_drift_after_install_rolls_back(netns: str) -> None:
    backend, routing = _pair()
    backend.tamper_after_restore = True
    with pytest.raises(RedirectError, match="differ from the plan") as info:
        ops.install(netns, SPEC, backend, routing=routing)
    assert "missing:" in str(info.value)
    assert backend.rules == ()
    assert routing.state == RoutingState()


def test_failing_rollback_is_reported(netns: str) -> None:
    backend, routing = _pair("restore", 1)
    # The rules step fails, then undoing routing fails too: say so, and how to recover.
    routing.faults = Faults("route-restore", 2)
    with pytest.raises(RedirectError) as info:
        ops.install(netns, SPEC, backend, routing=routing)
    message = str(info.value)
    assert "rolling back also failed" in message
    assert f"nodeproxy redirect remove --netns {netns}" in message


def test_verify_reports_drift_in_words(netns: str) -> None:
    backend, routing = _pair()
    ops.install(netns, SPEC, backend, routing=routing)
    backend.rules = (*backend.rules[:-1], Rule("ip", "nat", "OUTPUT", "-A OUTPUT -j ACCEPT"))
    routing.state = RoutingState(frozenset(), routing.state.routes)
    drift = ops.verify(netns, SPEC, backend, routing=routing)
    assert not drift.ok
    text = str(drift)
    assert "missing: ip nat NODEPROXY_OUTPUT: -A NODEPROXY_OUTPUT -p tcp" in text
    assert "unexpected: ip nat OUTPUT: -A OUTPUT -j ACCEPT" in text
    assert "missing: ip -4 rule pref 32764 fwmark 0x111/0xfff lookup 133" in text


def test_remove_clears_rules_and_routing(netns: str) -> None:
    backend, routing = _pair()
    ops.install(netns, SPEC, backend, routing=routing)
    report = ops.remove(netns, backend, routing=routing)
    assert backend.rules == ()
    assert routing.state == RoutingState()
    assert "17 mem rules" in str(report)
    assert ops.remove(netns, backend, routing=routing).removed == ()


def test_remove_failing_routing_restores_rules(netns: str) -> None:
    backend, routing = _pair()
    ops.install(netns, SPEC, backend, routing=routing)
    installed = backend.rules
    backend.faults.op, backend.faults.nth, backend.faults.seen = "route-restore", 1, 0
    with pytest.raises(RedirectError):
        ops.remove(netns, backend, routing=routing)
    assert backend.rules == installed


def test_missing_namespace_is_a_clear_error(tmp_path: Path) -> None:
    backend, routing = _pair()
    with pytest.raises(RedirectError, match="does not exist"):
        ops.install(str(tmp_path / "gone"), SPEC, backend, routing=routing)


def test_unknown_backend_name() -> None:
    with pytest.raises(RedirectError, match="unknown redirect backend"):
        ops.make_backend("ebpf")
