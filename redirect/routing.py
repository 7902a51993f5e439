"""Policy routing for source-IP-preserving connections (DESIGN §2):
``ip rule fwmark 0x111/0xfff lookup <table>`` and ``local 0.0.0.0/0 dev lo`` in that table.

Rules and routes we add carry routing protocol :data:`RTPROT_NODEPROXY`, so ``capture`` and
``remove`` find exactly ours without being told the spec.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from redirect.errors import RedirectError
from redirect.netns import run_in_netns
from redirect.spec import RedirectSpec

T = TypeVar("T")

RTPROT_NODEPROXY = 78  # unassigned in rt_protos; shown as `proto 78` by `ip rule` / `ip route`
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTN_LOCAL = 2
_ANY = {4: "0.0.0.0/0", 6: "::/0"}


@dataclass(frozen=True, slots=True, order=True)
class PolicyRule:
    version: int
    priority: int
    fwmark: int
    fwmask: int
    table: int

    def __str__(self) -> str:
        return (
            f"ip -{self.version} rule pref {self.priority} "
            f"fwmark {self.fwmark:#x}/{self.fwmask:#x} lookup {self.table}"
        )


@dataclass(frozen=True, slots=True, order=True)
class LocalRoute:
    version: int
    table: int

    def __str__(self) -> str:
        return f"ip -{self.version} route local {_ANY[self.version]} dev lo table {self.table}"


@dataclass(frozen=True, slots=True)
class RoutingState:
    rules: frozenset[PolicyRule] = field(default_factory=frozenset)
    routes: frozenset[LocalRoute] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.rules or self.routes)

    def describe(self) -> tuple[str, ...]:
        return (*(str(r) for r in sorted(self.rules)), *(str(r) for r in sorted(self.routes)))

    def diff(self, actual: RoutingState) -> tuple[str, ...]:
        """Drift between this (expected) state and ``actual``, in words."""
        missing = sorted(self.rules - actual.rules), sorted(self.routes - actual.routes)
        extra = sorted(actual.rules - self.rules), sorted(actual.routes - self.routes)
        return (
            *(f"missing: {x}" for group in missing for x in group),
            *(f"unexpected: {x}" for group in extra for x in group),
        )


def routing_plan(spec: RedirectSpec) -> RoutingState:
    """Pure: the policy routing a spec needs."""
    return RoutingState(
        frozenset(
            PolicyRule(v, spec.rule_priority, spec.connmark, spec.mark_mask, spec.route_table)
            for v in spec.families()
        ),
        frozenset(LocalRoute(v, spec.route_table) for v in spec.families()),
    )


class Routing(Protocol):
    def capture(self, netns: str) -> RoutingState: ...

    def restore(self, netns: str, state: RoutingState) -> None:
        """Make our rules/routes in ``netns`` exactly ``state`` (all or nothing)."""


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get(name)
    return default if value is None else value


class Pyroute2Routing:
    """pyroute2 implementation.  ``netns`` is a path (``/var/run/netns/NAME``,
    ``/proc/PID/ns/net``); it is opened, never created."""

    def _call(self, netns: str, fn: Callable[[Any], T]) -> T:
        from pyroute2 import IPRoute  # imported late: the planner and unit tests never need it

        if not os.path.exists(netns):
            raise RedirectError(
                f"network namespace {netns} does not exist",
                netns=netns,
                hint="pass the path of an existing namespace (ip netns add NAME -> "
                "/var/run/netns/NAME, or /proc/PID/ns/net)",
            )

        def job() -> T:
            # IPRoute opened by a thread inside the netns (no fork: see redirect/netns.py).
            ipr = IPRoute()
            try:
                return fn(ipr)
            finally:
                ipr.close()

        return run_in_netns(netns, job)

    def capture(self, netns: str) -> RoutingState:
        return self._call(netns, _capture)

    def restore(self, netns: str, state: RoutingState) -> None:
        self._call(netns, lambda ns: _restore(ns, netns, state))


def _capture(ns: Any) -> RoutingState:
    rules: set[PolicyRule] = set()
    routes: set[LocalRoute] = set()
    for version, af in _AF.items():
        for msg in ns.get_rules(family=af):
            if _attr(msg, "FRA_PROTOCOL") != RTPROT_NODEPROXY:
                continue
            rules.add(
                PolicyRule(
                    version,
                    _attr(msg, "FRA_PRIORITY", 0),
                    _attr(msg, "FRA_FWMARK", 0),
                    _attr(msg, "FRA_FWMASK", 0xFFFFFFFF),
                    _attr(msg, "FRA_TABLE", msg["table"]),
                )
            )
        for msg in ns.route("dump", family=af):
            if msg["proto"] == RTPROT_NODEPROXY and msg["type"] == _RTN_LOCAL:
                routes.add(LocalRoute(version, _attr(msg, "RTA_TABLE", msg["table"])))
    return RoutingState(frozenset(rules), frozenset(routes))


def _restore(ns: Any, netns: str, state: RoutingState) -> None:
    before = _capture(ns)
    done: list[Callable[[], object]] = []  # undo actions, run in reverse on failure
    steps: list[tuple[str, Callable[[], object], Callable[[], object]]] = []
    for route in sorted(state.routes - before.routes):
        steps.append((f"add {route}", _route_op(ns, "add", route), _route_op(ns, "del", route)))
    for rule in sorted(state.rules - before.rules):
        steps.append((f"add {rule}", _rule_op(ns, "add", rule), _rule_op(ns, "del", rule)))
    for rule in sorted(before.rules - state.rules):
        steps.append((f"delete {rule}", _rule_op(ns, "del", rule), _rule_op(ns, "add", rule)))
    for route in sorted(before.routes - state.routes):
        steps.append((f"delete {route}", _route_op(ns, "del", route), _route_op(ns, "add", route)))
    for what, do, undo in steps:
        try:
            do()
        except Exception as exc:
            for revert in reversed(done):
                try:
                    revert()
                except Exception:  # noqa: S112 - best effort, the first error matters
                    continue
            raise _netlink_error(netns, what, exc) from exc
        done.append(undo)


def _lo_index(ns: Any) -> int:
    return int(ns.link_lookup(ifname="lo")[0])


def _route_op(ns: Any, op: str, route: LocalRoute) -> Callable[[], object]:
    def run() -> object:
        return ns.route(
            op,
            family=_AF[route.version],
            dst=_ANY[route.version],
            type="local",
            scope="host",
            oif=_lo_index(ns),
            table=route.table,
            proto=RTPROT_NODEPROXY,
        )

    return run


def _rule_op(ns: Any, op: str, rule: PolicyRule) -> Callable[[], object]:
    def run() -> object:
        return ns.rule(
            op,
            family=_AF[rule.version],
            priority=rule.priority,
            fwmark=rule.fwmark,
            fwmask=rule.fwmask,
            table=rule.table,
            protocol=RTPROT_NODEPROXY,
        )

    return run


def _netlink_error(netns: str, what: str, exc: Exception) -> RedirectError:
    code = getattr(exc, "code", None)
    reason = os.strerror(code) if isinstance(code, int) else str(exc)
    hint = "check 'ip rule' and 'ip route show table all' in the namespace"
    if code == errno.EEXIST:
        hint = (
            "an equal rule or route that nodeproxy did not install is already there; "
            "remove it or choose another route_table"
        )
    elif code == errno.ENETDOWN:
        hint = "the loopback is down: 'ip link set lo up' in the namespace (IPv6 needs it)"
    return RedirectError(
        f"netlink '{what}' failed in netns {netns}: {reason}", netns=netns, hint=hint
    )
