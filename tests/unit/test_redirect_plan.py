"""Golden-text tests for the pure planner and the rule-set helpers."""

from __future__ import annotations

import pytest

from redirect.errors import RedirectError
from redirect.plan import plan_iptables, plan_nft
from redirect.routing import LocalRoute, PolicyRule, RoutingState, routing_plan
from redirect.ruleset import (
    Rule,
    diff_rules,
    iptables_has_rules,
    iptables_restore_text,
    parse_iptables_save,
    parse_nft_table,
)
from redirect.spec import RedirectSpec

C = "-m comment --comment nodeproxy"
M = "--nfmask 0xfff --ctmask 0xfff"

MANGLE = f"""*mangle
:NODEPROXY_OUTPUT - [0:0]
:NODEPROXY_PRERT - [0:0]
-A PREROUTING {C} -j NODEPROXY_PRERT
-A OUTPUT {C} -j NODEPROXY_OUTPUT
-A NODEPROXY_PRERT -m mark --mark 0x539/0xfff {C} -j CONNMARK --set-xmark 0x111/0xfff
-A NODEPROXY_PRERT -i lo {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m socket --transparent {C} -j MARK --set-xmark 0x111/0xfff
-A NODEPROXY_PRERT -m mark --mark 0x111/0xfff {C} -j CONNMARK --save-mark {M}
-A NODEPROXY_OUTPUT -m connmark --mark 0x111/0xfff {C} -j CONNMARK --restore-mark {M}
COMMIT
"""

DEFAULT_V4 = (
    MANGLE
    + f"""*nat
:NODEPROXY_OUTPUT - [0:0]
:NODEPROXY_PRERT - [0:0]
-A PREROUTING {C} -j NODEPROXY_PRERT
-A OUTPUT {C} -j NODEPROXY_OUTPUT
-A NODEPROXY_PRERT -i lo {C} -j RETURN
-A NODEPROXY_PRERT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_PRERT -s 169.254.7.127/32 -p tcp {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m tcp --dport 15008 {C} -j RETURN
-A NODEPROXY_PRERT -p tcp {C} -j REDIRECT --to-ports 15006
-A NODEPROXY_OUTPUT -o lo {C} -j RETURN
-A NODEPROXY_OUTPUT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_OUTPUT -p tcp {C} -j REDIRECT --to-ports 15001
COMMIT
"""
)

EXCLUDING_V4 = (
    MANGLE
    + f"""*nat
:NODEPROXY_OUTPUT - [0:0]
:NODEPROXY_PRERT - [0:0]
-A PREROUTING {C} -j NODEPROXY_PRERT
-A OUTPUT {C} -j NODEPROXY_OUTPUT
-A NODEPROXY_PRERT -i lo {C} -j RETURN
-A NODEPROXY_PRERT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m tcp --dport 15008 {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m tcp --dport 22 {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m tcp --dport 9090 {C} -j RETURN
-A NODEPROXY_PRERT -p tcp {C} -j REDIRECT --to-ports 16006
-A NODEPROXY_OUTPUT -o lo {C} -j RETURN
-A NODEPROXY_OUTPUT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_OUTPUT -m owner --uid-owner 1337 {C} -j RETURN
-A NODEPROXY_OUTPUT -m owner --gid-owner 1338 {C} -j RETURN
-A NODEPROXY_OUTPUT -d 10.96.0.0/12 {C} -j RETURN
-A NODEPROXY_OUTPUT -d 192.168.1.1/32 {C} -j RETURN
-A NODEPROXY_OUTPUT -p udp -m udp --dport 53 {C} -j REDIRECT --to-ports 15053
-A NODEPROXY_OUTPUT -p tcp -m tcp --dport 53 {C} -j REDIRECT --to-ports 15053
-A NODEPROXY_OUTPUT -p tcp {C} -j REDIRECT --to-ports 16001
COMMIT
"""
)

IPV6_V6 = (
    MANGLE
    + f"""*nat
:NODEPROXY_OUTPUT - [0:0]
:NODEPROXY_PRERT - [0:0]
-A PREROUTING {C} -j NODEPROXY_PRERT
-A OUTPUT {C} -j NODEPROXY_OUTPUT
-A NODEPROXY_PRERT -i lo {C} -j RETURN
-A NODEPROXY_PRERT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_PRERT -p tcp -m tcp --dport 15008 {C} -j RETURN
-A NODEPROXY_PRERT -p tcp {C} -j REDIRECT --to-ports 15006
-A NODEPROXY_OUTPUT -o lo {C} -j RETURN
-A NODEPROXY_OUTPUT -m mark --mark 0x539/0xfff {C} -j RETURN
-A NODEPROXY_OUTPUT -d fd00::/8 {C} -j RETURN
-A NODEPROXY_OUTPUT -p tcp {C} -j REDIRECT --to-ports 15001
COMMIT
"""
)

