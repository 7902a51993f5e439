"""Thin layer over the bpf(2) syscall (pin, get, attach, detach, map lookup) and bpftool /
tc for listings.  Everything here raises :class:`EbpfError` naming the object and errno."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import struct
from collections.abc import Sequence

from redirect.ebpf.errors import EbpfError, EbpfUnsupportedError
from redirect.runner import Runner, run_in, subprocess_runner

_NR_BPF = 321  # x86_64
_MAP_LOOKUP_ELEM, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM = 1, 2, 3
_OBJ_PIN, _OBJ_GET, _PROG_ATTACH, _PROG_DETACH = 6, 7, 8, 9
BPF_F_ALLOW_MULTI = 2
ATTACH_TYPES = {"connect4": 10, "connect6": 11, "sockops": 3}  # pin name -> enum bpf_attach_type
_BPF_FS_MAGIC = "bpf"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    ret = _libc.syscall(_NR_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise EbpfError(f"{what}: {os.strerror(err)}", hint="this needs root (CAP_BPF, "
                        "CAP_NET_ADMIN, CAP_SYS_ADMIN)") from OSError(err, os.strerror(err))
    return int(ret)


def obj_get(path: str) -> int:
    """A new fd for the pinned object at ``path`` (caller closes)."""
    raw = path.encode() + b"\0"
    cbuf = ctypes.create_string_buffer(raw)
    return _bpf(_OBJ_GET, struct.pack("=QII", ctypes.addressof(cbuf), 0, 0),
                f"cannot open pinned BPF object {path}")


def obj_pin(fd: int, path: str) -> None:
    cbuf = ctypes.create_string_buffer(path.encode() + b"\0")
    _bpf(_OBJ_PIN, struct.pack("=QII", ctypes.addressof(cbuf), fd, 0),
         f"cannot pin BPF object at {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, what: str,
                flags: int = BPF_F_ALLOW_MULTI) -> None:
    _bpf(_PROG_ATTACH, struct.pack("=IIII", target_fd, prog_fd, attach_type, flags),
         f"cannot attach {what}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    _bpf(_PROG_DETACH, struct.pack("=IIII", target_fd, prog_fd, attach_type, 0),
         f"cannot detach {what}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    attr = struct.pack("=IIQQQ", fd, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), 0)
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    if _libc.syscall(_NR_BPF, _MAP_LOOKUP_ELEM, buf, 128) < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise EbpfError(f"BPF map lookup failed: {os.strerror(err)}")
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(_MAP_UPDATE_ELEM,
         struct.pack("=IIQQQ", fd, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), 0),
         "BPF map update failed")


def map_delete(fd: int, key: bytes) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = struct.pack("=IIQ", fd, 0, ctypes.addressof(kbuf))
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    _libc.syscall(_NR_BPF, _MAP_DELETE_ELEM, buf, 128)  # absent already: fine


def fd_id(fd: int, proc: str = "/proc") -> int:
    """The kernel id of the BPF program or map behind ``fd`` (from fdinfo)."""
    with open(f"{proc}/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("prog_id", "map_id"):
                return int(value)
    raise EbpfError(f"fd {fd} is not a BPF program or map")


def pinned_id(path: str) -> int | None:
    try:
        fd = obj_get(path)
    except EbpfError:
        return None
    try:
        return fd_id(fd)
    finally:
        os.close(fd)


def detected_cgroup_root(mounts: str = "/proc/self/mounts") -> str:
    """Where this machine mounts the cgroup v2 hierarchy."""
    from redirect.ebpf.plan import cgroup2_root

    try:
        with open(mounts) as f:
            return cgroup2_root(f.read())
    except OSError:
        return cgroup2_root("")


# -- bpffs -------------------------------------------------------------------------------------

def bpffs_mounted(root: str, mounts: str = "/proc/self/mounts") -> bool:
    with open(mounts) as f:
        return any(len(p := line.split()) > 2 and p[1] == root and p[2] == _BPF_FS_MAGIC
                   for line in f)


def remove_pin_dir(path: str) -> None:
    """Remove ``path`` (a pin directory) and then its parent (``<bpffs>/nodeproxy``) if that is
    left empty, so that a removal leaves nothing of ours in bpffs."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    with contextlib.suppress(OSError):  # other pods' pins are still there, or it is gone
        os.rmdir(os.path.dirname(path))


def ensure_bpffs(root: str, runner: Runner = subprocess_runner) -> None:
    """Mount a bpffs at ``root`` unless one is there (pins must outlive the agent)."""
    if bpffs_mounted(root):
        return
    os.makedirs(root, exist_ok=True)
    result = runner(["mount", "-t", "bpf", "bpf", root])
    if result.returncode != 0 and not bpffs_mounted(root):
        raise EbpfUnsupportedError("a BPF filesystem (bpffs)",
                                   f"mount -t bpf bpf {root} failed: {result.stderr.strip()}",
                                   hint="is CONFIG_BPF_SYSCALL set and are we root?")


# -- listings (bpftool, tc) --------------------------------------------------------------------

