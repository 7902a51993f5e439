"""Same-node fast path (bpf/nodeproxy_fastpath.c): one set per node, pinned under
``<bpffs>/nodeproxy/fastpath/``.

``install(agent_cgroup)`` loads the sockhash, its sk_msg verdict and the sock_ops program,
and attaches sock_ops to the agent's own cgroup (the agent's accepted sockets belong to it);
:func:`attach_pod` / :func:`detach_pod` add or take the same program on a pod's cgroup (the
app's end).  Optional: without it, bytes take the loopback hop.  The agent's cgroup must not
be the root of the hierarchy (we never attach there).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from redirect.ebpf import bpfsys
from redirect.ebpf.bpfsys import detected_cgroup_root
from redirect.ebpf.errors import EbpfError
from redirect.ebpf.loader import SOURCE, load_object, table_fd
from redirect.ebpf.plan import PIN_SUBDIR, check_cgroup
from redirect.runner import Runner, subprocess_runner

FAST_SOURCE = SOURCE.parent / "nodeproxy_fastpath.c"
PINS = ("sockops", "msg", "sockhash")
_SK_MSG_VERDICT = 7
_SOCK_OPS = 3
_PROG_SOCK_OPS, _PROG_SK_MSG = 13, 16


@dataclass(frozen=True, slots=True)
class FastPaths:
    bpffs: str = "/sys/fs/bpf"
    cgroup_root: str = field(default_factory=detected_cgroup_root)

    @property
    def dir(self) -> str:
        return os.path.join(self.bpffs, PIN_SUBDIR, "fastpath")


def own_cgroup(root: str | None = None, proc: str = "/proc") -> str:
    """This process's cgroup v2 directory."""
    root = root or detected_cgroup_root()
    for line in Path(f"{proc}/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return os.path.join(root, line[3:].lstrip("/")).rstrip("/") or root
    raise EbpfError("this process has no cgroup v2 membership",
                    hint="the fast path needs the unified (cgroup2) hierarchy")


def sockops_id(paths: FastPaths | None = None) -> int | None:
    return bpfsys.pinned_id(os.path.join((paths or FastPaths()).dir, "sockops"))


def installed(paths: FastPaths | None = None) -> bool:
    return sockops_id(paths) is not None


def install(agent_cgroup: str, paths: FastPaths | None = None, outbound_port: int = 15001,
            runner: Runner | None = None) -> bool:
    """Converge: the fast path loaded, pinned, attached to ``agent_cgroup``.  Returns whether
    anything changed."""
    paths = paths or FastPaths()
    run = runner or subprocess_runner
    cgroup = check_cgroup(agent_cgroup, paths.cgroup_root, "(agent)")
    bpfsys.ensure_bpffs(paths.bpffs, run)
    prog_id = sockops_id(paths)
    if prog_id is not None and any(
            i == prog_id for _k, i, _n in bpfsys.cgroup_programs(cgroup, run)):
        return False
    remove(paths, run)
    bpf = load_object(FAST_SOURCE, [f"-DNP_OUTBOUND_PORT={outbound_port}"])
    try:
        sockops = bpf.load_func(b"np_fast_sockops", _PROG_SOCK_OPS)
        msg = bpf.load_func(b"np_fast_msg", _PROG_SK_MSG)
        sockhash = table_fd(bpf, "np_sockhash")
        bpfsys.prog_attach(msg.fd, sockhash, _SK_MSG_VERDICT, "np_fast_msg to its sockhash",
                           flags=0)
        os.makedirs(paths.dir, exist_ok=True)
        for name, fd in (("sockops", sockops.fd), ("msg", msg.fd), ("sockhash", sockhash)):
            bpfsys.obj_pin(fd, os.path.join(paths.dir, name))
        _attach(os.path.join(paths.dir, "sockops"), cgroup)
    except Exception:
        remove(paths, run)
        raise
    finally:
        with contextlib.suppress(Exception):
            bpf.cleanup()
    return True


def _attach(pin: str, cgroup: str) -> None:
    prog_fd = bpfsys.obj_get(pin)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(prog_fd, cg_fd, _SOCK_OPS, f"np_fast_sockops to cgroup {cgroup}")
    finally:
        os.close(cg_fd)
        os.close(prog_fd)


def attach_pod(cgroup: str, paths: FastPaths | None = None,
               runner: Runner | None = None) -> bool:
    """Attach the fast path's sock_ops to a pod's cgroup too (no-op if there already)."""
    paths = paths or FastPaths()
    prog_id = sockops_id(paths)
    if prog_id is None:
        raise EbpfError("the same-node fast path is not installed",
                        hint="start the agent with --ebpf-fastpath")
    if any(i == prog_id for _k, i, _n in
           bpfsys.cgroup_programs(cgroup, runner or subprocess_runner)):
        return False
    _attach(os.path.join(paths.dir, "sockops"), cgroup)
    return True


def remove(paths: FastPaths | None = None, runner: Runner | None = None) -> list[str]:
    """Detach the fast path's sock_ops from every cgroup and unpin everything."""
    paths = paths or FastPaths()
    run = runner or subprocess_runner
    removed: list[str] = []
    prog_id = sockops_id(paths)
    if prog_id is not None:
        for cgroup, _kind, _i in bpfsys.cgroups_with({prog_id}, paths.cgroup_root, run):
            _detach(os.path.join(paths.dir, "sockops"), cgroup)
            removed.append(f"np_fast_sockops from cgroup {cgroup}")
    if os.path.isdir(paths.dir):
        removed.append(f"pins under {paths.dir}")
    bpfsys.remove_pin_dir(paths.dir)
    return removed


def detach_pod(cgroup: str, paths: FastPaths | None = None,
               runner: Runner | None = None) -> bool:
    paths = paths or FastPaths()
    prog_id = sockops_id(paths)
    if prog_id is None or not os.path.isdir(cgroup):
        return False
    if not any(i == prog_id for _k, i, _n in
               bpfsys.cgroup_programs(cgroup, runner or subprocess_runner)):
        return False
    _detach(os.path.join(paths.dir, "sockops"), cgroup)
    return True


def _detach(pin: str, cgroup: str) -> None:
    prog_fd = bpfsys.obj_get(pin)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_detach(prog_fd, cg_fd, _SOCK_OPS, f"np_fast_sockops from {cgroup}")
    finally:
        os.close(cg_fd)
        os.close(prog_fd)