T = 'comment "nodeproxy"'
SET = "& 0xfffff111 | 0x00000111"
NFT_MANGLE = f"""\tchain mangle_prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
{{v6}}\t\tmeta mark & 0x00000fff == 0x00000539 ct mark set ct mark {SET} {T}
\t\tiifname "lo" return {T}
\t\tmeta l4proto tcp socket transparent 1 meta mark set meta mark {SET} {T}
\t\tmeta mark & 0x00000fff == 0x00000111 ct mark set ct mark {SET} {T}
\t}}

\tchain mangle_output {{
\t\ttype route hook output priority mangle; policy accept;
{{v6}}\t\tct mark & 0x00000fff == 0x00000111 meta mark set meta mark {SET} {T}
\t}}
"""
V4_ONLY = f"\t\tmeta nfproto ipv6 return {T}\n"

DEFAULT_NFT = (
    "table inet nodeproxy {\n"
    + NFT_MANGLE.replace("{v6}", V4_ONLY)
    + f"""
\tchain nat_prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
{V4_ONLY}\t\tiifname "lo" return {T}
\t\tmeta mark & 0x00000fff == 0x00000539 return {T}
\t\tip saddr 169.254.7.127 meta l4proto tcp return {T}
\t\ttcp dport 15008 return {T}
\t\tmeta l4proto tcp redirect to :15006 {T}
\t}}

\tchain nat_output {{
\t\ttype nat hook output priority -100; policy accept;
{V4_ONLY}\t\toifname "lo" return {T}
\t\tmeta mark & 0x00000fff == 0x00000539 return {T}
\t\tmeta l4proto tcp redirect to :15001 {T}
\t}}
}}
"""
)

DUAL_NFT = (
    "table inet nodeproxy {\n"
    + NFT_MANGLE.replace("{v6}", "")
    + f"""
\tchain nat_prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "lo" return {T}
\t\tmeta mark & 0x00000fff == 0x00000539 return {T}
\t\ttcp dport 15008 return {T}
\t\ttcp dport 22 return {T}
\t\tmeta l4proto tcp redirect to :15006 {T}
\t}}

\tchain nat_output {{
\t\ttype nat hook output priority -100; policy accept;
\t\toifname "lo" return {T}
\t\tmeta mark & 0x00000fff == 0x00000539 return {T}
\t\tmeta skuid 1337 return {T}
\t\tmeta skgid 7 return {T}
\t\tip daddr 10.96.0.0/12 return {T}
\t\tip daddr 192.168.1.1 return {T}
\t\tip6 daddr fd00::/8 return {T}
\t\tudp dport 53 redirect to :15053 {T}
\t\ttcp dport 53 redirect to :15053 {T}
\t\tmeta l4proto tcp redirect to :15001 {T}
\t}}
}}
"""
)

EXCLUDING = RedirectSpec(
    outbound_port=16001,
    inbound_port=16006,
    exclude_uids=(1337,),
    exclude_gids=(1338,),
    exclude_outbound_cidrs=("10.96.0.0/12", "192.168.1.1"),
    exclude_inbound_ports=(22, 9090),
    probe_source_ip=None,
    capture_dns=True,
)
DUAL = RedirectSpec(
    ipv6=True,
    exclude_uids=(1337,),
    exclude_gids=(7,),
    exclude_outbound_cidrs=("10.96.0.0/12", "fd00::/8", "192.168.1.1/32"),
    exclude_inbound_ports=(22,),
    probe_source_ip=None,
    capture_dns=True,
)


@pytest.mark.parametrize(
    ("spec", "family", "expected"),
    [
        (RedirectSpec(), "ip", DEFAULT_V4),
        (EXCLUDING, "ip", EXCLUDING_V4),
        (
            RedirectSpec(ipv6=True, exclude_outbound_cidrs=("fd00::/8", "10.0.0.0/8")),
            "ip6",
            IPV6_V6,
        ),
    ],
    ids=["default", "exclusions-dns-ports", "ipv6-family"],
)
def test_iptables_golden(spec: RedirectSpec, family: str, expected: str) -> None:
    assert plan_iptables(spec).text(family) == expected


def test_iptables_ipv4_only_has_no_v6_text() -> None:
    plan = plan_iptables(RedirectSpec())
    assert plan.v4 == DEFAULT_V4
    assert plan.v6 is None
    assert plan_iptables(RedirectSpec(ipv6=True)).v6 is not None


def test_every_iptables_rule_is_tagged() -> None:
    for rule in plan_iptables(DUAL).rules:
        assert rule.text.startswith("-N ") or C in rule.text, rule


