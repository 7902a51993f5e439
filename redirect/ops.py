"""install / verify / remove / show on a network namespace given by path.

install converges: it captures what is ours now, sets policy routing, then replaces our rules
in one atomic transaction, then re-reads both and checks them against the plan.  Any failure
restores what was captured, so a pod never keeps half a rule set.  Routing goes first: a
fwmark rule without capture rules is inert, capture rules without routing would drop the
replies of source-preserving connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from redirect.backend import Backend
from redirect.errors import RedirectError
from redirect.iptables import IptablesBackend
from redirect.nftables import NftablesBackend
from redirect.routing import Pyroute2Routing, Routing, RoutingState, routing_plan
from redirect.ruleset import Rule, diff_rules
from redirect.runner import Runner, subprocess_runner
from redirect.spec import RedirectSpec

BACKENDS = ("iptables", "iptables-nft", "iptables-legacy", "nftables")


@dataclass(frozen=True, slots=True)
class InstallReport:
    netns: str
    backend: str
    changed: bool  # False when everything was already exactly in place
    rules: int
    routing: tuple[str, ...]

    def __str__(self) -> str:
        state = "installed" if self.changed else "already in place"
        return (
            f"{self.netns}: {self.backend} capture {state} "
            f"({self.rules} rules, {len(self.routing)} routing entries)"
        )


@dataclass(frozen=True, slots=True)
class Drift:
    netns: str
    backend: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.netns}: {self.backend} capture matches the plan"
        lines = [f"{self.netns}: {len(self.problems)} difference(s) from the plan:"]
        return "\n".join([*lines, *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True, slots=True)
class RemoveReport:
    netns: str
    removed: tuple[str, ...]  # what was ours and is gone, in words

    def __str__(self) -> str:
        if not self.removed:
            return f"{self.netns}: nothing of nodeproxy's was installed"
        return f"{self.netns}: removed " + ", ".join(self.removed)


def make_backend(name: str, runner: Runner = subprocess_runner) -> Backend:
    if name == "nftables":
        return NftablesBackend(runner)
    if name == "iptables":
        return IptablesBackend("auto", runner)
    if name in ("iptables-nft", "iptables-legacy"):
        return IptablesBackend(name.split("-", 1)[1], runner)
    raise RedirectError(f"unknown redirect backend {name!r}", hint=f"use one of {BACKENDS}")


def _check_netns(netns: str) -> None:
    if not os.path.exists(netns):
        raise RedirectError(
            f"network namespace {netns} does not exist",
            netns=netns,
            hint="pass an existing namespace path (/var/run/netns/NAME or /proc/PID/ns/net)",
        )


def _resolve(
    backend: Backend | str, routing: Routing | None, runner: Runner | None
) -> tuple[Backend, Routing]:
    run = runner or subprocess_runner
    return (
        make_backend(backend, run) if isinstance(backend, str) else backend,
        routing or Pyroute2Routing(),
    )


def _undo(netns: str, error: Exception, steps: list[tuple[str, Callable[[], None]]]) -> Exception:
    """Run rollback steps (newest first); return the error to raise."""
    failed: list[str] = []
    for what, step in reversed(steps):
        try:
            step()
        except Exception as exc:
            failed.append(f"{what}: {exc}")
    if not failed:
        return error
    return RedirectError(
        f"{error}; rolling back also failed ({'; '.join(failed)})",
        netns=netns,
        hint=f"the namespace may hold part of the rules: run "
        f"'nodeproxy redirect remove --netns {netns}' and check 'nodeproxy redirect show'",
    )


def install(
    netns_path: str,
    spec: RedirectSpec,
    backend: Backend | str,
    *,
    routing: Routing | None = None,
    runner: Runner | None = None,
) -> InstallReport:
    _check_netns(netns_path)
    rules_be, route_be = _resolve(backend, routing, runner)
    rules_be.preflight(netns_path)
    rules_before = rules_be.capture(netns_path)
    routes_before = route_be.capture(netns_path)
    want_rules = rules_be.desired(spec)
    want_routes = routing_plan(spec)

    undo: list[tuple[str, Callable[[], None]]] = []
    try:
        route_be.restore(netns_path, want_routes)
        undo.append(("policy routing", lambda: route_be.restore(netns_path, routes_before)))
        rules_be.restore(netns_path, want_rules)
        undo.append(("rules", lambda: rules_be.restore(netns_path, rules_before)))
        problems = _drift(rules_be, route_be, netns_path, want_rules, want_routes)
        if problems:
            raise RedirectError(
                f"after install in netns {netns_path} the {rules_be.name} rules differ from the "
                "plan: " + "; ".join(problems),
                netns=netns_path,
                hint="something rewrote the rules concurrently, or the kernel/iptables version "
                "prints them differently; nothing was kept",
            )
    except Exception as exc:
        raise _undo(netns_path, exc, undo) from exc
    changed = bool(diff_rules(want_rules, rules_before).words()) or routes_before != want_routes
    return InstallReport(
        netns_path,
        rules_be.name,
        changed,
        sum(1 for r in want_rules if _is_rule(r)),
        want_routes.describe(),
    )


def _is_rule(rule: Rule) -> bool:
    return rule.text.startswith("-A ") or not (rule.text.startswith(("-N ", "chain ", "type ")))


def _drift(
    rules_be: Backend,
    route_be: Routing,
    netns: str,
    want_rules: tuple[Rule, ...],
    want_routes: RoutingState,
) -> tuple[str, ...]:
    rules = diff_rules(want_rules, rules_be.capture(netns)).words()
    return (*rules, *want_routes.diff(route_be.capture(netns)))


def verify(
    netns_path: str,
    spec: RedirectSpec,
    backend: Backend | str,
    *,
    routing: Routing | None = None,
    runner: Runner | None = None,
) -> Drift:
    _check_netns(netns_path)
    rules_be, route_be = _resolve(backend, routing, runner)
    problems = list(
        _drift(rules_be, route_be, netns_path, rules_be.desired(spec), routing_plan(spec))
    )
    for other in _other_backends(rules_be, runner):
        if other.present(netns_path):
            problems.append(f"unexpected: rules of the {other.name} backend are installed too")
    return Drift(netns_path, rules_be.name, tuple(problems))


def _other_backends(backend: Backend, runner: Runner | None) -> list[Backend]:
    run = runner or subprocess_runner
    if isinstance(backend, NftablesBackend):
        return [IptablesBackend("auto", run)]
    if isinstance(backend, IptablesBackend):
        return [NftablesBackend(run)]
    return []


def remove(
    netns_path: str,
    backend: Backend | str | None = None,
    *,
    routing: Routing | None = None,
    runner: Runner | None = None,
) -> RemoveReport:
    """Remove only what is ours; with ``backend=None`` whatever either backend installed."""
    _check_netns(netns_path)
    run = runner or subprocess_runner
    route_be = routing or Pyroute2Routing()
    if backend is None:
        backends: list[Backend] = [IptablesBackend("auto", run), NftablesBackend(run)]
    else:
        backends = [_resolve(backend, route_be, run)[0]]
    removed: list[str] = []
    undo: list[tuple[str, Callable[[], None]]] = []
    try:
        # Rules first: once they are gone nothing carries the connmark the routing serves.
        for be in backends:
            before = be.capture(netns_path)
            if before:
                be.restore(netns_path, ())
                undo.append((be.name, partial(be.restore, netns_path, before)))
                removed.append(f"{sum(1 for r in before if _is_rule(r))} {be.name} rules")
        routes = route_be.capture(netns_path)
        if routes:
            route_be.restore(netns_path, RoutingState())
            removed.extend(routes.describe())
    except Exception as exc:
        raise _undo(netns_path, exc, undo) from exc
    return RemoveReport(netns_path, tuple(removed))


def show(netns_path: str, *, routing: Routing | None = None, runner: Runner | None = None) -> str:
    """Everything of ours in the namespace, for people."""
    _check_netns(netns_path)
    run = runner or subprocess_runner
    route_be = routing or Pyroute2Routing()
    sections: list[str] = []
    for be in (IptablesBackend("auto", run), NftablesBackend(run)):
        text = be.show(netns_path)
        if text:
            sections.append(f"== {be.name} ==\n{text}")
    routes = route_be.capture(netns_path)
    if routes:
        sections.append("== policy routing ==\n" + "\n".join(routes.describe()))
    if not sections:
        return f"{netns_path}: no nodeproxy rules installed"
    return "\n\n".join(sections)
