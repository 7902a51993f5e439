"""nftables backend: everything lives in ``table inet nodeproxy``, replaced in one
``nft -f`` transaction (declare, delete, re-add) so a pod never sees half a rule set."""

from __future__ import annotations

from collections.abc import Sequence

from redirect.errors import RedirectError
from redirect.iptables import IptablesBackend
from redirect.plan import nft_rules
from redirect.ruleset import NFT_FAMILY, NFT_TABLE, Rule, parse_nft_table, render_nft
from redirect.runner import Runner, run_in, subprocess_runner
from redirect.spec import RedirectSpec

_TABLE = f"table {NFT_FAMILY} {NFT_TABLE}"


class NftablesBackend:
    name = "nftables"

    def __init__(self, runner: Runner = subprocess_runner) -> None:
        self._run = runner

    def _table_present(self, netns: str) -> bool:
        return _TABLE in run_in(self._run, netns, ["nft", "list", "tables"]).splitlines()

    def preflight(self, netns: str) -> None:
        ipt = IptablesBackend("auto", self._run)
        # Legacy xtables and nftables hooks both run; refuse rather than stack captures.
        if ipt.flavours_in_use(netns)["legacy"]:
            raise RedirectError(
                f"netns {netns} has iptables-legacy rules; refusing to add nftables rules "
                "next to them",
                netns=netns,
                hint="use '--backend iptables' there, or remove the legacy rules first "
                "(see 'iptables-legacy-save')",
            )
        if ipt.present(netns):
            raise RedirectError(
                f"netns {netns} already has the iptables backend's NODEPROXY_* chains; "
                "refusing to capture twice",
                netns=netns,
                hint=f"run 'nodeproxy redirect remove --netns {netns}' first",
            )

    def desired(self, spec: RedirectSpec) -> tuple[Rule, ...]:
        return nft_rules(spec)

    def capture(self, netns: str) -> tuple[Rule, ...]:
        if not self._table_present(netns):
            return ()
        listing = run_in(self._run, netns, ["nft", "list", "table", NFT_FAMILY, NFT_TABLE])
        return parse_nft_table(listing)

    def restore(self, netns: str, rules: Sequence[Rule]) -> None:
        if not rules and not self._table_present(netns):
            return
        # `table X` then `delete table X` makes the delete valid whether or not X exists.
        text = f"{_TABLE}\ndelete {_TABLE}\n" + (render_nft(rules) if rules else "")
        run_in(
            self._run,
            netns,
            ["nft", "-f", "-"],
            stdin=text,
            hint="check that the kernel has nf_tables with nat, socket and conntrack support",
        )

    def present(self, netns: str) -> bool:
        return self._table_present(netns)

    def show(self, netns: str) -> str:
        rules = self.capture(netns)
        return render_nft(rules).rstrip("\n") if rules else ""
