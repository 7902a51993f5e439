"""iptables backend: our chains via ``iptables-restore --noflush``, in the flavour the target
namespace already uses (nft-backed or legacy), never both."""

from __future__ import annotations

from collections.abc import Sequence

from redirect.errors import RedirectError
from redirect.plan import plan_iptables
from redirect.ruleset import (
    NFT_FAMILY,
    NFT_TABLE,
    Rule,
    iptables_has_rules,
    iptables_restore_text,
    parse_iptables_save,
)
from redirect.runner import Runner, in_netns, run_in, subprocess_runner
from redirect.spec import RedirectSpec

FLAVOURS = ("nft", "legacy")
_CMD = {"ip": "iptables", "ip6": "ip6tables"}
# The builtin chains our jumps live in.
_BUILTINS = {"mangle": ("PREROUTING", "OUTPUT"), "nat": ("PREROUTING", "OUTPUT")}


def _empty_accept_chain(listing: str) -> bool:
    body = [
        ln.strip()
        for ln in listing.splitlines()
        if ln.strip() and not ln.strip().startswith(("table ", "chain ", "}", "#"))
    ]
    return len(body) == 1 and body[0].startswith("type ") and "policy accept;" in body[0]


def _tool(family: str, flavour: str, action: str) -> str:
    return f"{_CMD[family]}-{flavour}-{action}"


class IptablesBackend:
    """``flavour`` is ``"nft"``, ``"legacy"`` or ``"auto"`` (whatever the namespace already
    uses; for a namespace with no rules at all, the flavour of the system's ``iptables``)."""

    def __init__(self, flavour: str = "auto", runner: Runner = subprocess_runner) -> None:
        if flavour not in (*FLAVOURS, "auto"):
            raise RedirectError(f"unknown iptables flavour {flavour!r}", hint="use nft or legacy")
        self.flavour = flavour
        self.name = "iptables" if flavour == "auto" else f"iptables-{flavour}"
        self._run = runner

    # -- inspection ------------------------------------------------------------------------

    def _save(self, netns: str, family: str, flavour: str, table: str | None = None) -> str:
        argv = [_tool(family, flavour, "save")]
        if table:
            argv += ["-t", table]
        return run_in(self._run, netns, argv)

    def flavours_in_use(self, netns: str) -> dict[str, bool]:
        """Per flavour: does it hold any rule or user chain (anyone's)?"""
        return {
            fl: any(iptables_has_rules(self._save(netns, fam, fl)) for fam in _CMD)
            for fl in FLAVOURS
        }

    def _ours(self, netns: str, flavour: str) -> tuple[Rule, ...]:
        return tuple(
            rule
            for fam in _CMD
            for rule in parse_iptables_save(self._save(netns, fam, flavour), fam)
        )

    def _system_flavour(self) -> str:
        result = self._run(["iptables", "-V"])
        return "legacy" if "legacy" in result.stdout else "nft"

    def resolve(self, netns: str) -> str:
        """The concrete flavour to use in ``netns``; refuses to mix flavours."""
        used = self.flavours_in_use(netns)
        if used["nft"] and used["legacy"]:
            raise RedirectError(
                f"netns {netns} already holds both iptables-legacy and iptables-nft rules; "
                "refusing to add more",
                netns=netns,
                hint="compare 'iptables-legacy-save' and 'iptables-nft-save' there and remove "
                "one set; rules of both kinds are evaluated in an order nobody chose",
            )
        if self.flavour != "auto":
            other = "legacy" if self.flavour == "nft" else "nft"
            if used[other]:
                raise RedirectError(
                    f"netns {netns} has iptables-{other} rules; refusing to add "
                    f"iptables-{self.flavour} rules next to them",
                    netns=netns,
                    hint=f"use '--backend iptables-{other}' (or 'iptables' to follow the "
                    f"namespace), or remove the iptables-{other} rules first",
                )
            return self.flavour
        for flavour in FLAVOURS:
            if used[flavour]:
                return flavour
        return self._system_flavour()

    def _nft_table_present(self, netns: str) -> bool:
        tables = run_in(self._run, netns, ["nft", "list", "tables"])
        return f"table {NFT_FAMILY} {NFT_TABLE}" in tables.splitlines()

    # -- Backend protocol -----------------------------------------------------------------

    def preflight(self, netns: str) -> None:
        self.resolve(netns)
        if self._nft_table_present(netns):
            raise RedirectError(
                f"netns {netns} already has the nftables backend's table "
                f"'{NFT_FAMILY} {NFT_TABLE}'; refusing to capture twice",
                netns=netns,
                hint=f"run 'nodeproxy redirect remove --netns {netns}' first",
            )

    def desired(self, spec: RedirectSpec) -> tuple[Rule, ...]:
        return plan_iptables(spec).rules

    def capture(self, netns: str) -> tuple[Rule, ...]:
        return self._ours(netns, self.resolve(netns))

    def restore(self, netns: str, rules: Sequence[Rule]) -> None:
        if rules:
            self._restore_flavour(netns, self.resolve(netns), rules)
            return
        # Removal: clear ours from every flavour that has any, even a mixed namespace.
        flavours = FLAVOURS if self.flavour == "auto" else (self.flavour,)
        for flavour in flavours:
            self._restore_flavour(netns, flavour, ())

    def _restore_flavour(self, netns: str, flavour: str, rules: Sequence[Rule]) -> None:
        for fam in _CMD:
            current = parse_iptables_save(self._save(netns, fam, flavour), fam)
            want = [r for r in rules if r.family == fam]
            text = iptables_restore_text(want, current)
            if not text or (not want and not current):
                continue
            run_in(
                self._run,
                netns,
                [_tool(fam, flavour, "restore"), "--noflush"],
                stdin=text,
                hint="the rule text is in the message above; check that the kernel has the "
                "nat, mangle, socket, mark, connmark, owner and comment matches",
            )
            if flavour == "nft":
                self._drop_empty_tables(
                    netns, fam, {r.table for r in current} - {r.table for r in want}
                )

    def _drop_empty_tables(self, netns: str, family: str, tables: set[str]) -> None:
        # iptables-nft leaves empty base chains (and tables) behind once our rules are gone;
        # an empty ACCEPT base chain does nothing, and dropping it leaves `nft list ruleset`
        # as it was before install.  iptables-nft re-creates them on demand.
        for table in sorted(tables):
            for chain in _BUILTINS[table]:
                listing = self._run(in_netns(netns, ["nft", "list", "chain", family, table, chain]))
                if listing.returncode == 0 and _empty_accept_chain(listing.stdout):
                    run_in(self._run, netns, ["nft", "delete", "chain", family, table, chain])
            listing = self._run(in_netns(netns, ["nft", "list", "table", family, table]))
            if listing.returncode == 0 and "chain " not in listing.stdout:
                run_in(self._run, netns, ["nft", "delete", "table", family, table])

    def present(self, netns: str) -> bool:
        return any(self._ours(netns, fl) for fl in FLAVOURS)

    def show(self, netns: str) -> str:
        parts: list[str] = []
        for flavour in FLAVOURS:
            ours = self._ours(netns, flavour)
            if ours:
                parts.append(f"# iptables-{flavour}")
                parts.extend(f"{r.family} {r.table}: {r.text}" for r in ours)
        return "\n".join(parts)
