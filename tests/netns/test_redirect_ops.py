"""Real iptables / nftables / policy routing in throw-away network namespaces (root).

Every namespace gets a per-run prefix ``np<rand4>-rd`` and is deleted in the fixture's
finalizer, also when the test fails.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from cli.main import cli
from redirect import ops
from redirect.errors import RedirectError
from redirect.routing import Pyroute2Routing, RoutingState
from redirect.runner import CommandResult, subprocess_runner
from redirect.spec import RedirectSpec

pytestmark = pytest.mark.privileged

PREFIX = f"np{secrets.token_hex(2)}-rd"
BACKENDS = ["iptables-nft", "iptables-legacy", "nftables"]
SPEC = RedirectSpec(exclude_uids=(4242,), exclude_inbound_ports=(22,))


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")
    return proc.stdout


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def run(self, *argv: str, check: bool = True, stdin: str | None = None) -> str:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, stdin=stdin)


MakeNetns = Callable[..., Netns]


@pytest.fixture
def make_netns() -> Iterator[MakeNetns]:
    made: list[str] = []

    def make(lo_up: bool = True) -> Netns:
        name = f"{PREFIX}{len(made)}-{secrets.token_hex(2)}"
        made.append(name)
        sh("ip", "netns", "add", name)
        if lo_up:
            sh("ip", "-n", name, "link", "set", "lo", "up")
        return Netns(name)

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)
    left = [n for n in sh("ip", "netns", "list").split() if n.startswith(PREFIX)]
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def ns(make_netns: MakeNetns) -> Netns:
    return make_netns()


_DATE = re.compile(r"^#.*$", re.M)
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def _norm_save(text: str) -> str:
    """Drop comments and counters; drop tables with nothing in them (legacy tables, once
    instantiated in a namespace, cannot be unloaded)."""
    text = _COUNTERS.sub("[0:0]", _DATE.sub("", text))
    kept = []
    for block in re.split(r"(?m)^(?=\*)", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        busy = any(ln.startswith("-A") or ln.split()[1:2] == ["-"] for ln in lines if ln[0] in ":-")
        if busy or any(
            ln.split()[1:2] not in (["ACCEPT"], []) for ln in lines if ln.startswith(":")
        ):
            kept.append("\n".join(lines))
    return "\n".join(kept)


def snapshot(ns: Netns) -> dict[str, str]:
    """Everything remove must restore, keyed by the command that shows it."""
    return {
        "iptables-save": _COUNTERS.sub("", _DATE.sub("", ns.run("iptables-save"))),
        "ip6tables-save": _COUNTERS.sub("", _DATE.sub("", ns.run("ip6tables-save"))),
        "iptables-legacy-save": _norm_save(ns.run("iptables-legacy-save")),
        "ip6tables-legacy-save": _norm_save(ns.run("ip6tables-legacy-save")),
        "nft list ruleset": ns.run("nft", "list", "ruleset"),
        "ip rule": ns.run("ip", "rule") + ns.run("ip", "-6", "rule"),
        "ip route": ns.run("ip", "route", "show", "table", "all")
        + ns.run("ip", "-6", "route", "show", "table", "all"),
    }


def add_foreign_rules(ns: Netns, backend: str) -> None:
    """Somebody else's rules, which install/remove must leave alone."""
    tool = "iptables-legacy" if backend == "iptables-legacy" else "iptables-nft"
    ns.run(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN")
    ns.run(tool, "-A", "INPUT", "-p", "tcp", "--dport", "7", "-j", "DROP")
    ns.run("ip", "rule", "add", "fwmark", "0x7", "lookup", "77", "pref", "1000")
    if backend == "nftables":
        ns.run(
            "nft",
            "add table inet other; add chain inet other c { type filter hook input priority 0; }",
        )


def our_rules_present(ns: Netns, backend: str) -> bool:
    if backend == "nftables":
        return "table inet nodeproxy" in ns.run("nft", "list", "tables")
    save = ns.run(f"iptables-{backend.split('-')[1]}-save")
    return "-j REDIRECT --to-ports 15001" in save and "NODEPROXY_PRERT" in save


@pytest.mark.parametrize("backend", BACKENDS)
def test_install_twice_is_identical_and_verifies(ns: Netns, backend: str) -> None:
    add_foreign_rules(ns, backend)
    first = ops.install(ns.path, SPEC, backend)
    assert first.changed
    assert our_rules_present(ns, backend)
    assert "fwmark 0x111/0xfff lookup 133 proto 78" in ns.run("ip", "rule")
    assert "local default dev lo proto 78 scope host" in ns.run(
        "ip", "route", "show", "table", "133"
    )
    after_first = snapshot(ns)
    second = ops.install(ns.path, SPEC, backend)
    assert not second.changed
    assert snapshot(ns) == after_first
    drift = ops.verify(ns.path, SPEC, backend)
    assert drift.ok, str(drift)
    assert "NODEPROXY" in ops.show(ns.path) or "nodeproxy" in ops.show(ns.path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_leaves_namespace_exactly_as_before(ns: Netns, backend: str) -> None:
    add_foreign_rules(ns, backend)
    before = snapshot(ns)
    ops.install(ns.path, SPEC, backend)
    assert snapshot(ns) != before
    report = ops.remove(ns.path)
    assert report.removed
    assert snapshot(ns) == before
    assert ops.remove(ns.path).removed == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampering_shows_as_drift_and_install_repairs(ns: Netns, backend: str) -> None:
    ops.install(ns.path, SPEC, backend)
    if backend == "nftables":
        ns.run("nft", "flush", "chain", "inet", "nodeproxy", "nat_output")
        lost = "missing: inet nodeproxy nat_output: meta l4proto tcp redirect to :15001"
    else:
        tool = f"iptables-{backend.split('-')[1]}"
        ns.run(
            tool,
            "-t",
            "nat",
            "-D",
            "NODEPROXY_OUTPUT",
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            "nodeproxy",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        )
        ns.run(tool, "-t", "nat", "-A", "NODEPROXY_OUTPUT", "-j", "ACCEPT")
        lost = "missing: ip nat NODEPROXY_OUTPUT: -A NODEPROXY_OUTPUT -p tcp -m comment"
    ns.run("ip", "rule", "del", "pref", "32764")
    drift = ops.verify(ns.path, SPEC, backend)
    assert not drift.ok
    assert any(p.startswith(lost) for p in drift.problems), drift.problems
    assert "missing: ip -4 rule pref 32764 fwmark 0x111/0xfff lookup 133" in drift.problems
    if backend != "nftables":
        assert (
            "unexpected: ip nat NODEPROXY_OUTPUT: -A NODEPROXY_OUTPUT -j ACCEPT" in drift.problems
        )
    cli_result = CliRunner().invoke(
        cli,
        [
            "redirect",
            "verify",
            "--netns",
            ns.path,
            "--backend",
            backend,
            "--exclude-uid",
            "4242",
            "--exclude-inbound-port",
            "22",
        ],
    )
    assert cli_result.exit_code == 1
    assert "missing: ip -4 rule" in cli_result.output
    ops.install(ns.path, SPEC, backend)
    assert ops.verify(ns.path, SPEC, backend).ok


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_refuses_to_mix_with_legacy_rules(ns: Netns, backend: str) -> None:
    ns.run(
        "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN"
    )
    before = snapshot(ns)
    with pytest.raises(RedirectError, match="legacy"):
        ops.install(ns.path, SPEC, backend)
    assert snapshot(ns) == before
    # "iptables" follows the namespace: it uses the legacy flavour here.
    ops.install(ns.path, SPEC, "iptables")
    assert "NODEPROXY_OUTPUT" in ns.run("iptables-legacy-save")
    assert "NODEPROXY" not in ns.run("iptables-nft-save")


def test_backends_refuse_each_other(ns: Netns) -> None:
    ops.install(ns.path, SPEC, "nftables")
    with pytest.raises(RedirectError, match="nftables backend"):
        ops.install(ns.path, SPEC, "iptables-nft")
    ops.remove(ns.path)
    ops.install(ns.path, SPEC, "iptables-nft")
    with pytest.raises(RedirectError, match="iptables backend"):
        ops.install(ns.path, SPEC, "nftables")


def _failing_runner(marker: Sequence[str]):  # type: ignore[no-untyped-def]
    def run(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        if any(m in argv for m in marker):
            return CommandResult(tuple(argv), 1, "", "injected: rule load failed")
        return subprocess_runner(argv, stdin=stdin)

    return run


@pytest.mark.parametrize(
    ("backend", "marker"),
    [
        ("iptables-nft", ("iptables-nft-restore",)),
        ("iptables-legacy", ("iptables-legacy-restore",)),
        ("nftables", ("-f",)),
    ],
)
def test_rules_failure_after_routing_rolls_back(
    ns: Netns, backend: str, marker: Sequence[str]
) -> None:
    add_foreign_rules(ns, backend)
    before = snapshot(ns)
    with pytest.raises(RedirectError, match="injected: rule load failed"):
        ops.install(ns.path, SPEC, backend, runner=_failing_runner(marker))
    assert snapshot(ns) == before


class _LyingRouting(Pyroute2Routing):
    """Real routing whose post-install check reports nothing installed: the failure comes
    after both steps succeeded, so both must be undone."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, netns: str) -> RoutingState:
        self.captures += 1
        real = super().capture(netns)
        return RoutingState() if self.captures == 2 else real


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_after_both_steps_rolls_back_both(ns: Netns, backend: str) -> None:
    before = snapshot(ns)
    with pytest.raises(RedirectError, match="differ from the plan"):
        ops.install(ns.path, SPEC, backend, routing=_LyingRouting())
    assert snapshot(ns) == before


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_routing_failing_half_way_leaves_nothing(make_netns: MakeNetns, backend: str) -> None:
    # With lo down the IPv4 local route is accepted but the IPv6 one is not (ENETDOWN): a real
    # failure in the middle of the routing step.
    ns = make_netns(lo_up=False)
    before = snapshot(ns)
    with pytest.raises(RedirectError, match="ip link set lo up"):
        ops.install(ns.path, RedirectSpec(ipv6=True), backend)
    assert snapshot(ns) == before


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_ipv6_install_and_remove(ns: Netns, backend: str) -> None:
    before = snapshot(ns)
    spec = RedirectSpec(ipv6=True, exclude_outbound_cidrs=("fd00::/8", "10.0.0.0/8"))
    ops.install(ns.path, spec, backend)
    assert ops.verify(ns.path, spec, backend).ok
    assert "fwmark 0x111/0xfff lookup 133" in ns.run("ip", "-6", "rule")
    ops.remove(ns.path, backend)
    assert snapshot(ns) == before


# ----------------------------------------------------------------------------- functional

LISTENER = textwrap.dedent(
    """
    import json, socket, struct, sys
    ports = [int(p) for p in sys.argv[1].split(",")]
    socks = []
    for port in ports:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, 36, 0x539)  # SO_MARK: the agent's own sockets
        s.bind(("0.0.0.0", port)); s.listen(8); s.settimeout(10); socks.append(s)
    print("ready", flush=True)
    for line in sys.stdin:
        port = int(line)
        conn, peer = socks[ports.index(port)].accept()
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        dport, = struct.unpack("!H", raw[2:4])
        print(json.dumps({"port": port, "orig": f"{socket.inet_ntoa(raw[4:8])}:{dport}",
                          "peer": peer[0]}), flush=True)
        conn.close()
    """
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    if len(sys.argv) > 3:
        s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[3], 0))
    s.settimeout(2)
    try:
        s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
    except OSError as exc:
        print(f"failed {type(exc).__name__}")
    """
)


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy", "nftables"])
def test_redirect_really_captures(make_netns: MakeNetns, backend: str) -> None:
    pod, peer = make_netns(), make_netns()
    # The pod's eth0 is a veth to a peer namespace; 10.77.0.0/24 is routed via the peer, which
    # does not forward: only capture can answer a connection to 10.77.0.9.
    veth_peer = f"v{secrets.token_hex(3)}"
    sh(
        "ip",
        "-n",
        pod.name,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        veth_peer,
        "netns",
        peer.name,
    )
    pod.run("ip", "addr", "add", "10.88.0.2/24", "dev", "eth0")
    pod.run("ip", "link", "set", "eth0", "up")
    pod.run("ip", "route", "add", "10.77.0.0/24", "via", "10.88.0.1")
    peer.run("ip", "addr", "add", "10.88.0.1/24", "dev", veth_peer)
    peer.run("ip", "link", "set", veth_peer, "up")
    ops.install(pod.path, SPEC, backend)

    listener = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, sys.executable, "-c", LISTENER, "15001,15006,15008"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdin is not None
        assert listener.stdout.readline().strip() == "ready"

        def expect(port: int) -> dict[str, str]:
            listener.stdin.write(f"{port}\n")  # type: ignore[union-attr]
            listener.stdin.flush()  # type: ignore[union-attr]
            reply: dict[str, str] = json.loads(listener.stdout.readline())  # type: ignore[union-attr]
            return reply

        # Outbound: a connection to a 10.x address routed out of eth0 -> captured on 15001.
        assert pod.run(sys.executable, "-c", CLIENT, "10.77.0.9", "8080").strip() == "connected"
        got = expect(15001)
        assert got["orig"] == "10.77.0.9:8080"
        # The agent's own (SO_MARK 0x539) traffic is not captured: it leaves and gets no answer.
        marked = pod.run(sys.executable, "-c", CLIENT, "10.77.0.9", "8080", "0x539").strip()
        assert marked.startswith("failed")
        # Inbound plaintext: from the peer to the pod's IP -> captured on 15006.
        assert peer.run(sys.executable, "-c", CLIENT, "10.88.0.2", "80").strip() == "connected"
        got = expect(15006)
        assert got["orig"] == "10.88.0.2:80"
        assert got["peer"] == "10.88.0.1"
        # Inbound HBONE port 15008 reaches its listener directly (not redirected).
        assert peer.run(sys.executable, "-c", CLIENT, "10.88.0.2", "15008").strip() == "connected"
        got = expect(15008)
        assert got["orig"] == "10.88.0.2:15008"
    finally:
        listener.kill()
        listener.communicate()


SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(8); print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_fails_closed_without_agent_and_opens_after_remove(
    make_netns: MakeNetns, backend: str
) -> None:
    pod, peer = make_netns(), make_netns()
    veth_peer = f"v{secrets.token_hex(3)}"
    sh(
        "ip",
        "-n",
        pod.name,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        veth_peer,
        "netns",
        peer.name,
    )
    pod.run("ip", "addr", "add", "10.89.0.2/24", "dev", "eth0")
    pod.run("ip", "link", "set", "eth0", "up")
    peer.run("ip", "addr", "add", "10.89.0.1/24", "dev", veth_peer)
    peer.run("ip", "link", "set", veth_peer, "up")
    server = subprocess.Popen(
        ["ip", "netns", "exec", peer.name, sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        direct = [sys.executable, "-c", CLIENT, "10.89.0.1", "80"]
        assert pod.run(*direct).strip() == "connected"
        ops.install(pod.path, SPEC, backend)
        # No agent listening on 15001: the connection is refused, nothing leaves in plaintext.
        assert pod.run(*direct).strip() == "failed ConnectionRefusedError"
        ops.remove(pod.path)
        assert pod.run(*direct).strip() == "connected"
    finally:
        server.kill()
        server.communicate()
