"""The eBPF backend's install / verify / remove on a real lab pod (netns + cgroup; root).

A one-pod lab cluster (``lab_cluster``) gives a pod netns with an address and its own cgroup
under ``nodeproxy-lab/``; the tests load the real programs with bcc and look at what the
kernel holds (pins, program and map ids, cgroup and tc attachments).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshlab import Cluster
from meshlab.cgroups import pod_cgroup
from redirect.ebpf import bpfsys, ops
from redirect.ebpf.errors import EbpfError, EbpfUnsupportedError, VerifierError
from redirect.ebpf.loader import load
from redirect.ebpf.plan import PROGRAMS, PodConfig
from redirect.spec import RedirectSpec
from tests.helpers.waiting import wait_until
from tests.netns.conftest import MakeCluster
from tests.netns.mesh_fixtures import netns_state, state_diff

pytestmark = pytest.mark.privileged
SPEC = RedirectSpec()


def _pod(make_cluster: MakeCluster) -> tuple[Cluster, str, str]:
    cluster = make_cluster(nodes=1, pods_per_node=1)
    pod = cluster.pods[0]
    return cluster, pod.netns_path, pod_cgroup(pod.netns)


def _bpftool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True,
                          check=False, timeout=30)


def _ids(pod_dir: str) -> dict[str, int]:
    """Kernel ids of every pinned program and map of the pod."""
    out = {}
    for name in sorted(os.listdir(pod_dir)):
        kind = "prog" if name in PROGRAMS else "map"
        shown = _bpftool(kind, "show", "pinned", os.path.join(pod_dir, name))
        out[f"{kind}:{name}"] = int(json.loads(shown.stdout)["id"])
    return out


def _exists(key: str, ident: int) -> bool:
    return _bpftool(key.split(":")[0], "show", "id", str(ident)).returncode == 0


def test_ebpf_install_converges_and_remove_leaves_nothing(lab_cluster: MakeCluster) -> None:
    _, netns, cgroup = _pod(lab_cluster)
    before = netns_state(netns)
    first = ops.install(netns, SPEC, cgroup)
    assert first.changed
    installed = netns_state(netns)
    assert installed != before
    # eBPF mode puts no iptables / nft rules in the pod's netns.
    for view in ("iptables-save", "iptables-legacy-save", "nft list ruleset"):
        assert installed[view] == before[view], state_diff(before, installed)
    second = ops.install(netns, SPEC, cgroup)
    assert not second.changed, "a second install changed something"
    assert netns_state(netns) == installed, state_diff(installed, netns_state(netns))
    assert ops.verify(netns, SPEC, cgroup).ok
    assert ops.verify(netns, SPEC, None).ok  # the cgroup is found from the attachment

    pod_dir = ops.EbpfPaths().pod_dir(netns)
    ids = _ids(pod_dir)
    assert len(ids) == 12, ids  # 5 programs, 7 maps
    attached = json.loads(_bpftool("cgroup", "show", cgroup).stdout)
    assert {p["name"] for p in attached} == {"np_connect4", "np_connect6", "np_sockops"}

    report = ops.remove(netns, cgroup)
    assert any("np_connect4" in r for r in report.removed), report
    after = netns_state(netns)
    assert after == before, "remove left the pod changed:\n" + state_diff(before, after)
    assert not os.path.exists(pod_dir)
    assert _bpftool("cgroup", "show", cgroup).stdout.strip() in ("", "[]")
    # Programs and maps are freed once nothing holds them (RCU: not instantly).
    wait_until(lambda: not any(_exists(k, i) for k, i in ids.items()), 10,
               lambda: f"still in the kernel: {[k for k, i in ids.items() if _exists(k, i)]}")
    assert ops.remove(netns, cgroup).removed == ()  # twice is harmless


def test_ebpf_verify_reports_drift_and_install_repairs_it(lab_cluster: MakeCluster) -> None:
    cluster, netns, cgroup = _pod(lab_cluster)
    ops.install(netns, SPEC, cgroup)
    pod_dir = ops.EbpfPaths().pod_dir(netns)
    ids = _ids(pod_dir)

    # A missing program: someone detached connect4.
    detach = _bpftool("cgroup", "detach", cgroup, "connect4", "id", str(ids["prog:connect4"]))
    assert detach.returncode == 0, detach.stderr
    drift = ops.verify(netns, SPEC, cgroup)
    assert any(p.startswith("missing program: np_connect4") for p in drift.problems), drift
    # A missing tc filter on the pod's interface.
    iface = cluster.pods[0].iface
    subprocess.run(["ip", "netns", "exec", cluster.pods[0].netns, "tc", "filter", "del", "dev",
                    iface, "ingress"], check=True, capture_output=True)
    drift = ops.verify(netns, SPEC, cgroup)
    assert any(f"tc ingress of {iface}" in p for p in drift.problems), drift
    assert ops.install(netns, SPEC, cgroup).changed
    assert ops.verify(netns, SPEC, cgroup).ok

    # A foreign program: a second np_connect4 attached without our pins (e.g. an install
    # killed between attach and pin).
    stray = load(PodConfig(1, "10.0.0.1", 1, 2, 3, None, 0, 0, 0), programs=["connect4"])
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(stray.prog_fds["connect4"], fd, bpfsys.ATTACH_TYPES["connect4"],
                           "stray")
    finally:
        os.close(fd)
        stray.close()
    drift = ops.verify(netns, SPEC, cgroup)
    assert any(p.startswith("foreign program: np_connect4") for p in drift.problems), drift
    assert ops.install(netns, SPEC, cgroup).changed  # converges: the stray is detached
    assert ops.verify(netns, SPEC, cgroup).ok

    # A stale pin directory (programs attached nowhere) is removed by remove.
    ops.remove(netns, cgroup)
    os.makedirs(pod_dir)
    cfg = load(PodConfig(1, "10.0.0.1", 1, 2, 3, None, 0, 0, 0), programs=[])
    try:
        bpfsys.obj_pin(cfg.map_fds["config"], os.path.join(pod_dir, "config"))
    finally:
        cfg.close()
    assert "pins: config" in ops.show(netns, cgroup)
    removed = ops.remove(netns, cgroup)
    assert any("pins under" in r for r in removed.removed), removed
    assert not os.path.exists(pod_dir)


def test_ebpf_install_needs_the_pods_own_cgroup(lab_cluster: MakeCluster) -> None:
    _, netns, cgroup = _pod(lab_cluster)
    with pytest.raises(EbpfError, match="no cgroup given"):
        ops.install(netns, SPEC, None)
    with pytest.raises(EbpfError, match="not below the cgroup v2 root"):
        ops.install(netns, SPEC, "/sys/fs/cgroup/unified")  # never the root cgroup
    with pytest.raises(EbpfError, match="no IPv6 address outside lo"):
        ops.install(netns, RedirectSpec(ipv6=True), cgroup)  # the lab's pods are IPv4-only
    with pytest.raises(EbpfError, match="does not exist"):
        ops.install(netns, SPEC, pod_cgroup("np-none"))


def test_ebpf_missing_feature_names_it_and_suggests_iptables(tmp_path: Path) -> None:
    with pytest.raises(EbpfUnsupportedError, match="cgroup v2") as info:
        ops.preflight(ops.EbpfPaths(cgroup_root=str(tmp_path)))
    assert "--redirect iptables" in (info.value.hint or "")
    # No usable kernel headers: the agent refuses to start, naming them.
    env = {**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path / "no-headers"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", "from redirect.ebpf import ops; ops.preflight()"],
        capture_output=True, text=True, env=env, check=False, timeout=120)
    assert proc.returncode != 0
    assert "kernel headers bcc can compile against" in proc.stderr, proc.stderr[-2000:]


def test_ebpf_verifier_rejection_carries_the_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text(
        "#include <uapi/linux/bpf.h>\n"
        "BPF_HASH(np_config, int, u64, 1);\n"
        "int np_connect4(struct bpf_sock_addr *ctx) {\n"
        "    int zero = 0;\n"
        "    u64 *v = np_config.lookup(&zero);\n"
        "    ctx->user_port = (u16)*v;  /* no NULL check */\n"
        "    return 1;\n"
        "}\n")
    with pytest.raises(VerifierError) as info:
        load(PodConfig(0, "0.0.0.0", 1, 2, 3, None, 0, 0, 0), programs=["connect4"],
             source=bad)
    assert "map_value_or_null" in info.value.log
    assert "verifier log" in str(info.value)


RELAY = r"""
import json, socket, subprocess, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 15001)); l.listen(); print("listening", flush=True)
c, _ = l.accept()
data = b""
while not data.endswith(b"END"):
    chunk = c.recv(65536)
    if not chunk:
        break
    data += chunk
dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", sys.argv[1]],
                      capture_output=True, text=True)
print(json.dumps({"received": len(data), "dump": dump.stdout, "err": dump.stderr}), flush=True)
c.sendall(data.upper())
c.close()
"""
CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80), 5)
s.sendall(b"fast-" * 40000 + b"END")
got = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print(len(got), got == (b"fast-" * 40000 + b"END").upper())
"""


def test_ebpf_fastpath_short_circuits_the_app_agent_hop(lab_cluster: MakeCluster) -> None:
    from meshlab import cgroups
    from redirect.ebpf import fastpath

    cluster, netns, cgroup = _pod(lab_cluster)
    with pytest.raises(EbpfError, match="not below the cgroup v2 root"):
        fastpath.install("/sys/fs/cgroup/unified")  # never the root cgroup
    node_ns = cluster.nodes[0].netns
    [agent_cgroup] = cgroups.create([node_ns])  # the "agent": its own cgroup
    paths = fastpath.FastPaths()
    try:
        assert fastpath.install(agent_cgroup)
        assert not fastpath.install(agent_cgroup)  # converges
        assert ops.install(netns, SPEC, cgroup, fastpath=True).changed
        assert ops.verify(netns, SPEC, cgroup).ok  # the fast path is not drift
        fast_id = fastpath.sockops_id()
        relay = subprocess.Popen(
            cgroups.wrap(["nsenter", f"--net={netns}", sys.executable, "-c", RELAY,
                          os.path.join(paths.dir, "sockhash")], node_ns),
            stdout=subprocess.PIPE, text=True)
        try:
            assert relay.stdout is not None
            assert relay.stdout.readline().strip() == "listening"
            out = cluster.exec(cluster.pods[0].name,
                               [sys.executable, "-c", CLIENT, "10.200.0.1"], timeout=30)
            assert out.stdout.split() == ["200003", "True"], out.stdout + out.stderr
            seen = json.loads(relay.stdout.readline())
        finally:
            relay.wait(10)
            if relay.stdout is not None:
                relay.stdout.close()
        assert seen["received"] == 200003
        # Both ends of the connection were in the sockhash while it was open.
        keys = [bytes(int(b, 16) for b in e["key"]) for e in json.loads(seen["dump"])]
        ports = sorted(int.from_bytes(k[8:10], "little") for k in keys)
        assert len(keys) == 2, seen
        assert 15001 in ports, ports  # the agent's end (local 15001) and the app's end
        removed = ops.remove(netns, cgroup)
        assert any("np_fast_sockops" in r for r in removed.removed), removed
    finally:
        gone = fastpath.remove()
    assert any("np_fast_sockops" in r for r in gone), gone
    assert not os.path.exists(paths.dir)
    assert fast_id is not None
    wait_until(lambda: not _exists("prog:x", fast_id), 10, "np_fast_sockops still loaded")


