"""authorize(): Istio semantics, table-driven.

Each case is (policies YAML, connection, expected allowed, expected policy, expected rule,
a fragment of the reason).  The destination is always ``default/echo-0`` (10.10.1.3, app echo),
except where the case says otherwise.
"""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel_cfg import ConnectionInfo, Snapshot, SpiffeId, authorize, load_config_text
from ztunnel_cfg.authz import _conn, _rule_ok, rule_matches
from ztunnel_cfg.model import Match, StringMatch

WORKLOADS = """\
trustDomain: cluster.local
workloads:
- name: echo-0
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.10.1.3", "fd00::3"]
  node: node1
  canonicalName: echo
  canonicalRevision: v2
  labels: {tier: backend}
- name: cart-0
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.10.2.3"]
  node: node2
  canonicalName: cart
"""


def ident(ns: str, sa: str, td: str = "cluster.local") -> SpiffeId:
    return SpiffeId.of(ns, sa, td)


T = TypeVar("T")
CLIENT = ident("default", "client")
LEGACY = ident("legacy", "app")
SHOP = ident("shop", "frontend")
KUBE = ident("kube-system", "coredns")
OTHER_TD = ident("default", "client", "other.td")


@dataclass(frozen=True)
class Case:
    name: str
    policies: str
    identity: SpiffeId | None
    allowed: bool
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    src: str = "10.10.2.9"
    dst: str = "10.10.1.3"
    port: int = 8080
    target: str = "default/echo-0"


def pol(
    name: str,
    action: str,
    rules: str,
    scope: str = "Namespace",
    ns: str = "default",
    extra: str = "",
) -> str:
    return (
        f"- {{name: {name}, namespace: {ns}, scope: {scope}, action: {action}{extra},\n"
        f"   rules: {rules}}}\n"
    )


DENY_LEGACY = pol("deny-legacy", "Deny", "[[[{namespaces: [legacy]}]]]")
ALLOW_CLIENT = pol(
    "allow-client", "Allow", "[[[{principals: ['spiffe://cluster.local/ns/default/sa/client']}]]]"
)

