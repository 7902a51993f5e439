"""Rule sets as data: parse ``iptables-save`` / ``nft list table`` output, render restore text,
and compare an expected set with an actual one.  Pure functions, no I/O.

A :class:`Rule` is one line in one chain.  Chain existence is a rule too (``-N CHAIN`` for
iptables, ``chain NAME`` for nft) so an empty leftover chain shows up as drift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TAG = "nodeproxy"
CHAIN_PREFIX = "NODEPROXY_"
NFT_FAMILY = "inet"
NFT_TABLE = "nodeproxy"


@dataclass(frozen=True, slots=True)
class Rule:
    family: str  # "ip" / "ip6" (iptables) or "inet" (nft)
    table: str
    chain: str
    text: str

    def where(self) -> str:
        return f"{self.family} {self.table} {self.chain}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.text}"


# ----------------------------------------------------------------------------- iptables


def is_ours_iptables(chain: str, line: str) -> bool:
    return (
        chain.startswith(CHAIN_PREFIX) or f"-j {CHAIN_PREFIX}" in line or f"--comment {TAG}" in line
    )


def parse_iptables_save(text: str, family: str) -> tuple[Rule, ...]:
    """Our rules (own chains, jumps into them, anything tagged) from ``iptables-save`` text."""
    rules: list[Rule] = []
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(CHAIN_PREFIX):
                rules.append(Rule(family, table, chain, f"-N {chain}"))
        elif line.startswith("-A "):
            chain = line.split()[1]
            if is_ours_iptables(chain, line):
                rules.append(Rule(family, table, chain, line))
    return tuple(rules)


def iptables_has_rules(text: str) -> bool:
    """True when a save output holds any rule or user chain (anyone's): the flavour is in use."""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("-A "):
            return True
        if line.startswith(":") and line.split()[1:2] == ["-"]:
            return True
    return False


def iptables_restore_text(desired: Sequence[Rule], current: Sequence[Rule]) -> str:
    """``iptables-restore --noflush`` input turning ``current`` (ours, as parsed) into
    ``desired`` in one transaction per table: our chains are declared (which flushes them),
    old jumps deleted, desired rules appended, chains no longer wanted deleted.
    Empty string when there is nothing to do for any table."""
    tables = sorted({r.table for r in (*desired, *current)})
    out: list[str] = []
    for table in tables:
        want = [r for r in desired if r.table == table]
        have = [r for r in current if r.table == table]
        chains = sorted({r.chain for r in (*want, *have) if r.chain.startswith(CHAIN_PREFIX)})
        wanted_chains = {r.chain for r in want if r.chain.startswith(CHAIN_PREFIX)}
        out.append(f"*{table}")
        out.extend(f":{chain} - [0:0]" for chain in chains)
        out.extend(
            "-D" + r.text[2:]
            for r in have
            if not r.chain.startswith(CHAIN_PREFIX) and r.text.startswith("-A ")
        )
        out.extend(r.text for r in want if r.text.startswith("-A "))
        out.extend(f"-X {chain}" for chain in chains if chain not in wanted_chains)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# ----------------------------------------------------------------------------- nft


def parse_nft_table(text: str) -> tuple[Rule, ...]:
    """Rules of ``table inet nodeproxy`` from ``nft list table inet nodeproxy`` output."""
    rules: list[Rule] = []
    chain = ""
    for raw in text.splitlines():
        line = raw.strip()
        if "# handle" in line:  # `nft -a` output; handles are not part of the rule
            line = line.split("# handle")[0].rstrip()
        if not line or line.startswith("#") or line.startswith("table ") or line == "}":
            continue
        if line.startswith("chain ") and line.endswith("{"):
            chain = line[len("chain ") : -1].strip()
            rules.append(Rule(NFT_FAMILY, NFT_TABLE, chain, f"chain {chain}"))
        elif chain:
            rules.append(Rule(NFT_FAMILY, NFT_TABLE, chain, line))
    return tuple(rules)


def render_nft(rules: Sequence[Rule]) -> str:
    """The table as ``nft list table inet nodeproxy`` prints it (also valid ``nft -f`` input)."""
    chains: dict[str, list[str]] = {}
    for rule in rules:
        lines = chains.setdefault(rule.chain, [])
        if rule.text != f"chain {rule.chain}":
            lines.append(rule.text)
    blocks = [
        "\n".join([f"\tchain {name} {{", *(f"\t\t{line}" for line in lines), "\t}"])
        for name, lines in chains.items()
    ]
    return (
        f"table {NFT_FAMILY} {NFT_TABLE} {{\n"
        + "\n\n".join(blocks)
        + ("\n" if blocks else "")
        + "}\n"
    )


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class RuleDiff:
    missing: tuple[Rule, ...]
    extra: tuple[Rule, ...]
    misordered: tuple[str, ...]  # chains whose rules are all there but in another order

    def words(self) -> tuple[str, ...]:
        return (
            *(f"missing: {r}" for r in self.missing),
            *(f"unexpected: {r}" for r in self.extra),
            *(f"rules out of order in {where}" for where in self.misordered),
        )


def diff_rules(desired: Iterable[Rule], actual: Iterable[Rule]) -> RuleDiff:
    want: dict[tuple[str, str, str], list[Rule]] = {}
    have: dict[tuple[str, str, str], list[Rule]] = {}
    for rule in desired:
        want.setdefault((rule.family, rule.table, rule.chain), []).append(rule)
    for rule in actual:
        have.setdefault((rule.family, rule.table, rule.chain), []).append(rule)
    missing: list[Rule] = []
    extra: list[Rule] = []
    misordered: list[str] = []
    for key in sorted({*want, *have}):
        w, h = want.get(key, []), have.get(key, [])
        lacking = Counter(w) - Counter(h)
        surplus = Counter(h) - Counter(w)
        if not lacking and not surplus:
            if w != h:
                misordered.append(" ".join(key))
            continue
        missing.extend(_pick(w, lacking))
        extra.extend(_pick(h, surplus))
    return RuleDiff(tuple(missing), tuple(extra), tuple(misordered))


def _pick(rules: list[Rule], counts: Counter[Rule]) -> list[Rule]:
    """The rules (in their order) accounting for ``counts`` surplus occurrences."""
    left = Counter(counts)
    picked: list[Rule] = []
    for rule in reversed(rules):  # later duplicates are the surplus ones
        if left[rule] > 0:
            left[rule] -= 1
            picked.append(rule)
    return picked[::-1]
