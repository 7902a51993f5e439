"""Pods as cgroups: every lab pod's processes run in their own cgroup v2 directory under a
project-owned subtree, ``<cgroup2>/nodeproxy-lab/<pod netns name>`` (eBPF capture attaches
there; the workload names it in ``cgroup:``).  Teardown removes the directories and the eBPF
pins an agent left for the lab's pods (``<bpffs>/nodeproxy/<pod netns name>``), so nothing of
a lab outlives it.  Only names of lab namespaces (:func:`is_lab_netns`) are ever touched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import time
from collections.abc import Sequence


def _cgroup2_root() -> str:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return "/sys/fs/cgroup/unified"


CGROUP_ROOT = _cgroup2_root()  # /sys/fs/cgroup/unified here (hybrid), /sys/fs/cgroup (unified)
LAB_SUBTREE = "nodeproxy-lab"
BPF_PINS = "/sys/fs/bpf/nodeproxy"


def lab_root(root: str = CGROUP_ROOT) -> str:
    return os.path.join(root, LAB_SUBTREE)


def pod_cgroup(netns_name: str, root: str = CGROUP_ROOT) -> str:
    return os.path.join(lab_root(root), netns_name)


def available(root: str = CGROUP_ROOT) -> bool:
    return os.path.exists(os.path.join(root, "cgroup.procs"))


def create(netns_names: Sequence[str], root: str = CGROUP_ROOT) -> list[str]:
    """Create the pods' cgroups (nothing when there is no cgroup v2 hierarchy)."""
    if not available(root):
        return []
    made = []
    for name in netns_names:
        path = pod_cgroup(name, root)
        os.makedirs(path, exist_ok=True)
        made.append(path)
    return made


def wrap(argv: Sequence[str], netns_name: str, root: str = CGROUP_ROOT) -> list[str]:
    """``argv`` started inside the pod's cgroup (the shell moves itself, then execs)."""
    path = pod_cgroup(netns_name, root)
    if not os.path.isdir(path):
        return list(argv)
    return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', path, *argv]


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def remove(netns_names: Sequence[str], root: str = CGROUP_ROOT, grace: float = 2.0) -> None:
    """Remove the pods' cgroups (their processes are moved out first if any survived) and
    their eBPF pin directories."""
    for name in netns_names:
        path = pod_cgroup(name, root)
        if os.path.isdir(path):
            deadline = time.monotonic() + grace
            while True:
                for pid in _procs(path):
                    with contextlib.suppress(OSError), \
                            open(os.path.join(root, "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        pins = os.path.join(BPF_PINS, name)
        if os.path.isdir(pins):
            shutil.rmtree(pins, ignore_errors=True)
        with contextlib.suppress(OSError):  # empty once no lab or agent has pins left
            os.rmdir(BPF_PINS)


def leftovers(prefix_glob: str, root: str = CGROUP_ROOT) -> list[str]:
    """Cgroup and pin directories of labs whose prefix matches ``prefix_glob``."""
    from meshlab.build import is_lab_netns

    out = []
    for base in (lab_root(root), BPF_PINS):
        with contextlib.suppress(OSError):
            out += [os.path.join(base, n) for n in os.listdir(base)
                    if is_lab_netns(n, prefix_glob) and fnmatch.fnmatchcase(n, prefix_glob + "*")]
    return sorted(out)


def sweep(prefix_glob: str, root: str = CGROUP_ROOT) -> list[str]:
    found = leftovers(prefix_glob, root)
    remove(sorted({os.path.basename(p) for p in found}), root)
    return found
