"""The pure part of the eBPF backend (redirect/ebpf/plan.py), table-driven."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from redirect.ebpf.errors import EbpfError, EbpfUnsupportedError, VerifierError
from redirect.ebpf.plan import (
    CONFIG_SIZE,
    MAPS,
    PROGRAMS,
    Observed,
    PodConfig,
    check_cgroup,
    drift,
    origdst6_key,
    origdst6_value,
    origdst_key,
    origdst_value,
    pod_config,
    pod_key,
    unsupported_spec,
)
from redirect.errors import RedirectError
from redirect.spec import RedirectSpec

ROOT = "/sys/fs/cgroup/unified"


@pytest.mark.parametrize(("netns", "key"), [
    ("/var/run/netns/np1a2b-n1p1", "np1a2b-n1p1"),
    ("/run/netns/pod_7", "pod_7"),
    ("/var/run/netns/with.dot", None),  # hashed: not a safe pin name
    ("/proc/123/ns/net", None),
    ("/var/run/netns/sub/dir", None),
])
def test_pod_key(netns: str, key: str | None) -> None:
    got = pod_key(netns)
    if key is None:
        assert got.startswith("ns-")
        assert len(got) == 19
        assert got == pod_key(netns)  # stable
    else:
        assert got == key


@pytest.mark.parametrize(("cgroup", "ok"), [
    (f"{ROOT}/nodeproxy-lab/np1-n1p1", True),
    (f"{ROOT}/kubepods/pod1/", True),
    (ROOT, False),  # never the root cgroup
    (f"{ROOT}/", False),
    ("/sys/fs/cgroup/memory/x", False),
    (None, False),
    ("", False),
])
def test_check_cgroup(cgroup: str | None, ok: bool) -> None:
    if ok:
        assert check_cgroup(cgroup, ROOT, "/n") == (cgroup or "").rstrip("/")
    else:
        with pytest.raises(EbpfError):
            check_cgroup(cgroup, ROOT, "/n")


def test_config_record_matches_struct_np_cfg() -> None:
    cfg = PodConfig(0x1122334455, "10.0.0.2", 0x539, 0x111, 0xFFF, "169.254.7.127",
                    15001, 15006, 15008)
    raw = cfg.pack()
    assert len(raw) == CONFIG_SIZE == 56  # sizeof(struct np_cfg)
    assert struct.unpack_from("<Q", raw)[0] == 0x1122334455
    assert raw[8:12] == bytes([10, 0, 0, 2])  # network order, as the kernel compares it
    assert struct.unpack_from("<HHH", raw, 28) == (15001, 15006, 15008)
    assert PodConfig.unpack(raw) == cfg
    assert raw[36:52] == bytes(16)  # pod_ip6: none, no IPv6 capture
    no_probe = PodConfig(1, "10.0.0.2", 1, 2, 3, None, 1, 2, 3)
    assert PodConfig.unpack(no_probe.pack()) == no_probe
    v6 = PodConfig(1, "10.0.0.2", 1, 2, 3, None, 1, 2, 3, "fd00:200::2")
    raw6 = v6.pack()
    assert raw6[36:52] == bytes.fromhex("fd000200000000000000000000000002")  # network order
    assert PodConfig.unpack(raw6) == v6


@pytest.mark.parametrize(("spec", "probe"), [
    (RedirectSpec(), "169.254.7.127"),
    (RedirectSpec(probe_source_ip=None), None),
    (RedirectSpec(probe_source_ip="fe80::1"), None),  # IPv4 programs only
])
def test_pod_config_from_spec(spec: RedirectSpec, probe: str | None) -> None:
    cfg = pod_config(spec, 7, "10.1.2.3")
    assert (cfg.netns_cookie, cfg.pod_ip4, cfg.probe_ip4) == (7, "10.1.2.3", probe)
    assert (cfg.outbound_port, cfg.inbound_port, cfg.hbone_port) == (15001, 15006, 15008)
    assert (cfg.proxy_mark, cfg.connmark, cfg.mark_mask) == (0x539, 0x111, 0xFFF)
    assert cfg.pod_ip6 is None


def test_pod_config_captures_ipv6_only_when_the_spec_asks() -> None:
    # As the rule modes: IPv6 connections are captured with ipv6 on, left alone without.
    assert pod_config(RedirectSpec(), 7, "10.1.2.3", "fd00::2").pod_ip6 is None
    assert pod_config(RedirectSpec(ipv6=True), 7, "10.1.2.3", "fd00::2").pod_ip6 == "fd00::2"
    with pytest.raises(EbpfError, match="IPv6 address"):
        pod_config(RedirectSpec(ipv6=True), 7, "10.1.2.3", None)


@pytest.mark.parametrize(("spec", "refused"), [
    (RedirectSpec(), ()),
    (RedirectSpec(exclude_uids=(0,), exclude_inbound_ports=(22,)), ()),
    (RedirectSpec(ipv6=True), ()),
    (RedirectSpec(capture_dns=True), ("capture_dns",)),
    (RedirectSpec(exclude_gids=(5,)), ("exclude_gids",)),
    (RedirectSpec(exclude_outbound_cidrs=("10.0.0.0/8",)), ("exclude_outbound_cidrs",)),
])
def test_unsupported_spec(spec: RedirectSpec, refused: tuple[str, ...]) -> None:
    got = unsupported_spec(spec)
    assert len(got) == len(refused)
    assert all(g.startswith(r) for g, r in zip(got, refused, strict=True))


def test_origdst_key_is_the_kernels_u32_then_port() -> None:
    # bpf_sock_ops.local_ip4 is the address's network-order bytes read as a native u32.
    assert origdst_key("10.99.0.1", 57154) == 0x100630ADF42
    assert origdst_value(bytes([10, 0, 0, 9, 0x1F, 0x90, 0, 0])) == ("10.0.0.9", 8080)


def test_origdst6_key_and_value_are_struct_np_key6_and_np_orig6() -> None:
    # np_key6: local_ip6 (network-order words = the address's bytes), then the source port as
    # a host-order u32; np_orig6: address bytes, port in network order, padding.
    key = origdst6_key("fd00::2", 57154)
    assert key == bytes.fromhex("fd000000000000000000000000000002") + struct.pack("=I", 57154)
    raw = bytes.fromhex("fd000099000000000000000000000001") + bytes([0x1F, 0x90, 0, 0])
    assert origdst6_value(raw) == ("fd00:99::1", 8080)


WANT = PodConfig(5, "10.0.0.2", 0x539, 0x111, 0xFFF, None, 15001, 15006, 15008)
ALL_PINS = frozenset(PROGRAMS) | frozenset(MAPS)
IDS = {"connect4": 11, "sockops": 12, "ingress": 13, "lo_mark": 14, "connect6": 15}
CG = (("cgroup_inet4_connect", 11, "np_connect4"), ("cgroup_sock_ops", 12, "np_sockops"),
      ("cgroup_inet6_connect", 15, "np_connect6"))
TC = (("lo", 14, "np_lo_mark"), ("eth0", 13, "np_ingress"))
GOOD = Observed(ALL_PINS, IDS, CG, TC, ("lo", "eth0"), WANT, True)


def _obs(**changes: object) -> Observed:
    fields = {f: getattr(GOOD, f) for f in Observed.__slots__}
    fields.update(changes)
    return Observed(**fields)  # type: ignore[arg-type,unused-ignore]


@pytest.mark.parametrize(("want", "seen", "expect"), [
    (WANT, GOOD, []),
    (WANT, _obs(pins=ALL_PINS - {"origdst"}), ["missing pins: origdst"]),
    (WANT, _obs(cgroup_progs=CG[1:]), ["missing program: np_connect4"]),
    (WANT, _obs(cgroup_progs=CG[:2]), ["missing program: np_connect6"]),
    (WANT, _obs(cgroup_progs=(*CG, ("cgroup_inet4_connect", 99, "np_connect4"))),
     ["foreign program: np_connect4 (id 99)"]),
    # another CNI's program on the same hook is coexistence, not drift
    (WANT, _obs(cgroup_progs=(*CG, ("cgroup_inet4_connect", 98, "cilium_sock4"))), []),
    (WANT, _obs(tc_progs=TC[:1]), ["missing program: np_ingress not on tc ingress of eth0"]),
    (WANT, _obs(tc_progs=(*TC, ("eth0", 77, "other"))), ["foreign program: other (id 77)"]),
    (WANT, _obs(config=None), ["config map is empty"]),
    (WANT, _obs(config=PodConfig(6, *[getattr(WANT, f) for f in PodConfig.__slots__[1:]])),
     ["config differs"]),
    (WANT, _obs(fwmark_accept=False), ["net.ipv4.tcp_fwmark_accept is 0"]),
    (None, Observed(frozenset(), {}, (), (), ("lo",), None, False), []),
    (None, Observed(frozenset({"config"}), {}, (), (), (), None, False), ["stale pins: config"]),
])
def test_drift(want: PodConfig | None, seen: Observed, expect: list[str]) -> None:
    got = drift(want, seen)
    assert len(got) == len(expect), got
    for problem, start in zip(got, expect, strict=True):
        assert problem.startswith(start), (problem, start)


def test_errors_are_redirect_errors_with_a_fallback_hint() -> None:
    missing = EbpfUnsupportedError("sock_ops programs", "EINVAL")
    assert isinstance(missing, RedirectError)
    assert "sock_ops programs" in str(missing)
    assert "--redirect iptables" in (missing.hint or "")
    refused = VerifierError("np_connect4", "Permission denied", "0: R1=ctx\ninvalid access")
    assert "invalid access" in str(refused)
    assert "np_connect4" in str(refused)


@pytest.mark.parametrize(("mounts", "root"), [
    # hybrid (this machine): v1 controllers under /sys/fs/cgroup, v2 at .../unified
    ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
     "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", "/sys/fs/cgroup/unified"),
    # unified (Debian 12 with systemd, the Vagrant guests)
    ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n", "/sys/fs/cgroup"),
    ("", "/sys/fs/cgroup/unified"),
])
def test_cgroup2_root(mounts: str, root: str) -> None:
    from redirect.ebpf.plan import cgroup2_root

    assert cgroup2_root(mounts) == root


def test_bpf_sources_of_a_checkout_or_an_installed_wheel(tmp_path: Path) -> None:
    from redirect.ebpf.loader import bpf_dir

    checkout, site, prefix = tmp_path / "repo", tmp_path / "site-packages", tmp_path / "venv"
    (checkout / "bpf").mkdir(parents=True)
    (checkout / "bpf" / "nodeproxy_redirect.c").write_text("")
    shared = prefix / "share" / "nodeproxy" / "bpf"  # pyproject's data-files
    shared.mkdir(parents=True)
    (shared / "nodeproxy_redirect.c").write_text("")
    assert bpf_dir(checkout, str(prefix)) == checkout / "bpf"
    assert bpf_dir(site, str(prefix)) == shared
    assert bpf_dir(site, str(tmp_path / "elsewhere")) == site / "bpf"  # "missing" names it