def _json(runner: Runner, argv: Sequence[str], what: str) -> object:
    result = runner(list(argv))
    if result.returncode != 0:
        hint = ("apt-get install bpftool" if result.returncode == 127
                else "is the path right, and are we root?")
        raise EbpfError(f"{what}: '{' '.join(argv)}' failed: {result.stderr.strip()}",
                        hint=hint)
    text = result.stdout.strip()
    return json.loads(text) if text else []


def cgroup_programs(cgroup: str, runner: Runner = subprocess_runner
                    ) -> tuple[tuple[str, int, str], ...]:
    """(attach type, program id, name) of every program attached to ``cgroup`` itself."""
    data = _json(runner, ["bpftool", "-j", "cgroup", "show", cgroup],
                 f"cannot list the programs on cgroup {cgroup}")
    assert isinstance(data, list)
    return tuple((str(p.get("attach_type")), int(p["id"]), str(p.get("name", "")))
                 for p in data if isinstance(p, dict) and "id" in p)


def cgroups_with(prog_ids: set[int], root: str, runner: Runner = subprocess_runner
                 ) -> list[tuple[str, str, int]]:
    """(cgroup path, attach type, id) of every attachment of ``prog_ids`` under ``root``."""
    data = _json(runner, ["bpftool", "-j", "cgroup", "tree", root],
                 f"cannot list cgroup attachments under {root}")
    found: list[tuple[str, str, int]] = []
    assert isinstance(data, list)
    for entry in data:
        if not isinstance(entry, dict):
            continue
        for prog in entry.get("programs", []):
            if int(prog.get("id", -1)) in prog_ids:
                path = str(entry.get("cgroup", ""))
                found.append((path, str(prog.get("attach_type")), int(prog["id"])))
    return found


def detach_by_id(cgroup: str, kind: str, prog_id: int, runner: Runner = subprocess_runner
                 ) -> None:
    result = runner(["bpftool", "cgroup", "detach", cgroup, _BPFTOOL_TYPES.get(kind, kind),
                     "id", str(prog_id)])
    if result.returncode != 0:
        raise EbpfError(f"cannot detach program id {prog_id} ({kind}) from {cgroup}: "
                        f"{result.stderr.strip()}")


# bpftool prints libbpf's attach type names but parses its own short ones
_BPFTOOL_TYPES = {"cgroup_inet4_connect": "connect4", "cgroup_inet6_connect": "connect6",
                  "cgroup_sock_ops": "sock_ops"}


def tc_programs(netns: str, iface: str, runner: Runner = subprocess_runner
                ) -> tuple[tuple[int, str], ...]:
    """(program id, name) of the bpf filters at our preference on ``iface``'s tc ingress."""
    from redirect.ebpf.plan import TC_PREF

    result = runner(["nsenter", f"--net={netns}", "tc", "-j", "filter", "show", "dev", iface,
                     "ingress", "pref", str(TC_PREF)])
    if result.returncode != 0 or not result.stdout.strip():
        return ()  # no clsact qdisc, or no filter there
    out: list[tuple[int, str]] = []
    for item in json.loads(result.stdout):
        opts = item.get("options") or {}
        prog = opts.get("prog") or {}
        if "id" in prog:
            out.append((int(prog["id"]), str(prog.get("name", opts.get("bpf_name", "")))))
    return tuple(out)


def tc_attach(netns: str, iface: str, pin: str, runner: Runner = subprocess_runner) -> None:
    from redirect.ebpf.plan import TC_HANDLE, TC_PREF

    qd = runner(["nsenter", f"--net={netns}", "tc", "qdisc", "add", "dev", iface, "clsact"])
    if qd.returncode != 0 and "File exists" not in qd.stderr and "Exclusivity" not in qd.stderr:
        raise EbpfError(f"cannot add a clsact qdisc on {iface} in netns {netns}: "
                        f"{qd.stderr.strip()}", netns=netns,
                        hint="is CONFIG_NET_SCH_INGRESS (clsact) available?")
    run_in(runner, netns, ["tc", "filter", "replace", "dev", iface, "ingress", "pref",
                           str(TC_PREF), "handle", str(TC_HANDLE), "bpf", "direct-action",
                           "object-pinned", pin],
           hint="is CONFIG_NET_CLS_BPF available?")


def tc_detach(netns: str, iface: str, runner: Runner = subprocess_runner) -> bool:
    """Delete our filter; the clsact qdisc too when nothing else is left on it."""
    from redirect.ebpf.plan import TC_PREF

    had = bool(tc_programs(netns, iface, runner))
    if had:
        run_in(runner, netns, ["tc", "filter", "del", "dev", iface, "ingress", "pref",
                               str(TC_PREF)])
    left = [runner(["nsenter", f"--net={netns}", "tc", "filter", "show", "dev", iface, d])
            for d in ("ingress", "egress")]
    if had and all(r.returncode == 0 and not r.stdout.strip() for r in left):
        runner(["nsenter", f"--net={netns}", "tc", "qdisc", "del", "dev", iface, "clsact"])
    return had
