"""Pure planner: RedirectSpec -> the capture rules for one pod namespace (DESIGN §3).

Two renderings of the same rule set:

- :func:`plan_iptables` -> our own chains ``NODEPROXY_PRERT`` / ``NODEPROXY_OUTPUT`` in the
  ``nat`` and ``mangle`` tables plus one jump from each builtin chain, every rule tagged
  ``-m comment --comment nodeproxy``; text for ``iptables-restore --noflush`` written in the
  exact form ``iptables-save`` prints, so verification is a line comparison.
- :func:`plan_nft` -> ``table inet nodeproxy`` written as ``nft list table`` prints it.

Rule order matters and is the same in both: loopback and the agent's own (marked) traffic
first, then exclusions, then the REDIRECT.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from redirect.ruleset import NFT_FAMILY, NFT_TABLE, TAG, Rule, render_nft
from redirect.spec import RedirectSpec

PRERT = "NODEPROXY_PRERT"
OUTPUT = "NODEPROXY_OUTPUT"
_COMMENT = f"-m comment --comment {TAG}"
_FAMILIES = {4: "ip", 6: "ip6"}


@dataclass(frozen=True, slots=True)
class IptablesPlan:
    """Our rules for every IP family the spec captures (``ip`` always, ``ip6`` if enabled)."""

    rules: tuple[Rule, ...]

    def for_family(self, family: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.family == family)

    def text(self, family: str = "ip") -> str:
        """``iptables-restore --noflush`` input for a namespace that has none of our rules."""
        from redirect.ruleset import iptables_restore_text

        return iptables_restore_text(self.for_family(family), ())

    @property
    def v4(self) -> str:
        return self.text("ip")

    @property
    def v6(self) -> str | None:
        return self.text("ip6") if self.for_family("ip6") else None


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


def _cidrs(spec: RedirectSpec, version: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = (ipaddress.ip_network(c) for c in spec.exclude_outbound_cidrs)
    return [n for n in nets if n.version == version]


def _probe(spec: RedirectSpec, version: int) -> str | None:
    if spec.probe_source_ip is None:
        return None
    addr = ipaddress.ip_address(spec.probe_source_ip)
    return str(addr) if addr.version == version else None


def _iptables_family(spec: RedirectSpec, version: int) -> list[Rule]:
    fam = _FAMILIES[version]
    proxy = _mark(spec.proxy_mark, spec.mark_mask)
    conn = _mark(spec.connmark, spec.mark_mask)
    masks = f"--nfmask {spec.mark_mask:#x} --ctmask {spec.mark_mask:#x}"
    host = 32 if version == 4 else 128

    def rule(table: str, chain: str, matches: str, target: str) -> Rule:
        middle = f" {matches}" if matches else ""
        return Rule(fam, table, chain, f"-A {chain}{middle} {_COMMENT} -j {target}")

    mangle = [
        Rule(fam, "mangle", OUTPUT, f"-N {OUTPUT}"),
        Rule(fam, "mangle", PRERT, f"-N {PRERT}"),
        rule("mangle", "PREROUTING", "", PRERT),
        rule("mangle", "OUTPUT", "", OUTPUT),
        # A connection the agent opened (possibly with a spoofed source) is remembered...
        rule("mangle", PRERT, f"-m mark --mark {proxy}", f"CONNMARK --set-xmark {conn}"),
        rule("mangle", PRERT, "-i lo", "RETURN"),
        # ...packets of transparent (IP_TRANSPARENT) sockets are routed to the local socket...
        rule("mangle", PRERT, "-p tcp -m socket --transparent", f"MARK --set-xmark {conn}"),
        rule("mangle", PRERT, f"-m mark --mark {conn}", f"CONNMARK --save-mark {masks}"),
        # ...and the pod's replies get the mark back, so table `route_table` sends them to lo.
        rule("mangle", OUTPUT, f"-m connmark --mark {conn}", f"CONNMARK --restore-mark {masks}"),
    ]
    prert = [
        rule("nat", PRERT, "-i lo", "RETURN"),
        rule("nat", PRERT, f"-m mark --mark {proxy}", "RETURN"),
    ]
    probe = _probe(spec, version)
    if probe is not None:
        prert.append(rule("nat", PRERT, f"-s {probe}/{host} -p tcp", "RETURN"))
    for port in (spec.hbone_port, *spec.exclude_inbound_ports):
        prert.append(rule("nat", PRERT, f"-p tcp -m tcp --dport {port}", "RETURN"))
    prert.append(rule("nat", PRERT, "-p tcp", f"REDIRECT --to-ports {spec.inbound_port}"))
    out = [
        rule("nat", OUTPUT, "-o lo", "RETURN"),
        rule("nat", OUTPUT, f"-m mark --mark {proxy}", "RETURN"),
    ]
    out += [rule("nat", OUTPUT, f"-m owner --uid-owner {u}", "RETURN") for u in spec.exclude_uids]
    out += [rule("nat", OUTPUT, f"-m owner --gid-owner {g}", "RETURN") for g in spec.exclude_gids]
    out += [rule("nat", OUTPUT, f"-d {net}", "RETURN") for net in _cidrs(spec, version)]
    if spec.capture_dns:
        for proto in ("udp", "tcp"):
            out.append(
                rule(
                    "nat",
                    OUTPUT,
                    f"-p {proto} -m {proto} --dport 53",
                    f"REDIRECT --to-ports {spec.dns_port}",
                )
            )
    out.append(rule("nat", OUTPUT, "-p tcp", f"REDIRECT --to-ports {spec.outbound_port}"))
    nat = [
        Rule(fam, "nat", OUTPUT, f"-N {OUTPUT}"),
        Rule(fam, "nat", PRERT, f"-N {PRERT}"),
        rule("nat", "PREROUTING", "", PRERT),
        rule("nat", "OUTPUT", "", OUTPUT),
        *prert,
        *out,
    ]
    return mangle + nat


def plan_iptables(spec: RedirectSpec) -> IptablesPlan:
    rules: list[Rule] = []
    for version in spec.families():
        rules.extend(_iptables_family(spec, version))
    return IptablesPlan(tuple(rules))


# ----------------------------------------------------------------------------- nftables

NFT_CHAINS = {
    "mangle_prerouting": "type filter hook prerouting priority mangle; policy accept;",
    "mangle_output": "type route hook output priority mangle; policy accept;",
    "nat_prerouting": "type nat hook prerouting priority dstnat; policy accept;",
    "nat_output": "type nat hook output priority -100; policy accept;",
}


def _nft_net(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    # nft prints a host prefix as a bare address.
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def nft_rules(spec: RedirectSpec) -> tuple[Rule, ...]:
    tag = f'comment "{TAG}"'
    mask = f"0x{spec.mark_mask:08x}"
    keep = (~spec.mark_mask & 0xFFFFFFFF) | spec.connmark  # nft folds the OR value into the AND
    set_conn = f"& 0x{keep:08x} | 0x{spec.connmark:08x}"
    is_proxy = f"meta mark & {mask} == 0x{spec.proxy_mark:08x}"
    is_conn = f"meta mark & {mask} == 0x{spec.connmark:08x}"
    v4_only = [] if spec.ipv6 else ["meta nfproto ipv6 return"]

    body: dict[str, list[str]] = {
        "mangle_prerouting": [
            *v4_only,
            f"{is_proxy} ct mark set ct mark {set_conn}",
            'iifname "lo" return',
            f"meta l4proto tcp socket transparent 1 meta mark set meta mark {set_conn}",
            f"{is_conn} ct mark set ct mark {set_conn}",
        ],
        "mangle_output": [
            *v4_only,
            f"ct mark & {mask} == 0x{spec.connmark:08x} meta mark set meta mark {set_conn}",
        ],
        "nat_prerouting": [*v4_only, 'iifname "lo" return', f"{is_proxy} return"],
        "nat_output": [*v4_only, 'oifname "lo" return', f"{is_proxy} return"],
    }
    for version, kw in ((4, "ip"), (6, "ip6")):
        probe = _probe(spec, version)
        if probe is not None and version in spec.families():
            body["nat_prerouting"].append(f"{kw} saddr {probe} meta l4proto tcp return")
    for port in (spec.hbone_port, *spec.exclude_inbound_ports):
        body["nat_prerouting"].append(f"tcp dport {port} return")
    body["nat_prerouting"].append(f"meta l4proto tcp redirect to :{spec.inbound_port}")
    out = body["nat_output"]
    out += [f"meta skuid {u} return" for u in spec.exclude_uids]
    out += [f"meta skgid {g} return" for g in spec.exclude_gids]
    for version, kw in ((4, "ip"), (6, "ip6")):
        if version in spec.families():
            out += [f"{kw} daddr {_nft_net(n)} return" for n in _cidrs(spec, version)]
    if spec.capture_dns:
        out += [f"{p} dport 53 redirect to :{spec.dns_port}" for p in ("udp", "tcp")]
    out.append(f"meta l4proto tcp redirect to :{spec.outbound_port}")

    rules: list[Rule] = []
    for chain, header in NFT_CHAINS.items():
        rules.append(Rule(NFT_FAMILY, NFT_TABLE, chain, f"chain {chain}"))
        rules.append(Rule(NFT_FAMILY, NFT_TABLE, chain, header))
        rules.extend(Rule(NFT_FAMILY, NFT_TABLE, chain, f"{r} {tag}") for r in body[chain])
    return tuple(rules)


def plan_nft(spec: RedirectSpec) -> str:
    """``table inet nodeproxy`` as ``nft list table inet nodeproxy`` prints it."""
    return render_nft(nft_rules(spec))