@pytest.mark.parametrize(
    ("spec", "expected"), [(RedirectSpec(), DEFAULT_NFT), (DUAL, DUAL_NFT)], ids=["default", "dual"]
)
def test_nft_golden(spec: RedirectSpec, expected: str) -> None:
    assert plan_nft(spec) == expected


def test_nft_listing_round_trips_through_parser() -> None:
    from redirect.plan import nft_rules
    from redirect.ruleset import render_nft

    rules = parse_nft_table(DUAL_NFT)
    assert rules == nft_rules(DUAL)
    assert render_nft(rules) == DUAL_NFT


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"outbound_port": 0}, "outbound_port"),
        ({"exclude_inbound_ports": (70000,)}, "exclude_inbound_ports"),
        ({"proxy_mark": 0x1539}, "proxy_mark"),
        ({"connmark": 0x539}, "must differ"),
        ({"route_table": 254}, "route_table"),
        ({"rule_priority": 32766}, "rule_priority"),
        ({"exclude_outbound_cidrs": ("10.0.0.300/8",)}, "exclude_outbound_cidrs"),
        ({"probe_source_ip": "nope"}, "probe_source_ip"),
        ({"exclude_uids": (-1,)}, "uid"),
    ],
)
def test_spec_rejects(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(RedirectError, match=needle):
        RedirectSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_normalises_cidrs_and_probe() -> None:
    spec = RedirectSpec(exclude_outbound_cidrs=("10.1.2.3/8", "fd00::1"), probe_source_ip="::1")
    assert spec.exclude_outbound_cidrs == ("10.0.0.0/8", "fd00::1/128")
    assert spec.probe_source_ip == "::1"


def test_routing_plan() -> None:
    assert routing_plan(RedirectSpec(route_table=200)) == RoutingState(
        frozenset({PolicyRule(4, 32764, 0x111, 0xFFF, 200)}), frozenset({LocalRoute(4, 200)})
    )
    dual = routing_plan(RedirectSpec(ipv6=True))
    assert {r.version for r in dual.rules} == {4, 6}
    assert "ip -6 route local ::/0 dev lo table 133" in dual.describe()


SAVE = """# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [10:600]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-FOO - [0:0]
:NODEPROXY_OUTPUT - [0:0]
-A PREROUTING -j CNI-FOO
-A OUTPUT -m comment --comment nodeproxy -j NODEPROXY_OUTPUT
-A NODEPROXY_OUTPUT -p tcp -m comment --comment nodeproxy -j REDIRECT --to-ports 15001
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
"""


def test_parse_save_keeps_only_ours() -> None:
    rules = parse_iptables_save(SAVE, "ip")
    assert [r.text for r in rules] == [
        "-N NODEPROXY_OUTPUT",
        f"-A OUTPUT {C} -j NODEPROXY_OUTPUT",
        f"-A NODEPROXY_OUTPUT -p tcp {C} -j REDIRECT --to-ports 15001",
    ]
    assert {r.table for r in rules} == {"nat"}
    assert iptables_has_rules(SAVE)
    assert not iptables_has_rules("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")


def test_restore_text_converges_existing_rules() -> None:
    current = parse_iptables_save(SAVE, "ip")
    desired = plan_iptables(RedirectSpec()).for_family("ip")
    text = iptables_restore_text(desired, current)
    nat = text.split("*nat\n")[1]
    # The old jump is deleted before the new one is appended: never two jumps.
    assert nat.index(f"-D OUTPUT {C} -j NODEPROXY_OUTPUT") < nat.index(
        f"-A OUTPUT {C} -j NODEPROXY_OUTPUT"
    )
    assert "-X" not in text


def test_restore_text_removal_deletes_jumps_then_chains() -> None:
    text = iptables_restore_text((), parse_iptables_save(SAVE, "ip"))
    assert text == (
        "*nat\n:NODEPROXY_OUTPUT - [0:0]\n"
        f"-D OUTPUT {C} -j NODEPROXY_OUTPUT\n-X NODEPROXY_OUTPUT\nCOMMIT\n"
    )
    assert iptables_restore_text((), ()) == ""


def test_diff_reports_missing_extra_and_order() -> None:
    a, b, c = (Rule("ip", "nat", "X", t) for t in ("-A X 1", "-A X 2", "-A X 3"))
    assert diff_rules([a, b], [a, b]).words() == ()
    d = diff_rules([a, b], [a, c, c])
    assert d.missing == (b,)
    assert d.extra == (c, c)
    assert diff_rules([a, b], [b, a]).words() == ("rules out of order in ip nat X",)
    assert diff_rules([a], [a, a]).words() == ("unexpected: ip nat X: -A X 1",)