def test_agent_start_up_names_the_missing_feature(tmp_path: Path) -> None:
    """`nodeproxy run --redirect ebpf` on a machine bcc cannot compile for: a clear error
    naming what is missing and the rule backends as the way out, before anything is
    enrolled."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "BCC_KERNEL_SOURCE": str(tmp_path / "none")}
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run([*cli, "ca", "init", "--dir", str(tmp_path / "ca")], env=env, check=True,
                   capture_output=True, timeout=60)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("workloads: []\n")
    proc = subprocess.run(
        [*cli, "run", "--config", str(cfg), "--node", "n1", "--dev-ca-dir",
         str(tmp_path / "ca"), "--redirect", "ebpf", "--state-dir", str(tmp_path / "state"),
         "--readiness-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
         "--admin-addr", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "kernel headers bcc can compile against" in err, err[-2000:]
    assert "--redirect iptables" in err, err[-2000:]


ORIGDST_SERVER = r"""
import json, socket, sys
from redirect.ebpf.origdst import OriginalDst
pod4, pod6, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
l4 = socket.socket(socket.AF_INET)
l6 = socket.socket(socket.AF_INET6)
l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
for lsock, addr in ((l4, pod4), (l6, pod6)):
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, 15001))
    lsock.listen()
    lsock.settimeout(15)
print("listening", flush=True)
lookup = OriginalDst()
for _ in range(count):
    which = sys.stdin.readline().strip()  # the client says which family comes next
    c, peer = (l6 if which == "6" else l4).accept()
    print(json.dumps({"peer": peer[0], "origdst": lookup(c)}), flush=True)
    c.close()
"""
INBOUND6 = r"""
import json, socket
l = socket.socket(socket.AF_INET6)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("::", 15006))
l.listen()
l.settimeout(15)
print("listening", flush=True)
c, _ = l.accept()
print(json.dumps(list(c.getsockname()[:2])), flush=True)
c.close()
"""
ORIGDST_CLIENT = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        s.recv(1)
        print(target, "connected", flush=True)
    except OSError as exc:
        print(target, "failed", type(exc).__name__, flush=True)
    s.close()
"""