CASES = [
    # --- no policies / basics
    Case("no policies allow everything", "", CLIENT, True, reason="no ALLOW policy applies"),
    Case("no policies allow plaintext", "", None, True),
    Case(
        "deny only: non-matching is allowed",
        DENY_LEGACY,
        CLIENT,
        True,
        reason="no ALLOW policy applies to workload default/echo-0",
    ),
    Case(
        "deny matches namespace",
        DENY_LEGACY,
        LEGACY,
        False,
        "default/deny-legacy",
        0,
        "denied by policy default/deny-legacy rule 0: source namespace 'legacy' matches 'legacy'",
    ),
    Case("deny does not match plaintext (identity field)", DENY_LEGACY, None, True),
    Case(
        "allow matches principal",
        ALLOW_CLIENT,
        CLIENT,
        True,
        "default/allow-client",
        0,
        "allowed by policy default/allow-client rule 0: source principal",
    ),
    Case(
        "allow present but no match denies",
        ALLOW_CLIENT,
        SHOP,
        False,
        None,
        None,
        "spiffe://cluster.local/ns/shop/sa/frontend matches no rule of the ALLOW policy",
    ),
    Case(
        "allow present, plaintext denied",
        ALLOW_CLIENT,
        None,
        False,
        None,
        None,
        "plaintext connection from 10.10.2.9",
    ),
    Case(
        "deny wins over allow",
        DENY_LEGACY + pol("allow-all", "Allow", "[[]]"),
        LEGACY,
        False,
        "default/deny-legacy",
        0,
    ),
    Case(
        "deny checked first even if listed after allow",
        pol("allow-all", "Allow", "[[]]") + DENY_LEGACY,
        LEGACY,
        False,
        "default/deny-legacy",
        0,
    ),
    # --- rule structure
    Case(
        "empty rule list matches nothing (allow => deny all)",
        pol("allow-none", "Allow", "[]"),
        CLIENT,
        False,
        reason="matches no rule",
    ),
    Case("empty rules deny matches nothing", pol("deny-none", "Deny", "[]"), CLIENT, True),
    Case(
        "rule with no clauses matches everything",
        pol("allow-all", "Allow", "[[]]"),
        None,
        True,
        "default/allow-all",
        0,
        "the rule has no conditions",
    ),
    Case(
        "empty match matches everything",
        pol("allow-any", "Allow", "[[[{}]]]"),
        None,
        True,
        "default/allow-any",
        0,
        "matches any connection",
    ),
    Case(
        "clause is OR: second match hits",
        pol("a", "Allow", "[[[{namespaces: [x]}, {namespaces: [shop]}]]]"),
        SHOP,
        True,
        "default/a",
        0,
    ),
    Case(
        "rule is AND: both clauses must hit",
        pol("a", "Allow", "[[[{namespaces: [shop]}], [{destinationPorts: [9090]}]]]"),
        SHOP,
        False,
    ),
    Case(
        "rule is AND: both clauses hit",
        pol("a", "Allow", "[[[{namespaces: [shop]}], [{destinationPorts: [8080]}]]]"),
        SHOP,
        True,
        "default/a",
        0,
        "source namespace 'shop' matches 'shop'; destination port 8080 is listed",
    ),
    Case(
        "fields in one match are ANDed",
        pol("a", "Allow", "[[[{namespaces: [shop], serviceAccounts: [cart]}]]]"),
        SHOP,
        False,
    ),
    Case(
        "second rule reported by index",
        pol("a", "Allow", "[[[{namespaces: [x]}]], [[{namespaces: [shop]}]]]"),
        SHOP,
        True,
        "default/a",
        1,
        "rule 1",
    ),
    Case(
        "first matching allow policy reported",
        pol("a", "Allow", "[[[{namespaces: [x]}]]]") + pol("b", "Allow", "[[]]"),
        CLIENT,
        True,
        "default/b",
        0,
    ),
    # --- string matching
    Case(
        "prefix match",
        pol("d", "Deny", "[[[{namespaces: ['kube-*']}]]]"),
        KUBE,
        False,
        "default/d",
        0,
        "'kube-system' matches 'kube-*'",
    ),
    Case("prefix no match", pol("d", "Deny", "[[[{namespaces: ['kube-*']}]]]"), LEGACY, True),
    Case(
        "suffix match",
        pol("d", "Deny", "[[[{namespaces: ['*-system']}]]]"),
        KUBE,
        False,
        "default/d",
        0,
    ),
    Case("suffix no match", pol("d", "Deny", "[[[{namespaces: ['*-system']}]]]"), SHOP, True),
    Case(
        "presence matches any identity", pol("a", "Allow", "[[[{principals: ['*']}]]]"), SHOP, True
    ),
    Case(
        "presence does not match plaintext",
        pol("a", "Allow", "[[[{principals: ['*']}]]]"),
        None,
        False,
    ),
    Case(
        "principal prefix",
        pol("a", "Allow", "[[[{principals: ['spiffe://cluster.local/ns/shop/*']}]]]"),
        SHOP,
        True,
    ),
    Case(
        "principal suffix", pol("a", "Allow", "[[[{principals: ['*/sa/client']}]]]"), CLIENT, True
    ),
    Case("principal includes trust domain", ALLOW_CLIENT, OTHER_TD, False),
    Case(
        "service account exact",
        pol("a", "Allow", "[[[{serviceAccounts: [frontend]}]]]"),
        SHOP,
        True,
        reason="source service account 'frontend' matches 'frontend'",
    ),
    # --- not forms
    Case(
        "notNamespaces: other namespace denied",
        pol("d", "Deny", "[[[{notNamespaces: [default, shop]}]]]"),
        LEGACY,
        False,
        "default/d",
        0,
        "source namespace 'legacy' is not one of 'default', 'shop'",
    ),
    Case(
        "notNamespaces: listed namespace passes",
        pol("d", "Deny", "[[[{notNamespaces: [default, shop]}]]]"),
        SHOP,
        True,
    ),
    Case(
        "notNamespaces holds for plaintext (deny fails closed)",
        pol("d", "Deny", "[[[{notNamespaces: [default]}]]]"),
        None,
        False,
        "default/d",
        0,
        "no verified identity",
    ),
    Case(
        "notPrincipals holds for plaintext (allow lets it in, as Istio)",
        pol("a", "Allow", "[[[{notPrincipals: ['spiffe://cluster.local/ns/legacy/sa/app']}]]]"),
        None,
        True,
    ),
    Case(
        "notPrincipals excludes listed identity",
        pol("a", "Allow", "[[[{notPrincipals: ['spiffe://cluster.local/ns/legacy/sa/app']}]]]"),
        LEGACY,
        False,
    ),
    Case(
        "notServiceAccounts wildcard",
        pol("d", "Deny", "[[[{notServiceAccounts: ['*']}]]]"),
        CLIENT,
        True,
    ),
    Case(
        "positive and not in one field pair",
        pol("a", "Allow", "[[[{namespaces: ['*'], notNamespaces: [legacy]}]]]"),
        LEGACY,
        False,
    ),
    # --- IPs and ports
    Case(
        "sourceIps CIDR match",
        pol("d", "Deny", "[[[{sourceIps: [10.10.99.0/24]}]]]"),
        CLIENT,
        False,
        "default/d",
        0,
        "source IP 10.10.99.7 is in 10.10.99.0/24",
        src="10.10.99.7",
    ),
    Case(
        "sourceIps works for plaintext",
        pol("a", "Allow", "[[[{sourceIps: [10.10.2.0/24]}]]]"),
        None,
        True,
    ),
    Case(
        "sourceIps single address", pol("a", "Allow", "[[[{sourceIps: [10.10.2.8]}]]]"), None, False
    ),
    Case(
        "notSourceIps",
        pol("d", "Deny", "[[[{notSourceIps: [10.0.0.0/8]}]]]"),
        CLIENT,
        False,
        "default/d",
        0,
        src="192.168.0.1",
        reason="source IP 192.168.0.1 is not in '10.0.0.0/8'",
    ),
    Case(
        "IPv6 source in v6 CIDR",
        pol("a", "Allow", "[[[{sourceIps: ['fd00::/8']}]]]"),
        None,
        True,
        src="fd00::9",
        dst="fd00::3",
    ),
    Case(
        "IPv4 source never in v6 CIDR",
        pol("a", "Allow", "[[[{sourceIps: ['fd00::/8']}]]]"),
        None,
        False,
    ),
    Case(
        "destinationIps",
        pol("a", "Allow", "[[[{destinationIps: ['fd00::3/128']}]]]"),
        CLIENT,
        True,
        dst="fd00::3",
    ),
    Case(
        "notDestinationIps",
        pol("d", "Deny", "[[[{notDestinationIps: [10.10.1.3]}]]]"),
        CLIENT,
        True,
    ),
    Case(
        "destinationPorts no match",
        pol("a", "Allow", "[[[{destinationPorts: [80, 443]}]]]"),
        CLIENT,
        False,
    ),
    Case(
        "notDestinationPorts",
        pol("d", "Deny", "[[[{notDestinationPorts: [8080]}]]]"),
        CLIENT,
        False,
        "default/d",
        0,
        "destination port 9000 is not one of 8080",
        port=9000,
    ),
    # --- scopes
    Case(
        "namespace policy of another namespace does not apply",
        pol("a", "Allow", "[[]]", ns="shop"),
        None,
        True,
        reason="no ALLOW policy",
    ),
    Case(
        "namespace policy applies to its namespace only",
        pol("a", "Allow", "[[[{namespaces: [x]}]]]", ns="shop"),
        CLIENT,
        False,
        target="shop/cart-0",
        dst="10.10.2.3",
    ),
    Case(
        "global policy applies everywhere",
        pol("g", "Deny", "[[[{namespaces: [legacy]}]]]", scope="Global", ns="istio-system"),
        LEGACY,
        False,
        "istio-system/g",
        0,
        target="shop/cart-0",
        dst="10.10.2.3",
    ),
    Case(
        "selector by app label",
        pol("s", "Deny", "[[]]", scope="WorkloadSelector", extra=", selector: {app: echo}"),
        CLIENT,
        False,
        "default/s",
        0,
    ),
    Case(
        "selector by explicit label and version",
        pol(
            "s",
            "Deny",
            "[[]]",
            scope="WorkloadSelector",
            extra=", selector: {tier: backend, version: v2}",
        ),
        CLIENT,
        False,
        "default/s",
        0,
    ),
    Case(
        "selector not matching",
        pol("s", "Deny", "[[]]", scope="WorkloadSelector", extra=", selector: {app: cart}"),
        CLIENT,
        True,
    ),
    Case(
        "selector only within its namespace",
        pol(
            "s",
            "Deny",
            "[[]]",
            scope="WorkloadSelector",
            ns="shop",
            extra=", selector: {app: echo}",
        ),
        CLIENT,
        True,
    ),
    Case(
        "selector by workload uid",
        pol(
            "s",
            "Deny",
            "[[]]",
            scope="WorkloadSelector",
            extra=", workloadUids: ['Kubernetes//v1/Pod/default/echo-0']",
        ),
        CLIENT,
        False,
        "default/s",
        0,
    ),
    Case(
        "allow for another workload does not restrict this one",
        pol(
            "s",
            "Allow",
            "[[[{namespaces: [x]}]]]",
            scope="WorkloadSelector",
            ns="shop",
            extra=", selector: {app: cart}",
        ),
        CLIENT,
        True,
    ),
]


