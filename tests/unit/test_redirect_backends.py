"""Backends against a scripted command runner: flavour detection, refusal to mix, the exact
commands and transactions sent, and error messages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from redirect.errors import RedirectError
from redirect.iptables import IptablesBackend
from redirect.nftables import NftablesBackend
from redirect.plan import plan_iptables
from redirect.runner import CommandResult
from redirect.spec import RedirectSpec

NS = "/var/run/netns/pod-a"
USED = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n"


class FakeRunner:
    """Answers by tool name (argv after `nsenter --net=NS`); records every call."""

    def __init__(self, outputs: dict[str, str] | None = None, fail: str | None = None) -> None:
        self.outputs = outputs or {}
        self.fail = fail
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        self.calls.append((tuple(argv), stdin))
        args = list(argv[2:]) if argv[0] == "nsenter" else list(argv)
        key = " ".join(args)
        if self.fail and key.startswith(self.fail):
            return CommandResult(tuple(argv), 2, "", "iptables-restore: line 5 failed")
        if args[:1] == ["iptables"]:
            return CommandResult(tuple(argv), 0, "iptables v1.8.9 (nf_tables)\n")
        return CommandResult(tuple(argv), 0, self.outputs.get(key, self.outputs.get(args[0], "")))

    def tools(self) -> list[str]:
        return [" ".join(a[2:] if a[0] == "nsenter" else a) for a, _ in self.calls]

    def stdin_of(self, prefix: str) -> list[str]:
        return [s or "" for a, s in self.calls if " ".join(a[2:]).startswith(prefix)]


@pytest.mark.parametrize(
    ("requested", "used", "expected"),
    [
        ("auto", set(), "nft"),
        ("auto", {"iptables-legacy-save"}, "legacy"),
        ("auto", {"iptables-nft-save"}, "nft"),
        ("auto", {"ip6tables-legacy-save"}, "legacy"),
        ("nft", set(), "nft"),
        ("legacy", set(), "legacy"),
        ("nft", {"iptables-legacy-save"}, "refused"),
        ("legacy", {"ip6tables-nft-save"}, "refused"),
        ("auto", {"iptables-legacy-save", "iptables-nft-save"}, "refused"),
    ],
)
def test_flavour_resolution(requested: str, used: set[str], expected: str) -> None:
    runner = FakeRunner(dict.fromkeys(used, USED))
    backend = IptablesBackend(requested, runner)
    if expected == "refused":
        with pytest.raises(RedirectError) as info:
            backend.preflight(NS)
        assert NS in str(info.value)
        assert "legacy" in str(info.value)
    else:
        assert backend.resolve(NS) == expected


def test_commands_run_inside_the_namespace_by_path() -> None:
    runner = FakeRunner()
    IptablesBackend("nft", runner).capture(NS)
    assert runner.calls
    for argv, _ in runner.calls:
        if argv[0] != "iptables":
            assert argv[:2] == ("nsenter", f"--net={NS}")


def test_iptables_restore_is_one_noflush_transaction_per_family() -> None:
    runner = FakeRunner()
    backend = IptablesBackend("legacy", runner)
    backend.restore(NS, backend.desired(RedirectSpec()))
    restores = [t for t in runner.tools() if "restore" in t]
    assert restores == ["iptables-legacy-restore --noflush"]
    assert runner.stdin_of("iptables-legacy-restore") == [plan_iptables(RedirectSpec()).v4]


def test_iptables_reinstall_replaces_jumps_instead_of_adding() -> None:
    installed = plan_iptables(RedirectSpec()).v4  # save output has the same rule lines
    runner = FakeRunner({"iptables-nft-save": installed})
    backend = IptablesBackend("nft", runner)
    backend.restore(NS, backend.desired(RedirectSpec(exclude_uids=(5,))))
    (text,) = runner.stdin_of("iptables-nft-restore")
    assert text.count("-D PREROUTING -m comment --comment nodeproxy -j NODEPROXY_PRERT") == 2
    assert "--uid-owner 5" in text


def test_iptables_removal_drops_chains_and_tables_left_empty() -> None:
    installed = plan_iptables(RedirectSpec()).v4
    empty = (
        "table ip nat {\n\tchain OUTPUT {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n\t}\n}\n"
    )
    busy = (
        "table ip mangle {\n\tchain OUTPUT {\n"
        "\t\ttype route hook output priority mangle; policy accept;\n\t\tcounter\n\t}\n}\n"
    )
    runner = FakeRunner(
        {
            "iptables-nft-save": installed,
            "nft list chain ip nat OUTPUT": empty,
            "nft list chain ip mangle OUTPUT": busy,
            "nft list table ip nat": "table ip nat {\n}\n",
            "nft list table ip mangle": busy,
        }
    )
    IptablesBackend("nft", runner).restore(NS, ())
    tools = runner.tools()
    assert "nft delete chain ip nat OUTPUT" in tools
    assert "nft delete table ip nat" in tools
    assert "nft delete chain ip mangle OUTPUT" not in tools  # someone else's rule remains
    assert "nft delete table ip mangle" not in tools


def test_iptables_refuses_when_nft_backend_table_exists() -> None:
    runner = FakeRunner({"nft list tables": "table inet nodeproxy\n"})
    with pytest.raises(RedirectError, match="nftables backend"):
        IptablesBackend("auto", runner).preflight(NS)


def test_restore_failure_names_netns_command_and_stderr() -> None:
    runner = FakeRunner(fail="iptables-nft-restore")
    backend = IptablesBackend("nft", runner)
    with pytest.raises(RedirectError) as info:
        backend.restore(NS, backend.desired(RedirectSpec()))
    message = str(info.value)
    assert NS in message
    assert "iptables-nft-restore --noflush" in message
    assert "line 5 failed" in message
    assert info.value.hint


def test_nft_restore_is_one_transaction_replacing_the_table() -> None:
    runner = FakeRunner()
    backend = NftablesBackend(runner)
    backend.restore(NS, backend.desired(RedirectSpec()))
    (text,) = runner.stdin_of("nft -f -")
    assert text.startswith(
        "table inet nodeproxy\ndelete table inet nodeproxy\ntable inet nodeproxy {"
    )


def test_nft_remove_is_a_no_op_without_our_table() -> None:
    runner = FakeRunner({"nft list tables": "table ip nat\n"})
    NftablesBackend(runner).restore(NS, ())
    assert runner.stdin_of("nft -f -") == []


def test_nft_refuses_legacy_rules_and_iptables_backend() -> None:
    with pytest.raises(RedirectError, match="iptables-legacy rules"):
        NftablesBackend(FakeRunner({"iptables-legacy-save": USED})).preflight(NS)
    ours = plan_iptables(RedirectSpec()).v4
    with pytest.raises(RedirectError, match="NODEPROXY_"):
        NftablesBackend(FakeRunner({"iptables-nft-save": ours})).preflight(NS)
    NftablesBackend(FakeRunner({"iptables-nft-save": USED})).preflight(NS)  # others' nft rules: ok


def test_missing_tool_says_what_to_install() -> None:
    def runner(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        return CommandResult(tuple(argv), 127, "", "nft: not found")

    with pytest.raises(RedirectError, match="installed"):
        NftablesBackend(runner).capture(NS)