def test_ebpf_ipv6_outbound_capture_keeps_the_original_destination(
        lab_cluster: MakeCluster) -> None:
    """np_connect6: an IPv6 connect from the pod's cgroup goes to [pod IPv6]:15001 with the
    original destination in ``origdst6``; an IPv4-mapped one (a dual-stack socket reaching an
    IPv4 address) to the pod's IPv4 listener with the original in ``origdst``, with or without
    IPv6 capture (the rule modes' IPv4 rules catch those packets too).  Without ``ipv6`` a
    native IPv6 connect is left alone, as the rule modes leave IPv6 alone.  Inbound IPv6 SYNs
    go to the agent's IPv6 listener (np_ingress), with IPv6 capture on."""
    cluster, netns, cgroup = _pod(lab_cluster)
    pod = cluster.pods[0]
    pod6 = "fd00:251::2"
    # The lab's pods have IPv6 off: turn it on and give this one an address.
    for argv in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"],
                 ["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=0"],
                 ["sysctl", "-qw", f"net.ipv6.conf.{pod.iface}.disable_ipv6=0"],
                 ["ip", "-6", "addr", "add", f"{pod6}/64", "dev", pod.iface, "nodad"],
                 ["ip", "-6", "route", "replace", "fd00:99::/64", "dev", pod.iface]):
        done = cluster.exec(pod.name, argv)
        assert done.returncode == 0, (argv, done.stderr)
    v6spec = RedirectSpec(ipv6=True)
    assert ops.install(netns, v6spec, cgroup).changed
    assert ops.verify(netns, v6spec, cgroup).ok
    attached = json.loads(_bpftool("cgroup", "show", cgroup).stdout)
    assert "np_connect6" in {p["name"] for p in attached}

    def run(targets: list[tuple[str, str]]) -> tuple[list[str], list[dict[str, object]]]:
        server = subprocess.Popen(
            ["nsenter", f"--net={netns}", sys.executable, "-c", ORIGDST_SERVER, pod.ip, pod6,
             str(sum(1 for _, fam in targets if fam))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert server.stdin is not None
        assert server.stdout is not None
        try:
            assert server.stdout.readline().strip() == "listening"
            lines, seen = [], []
            for target, family in targets:
                if family:
                    server.stdin.write(family + "\n")
                    server.stdin.flush()
                out = cluster.exec(pod.name, [sys.executable, "-c", ORIGDST_CLIENT, target])
                lines.append(out.stdout.strip())
                if family:
                    seen.append(json.loads(server.stdout.readline()))
        finally:
            server.stdin.close()
            server.wait(20)
            server.stdout.close()
        return lines, seen

    lines, seen = run([("fd00:99::1:80", "6"), ("::ffff:10.99.0.9:81", "4"),
                       ("10.99.0.9:82", "4")])
    assert lines == ["fd00:99::1:80 connected", "::ffff:10.99.0.9:81 connected",
                     "10.99.0.9:82 connected"], lines
    assert [s["origdst"] for s in seen] == [["fd00:99::1", 80], ["10.99.0.9", 81],
                                            ["10.99.0.9", 82]], seen
    assert [s["peer"] for s in seen] == [pod6, pod.ip, pod.ip], seen  # the pod's own address

    # Inbound IPv6: a SYN from the node to [pod]:8080 goes to the agent's [::]:15006 with the
    # original destination as the local address; with nothing listening there it is dropped.
    node_ns = f"/var/run/netns/{cluster.nodes[0].netns}"
    for argv in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"],
                 ["sysctl", "-qw", f"net.ipv6.conf.{pod.node_iface}.disable_ipv6=0"],
                 ["ip", "-6", "addr", "add", "fd00:251::1/64", "dev", pod.node_iface, "nodad"]):
        done = subprocess.run(["nsenter", f"--net={node_ns}", *argv], capture_output=True,
                              text=True, check=False, timeout=30)
        assert done.returncode == 0, (argv, done.stderr)

    def from_node(port: int) -> str:
        return subprocess.run(["nsenter", f"--net={node_ns}", sys.executable, "-c",
                               ORIGDST_CLIENT, f"{pod6}:{port}"], capture_output=True,
                              text=True, check=False, timeout=30).stdout.strip()

    assert from_node(8080).startswith(f"{pod6}:8080 failed TimeoutError"), "not dropped"
    inbound = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", INBOUND6],
                               stdout=subprocess.PIPE, text=True)
    assert inbound.stdout is not None
    try:
        assert inbound.stdout.readline().strip() == "listening"
        assert from_node(8080) == f"{pod6}:8080 connected"
        assert json.loads(inbound.stdout.readline()) == [pod6, 8080]
    finally:
        inbound.wait(20)
        inbound.stdout.close()

    # IPv6 capture off: IPv4-mapped still captured, native IPv6 left alone (not redirected:
    # nothing answers at fd00:99::1, so it fails instead of reaching the listener).
    assert ops.install(netns, SPEC, cgroup).changed
    lines, seen = run([("::ffff:10.99.0.9:83", "4"), ("fd00:99::1:84", "")])
    assert lines[0] == "::ffff:10.99.0.9:83 connected", lines
    assert lines[1].startswith("fd00:99::1:84 failed"), lines
    assert [s["origdst"] for s in seen] == [["10.99.0.9", 83]], seen
    ops.remove(netns, cgroup)