def _snapshot(policies: str) -> Snapshot:
    text = WORKLOADS + ("policies:\n" + textwrap.dedent(policies) if policies else "")
    return Snapshot.build(load_config_text(text, "authz.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_authorize(case: Case) -> None:
    snapshot = _snapshot(case.policies)
    ns, _, name = case.target.partition("/")
    destination = next(w for w in snapshot.config.workloads if w.namespace == ns and w.name == name)
    conn = ConnectionInfo(case.identity, case.src, case.dst, case.port)
    decision = authorize(snapshot, destination, conn)
    assert decision.allowed is case.allowed, decision.reason
    assert bool(decision) is case.allowed
    if case.policy is not None or not case.allowed:
        assert decision.policy == case.policy, decision.reason
        assert decision.rule == case.rule, decision.reason
    assert case.reason in decision.reason
    assert decision.reason.startswith("allowed" if case.allowed else "denied")


def test_case_count() -> None:
    assert len(CASES) >= 40


def test_decision_is_pure_and_repeatable() -> None:
    snapshot = _snapshot(DENY_LEGACY + ALLOW_CLIENT)
    echo = snapshot.workload_by_ip("10.10.1.3")
    assert echo is not None
    conn = ConnectionInfo(CLIENT, "10.10.1.2", "10.10.1.3", 8080)
    assert authorize(snapshot, echo, conn) == authorize(snapshot, echo, conn)


def test_rule_matches_helper_explains() -> None:
    snapshot = _snapshot(DENY_LEGACY)
    rule = snapshot.config.policies[0].rules[0]
    assert rule_matches(rule, ConnectionInfo(LEGACY, "1.1.1.1", "10.10.1.3", 1)) == (
        "source namespace 'legacy' matches 'legacy'"
    )
    assert rule_matches(rule, ConnectionInfo(CLIENT, "1.1.1.1", "10.10.1.3", 1)) is None


# --- the fast boolean evaluation and the explaining one always agree ---------------------------

_names = st.sampled_from(["default", "shop", "legacy", "kube-system"])
_sm = st.sampled_from(["default", "shop", "kube-*", "*-system", "*", "client", "*ent"]).map(
    StringMatch
)
_pm = st.sampled_from(
    [
        "*",
        "spiffe://cluster.local/ns/shop/*",
        "*/sa/client",
        "spiffe://cluster.local/ns/default/sa/client",
    ]
).map(StringMatch)
_nets = st.sampled_from(["10.0.0.0/8", "10.10.2.0/24", "fd00::/8", "192.168.1.1/32"]).map(
    ipaddress.ip_network
)
_ports = st.sampled_from([80, 8080, 9000])


def _tuple(s: st.SearchStrategy[T]) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(s, max_size=2).map(tuple)


_matches = st.builds(
    Match,
    namespaces=_tuple(_sm),
    not_namespaces=_tuple(_sm),
    service_accounts=_tuple(_sm),
    not_service_accounts=_tuple(_sm),
    principals=_tuple(_pm),
    not_principals=_tuple(_pm),
    source_ips=_tuple(_nets),
    not_source_ips=_tuple(_nets),
    destination_ips=_tuple(_nets),
    not_destination_ips=_tuple(_nets),
    destination_ports=_tuple(_ports),
    not_destination_ports=_tuple(_ports),
)
_rules = st.lists(st.lists(_matches, max_size=3).map(tuple), max_size=3).map(tuple)
_idents = st.none() | st.builds(SpiffeId.of, _names, st.sampled_from(["client", "app", "frontend"]))


@settings(max_examples=500, deadline=None)
@given(_rules, _idents, st.sampled_from(["10.10.2.9", "192.168.1.1", "fd00::9"]), _ports)
def test_fast_and_explained_evaluation_agree(
    rule: tuple[tuple[Match, ...], ...], identity: SpiffeId | None, src: str, port: int
) -> None:
    conn = ConnectionInfo(identity, src, "10.10.1.3", port)
    c = _conn(conn)
    assert _rule_ok(rule, c) is (rule_matches(rule, conn) is not None)
