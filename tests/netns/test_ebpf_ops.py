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
    assert len(ids) == 9, ids
    attached = json.loads(_bpftool("cgroup", "show", cgroup).stdout)
    assert {p["name"] for p in attached} == {"np_connect4", "np_sockops"}

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
    with pytest.raises(EbpfError, match="does not implement: ipv6"):
        ops.install(netns, RedirectSpec(ipv6=True), cgroup)
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
