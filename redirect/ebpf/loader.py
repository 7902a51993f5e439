"""Compile bpf/nodeproxy_redirect.c with bcc and load its programs and maps for one pod.

bcc is imported here only (Debian's python3-bpfcc).  A kernel or machine that lacks what the
programs need gives an :class:`EbpfUnsupportedError` naming it; a verifier rejection gives a
:class:`VerifierError` carrying the verifier's log (obtained by loading the program again in
a child process, whose stderr bcc writes the log to, so the agent's own stderr is untouched).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redirect.ebpf.bpfsys import fd_id
from redirect.ebpf.errors import EbpfError, EbpfUnsupportedError, VerifierError
from redirect.ebpf.plan import MAPS, PROGRAMS, PodConfig

_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages when installed


def bpf_dir(root: Path = _ROOT, prefix: str = sys.prefix) -> Path:
    """bpf/ of the checkout; an installed wheel puts the sources in its data files,
    ``<prefix>/share/nodeproxy/bpf`` (pyproject's data-files), not next to the packages."""
    for candidate in (root / "bpf", Path(prefix) / "share" / "nodeproxy" / "bpf"):
        if (candidate / "nodeproxy_redirect.c").exists():
            return candidate
    return root / "bpf"


SOURCE = bpf_dir() / "nodeproxy_redirect.c"
MERGED_HEADERS = "/usr/src/nodeproxy-bcc-headers"  # scripts/ensure-bcc-headers.sh
# bcc program types / expected attach types (enum bpf_prog_type, bpf_attach_type)
_PROG_TYPES = {"connect4": (18, 10), "connect6": (18, 11), "sockops": (13, -1),
               "ingress": (3, -1), "lo_mark": (3, -1)}
_FEATURES = {
    "connect4": "cgroup/connect4 programs (CONFIG_CGROUP_BPF, bpf_get_netns_cookie: 5.7+)",
    "connect6": "cgroup/connect6 programs (CONFIG_CGROUP_BPF, bpf_get_netns_cookie: 5.7+)",
    "sockops": "sock_ops programs (CONFIG_CGROUP_BPF)",
    "ingress": "tc programs with bpf_sk_assign (CONFIG_NET_CLS_BPF, 5.7+)",
    "lo_mark": "tc programs (CONFIG_NET_CLS_BPF)",
}


def kernel_source_env() -> None:
    """Point bcc at the merged headers tree when the running kernel has none of its own."""
    if "BCC_KERNEL_SOURCE" in os.environ:
        return
    if os.path.isdir(f"/lib/modules/{platform.release()}/build/include"):
        return
    if os.path.isdir(MERGED_HEADERS):
        os.environ["BCC_KERNEL_SOURCE"] = MERGED_HEADERS


def _bcc() -> Any:
    kernel_source_env()
    try:
        import bcc  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as exc:
        raise EbpfUnsupportedError("the bcc Python package", str(exc),
                                   hint="apt-get install python3-bpfcc (make does it)") from None
    return bcc


@dataclass
class LoadedPod:
    """The programs and maps of one pod, loaded but not yet pinned or attached."""

    bpf: Any
    prog_fds: dict[str, int] = field(default_factory=dict)
    map_fds: dict[str, int] = field(default_factory=dict)

    def ids(self) -> dict[str, int]:
        return {name: fd_id(fd) for name, fd in self.prog_fds.items()}

    def close(self) -> None:
        """Drop our fds; pinned and attached objects stay in the kernel."""
        with contextlib.suppress(Exception):  # best effort; fds close with the object
            self.bpf.cleanup()


def table_fd(bpf: Any, name: str) -> int:
    """fd of a map of a compiled object (bcc's Python tables do not know every map type,
    e.g. sockhash)."""
    from bcc.libbcc import lib  # type: ignore[import-not-found,import-untyped,unused-ignore]

    fd = int(lib.bpf_table_fd(bpf.module, name.encode()))
    if fd < 0:
        raise EbpfError(f"BPF object has no map {name}")
    return fd


def load_object(source: Path, cflags: Iterable[str] = ()) -> Any:
    """Compile ``source`` with bcc (a ``bcc.BPF``), errors translated."""
    return _compile(_bcc(), source, tuple(cflags))


def _compile(bcc: Any, source: Path, cflags: tuple[str, ...] = ()) -> Any:
    if not source.exists():
        raise EbpfError(f"BPF source {source} is missing", hint="reinstall nodeproxy")
    try:
        return bcc.BPF(src_file=str(source).encode(), cflags=["-w", *cflags])
    except Exception as exc:
        src = os.environ.get("BCC_KERNEL_SOURCE", f"/lib/modules/{platform.release()}/build")
        raise EbpfUnsupportedError(
            "kernel headers bcc can compile against",
            f"compiling {source.name} failed ({exc}); headers looked up in {src}",
            hint="run 'make' (installs linux-headers-amd64 and merges them with "
                 "scripts/ensure-bcc-headers.sh)") from None


def _load_error(name: str, exc: Exception, source: Path) -> EbpfError:
    log = verifier_log(PROGRAMS[name][0], source)
    if "processed" in log or "R1" in log or "invalid" in log.lower():
        return VerifierError(PROGRAMS[name][0], str(exc), log, source=source.name)
    return EbpfUnsupportedError(_FEATURES[name], f"loading {PROGRAMS[name][0]} failed: {exc}"
                                + (f"\n{log.strip()}" if log.strip() else ""))


def load(config: PodConfig, skip_inbound: Iterable[int] = (), skip_uids: Iterable[int] = (),
         programs: Iterable[str] = tuple(PROGRAMS), source: Path = SOURCE) -> LoadedPod:
    bcc = _bcc()
    bpf = _compile(bcc, source)
    loaded = LoadedPod(bpf)
    for name in programs:
        func, _where = PROGRAMS[name]
        ptype, atype = _PROG_TYPES[name]
        try:
            fn = bpf.load_func(func.encode(), ptype, attach_type=atype)
        except Exception as exc:
            loaded.close()
            raise _load_error(name, exc, source) from None
        loaded.prog_fds[name] = fn.fd
    import ctypes

    for pin, table in MAPS.items():
        loaded.map_fds[pin] = bpf[table.encode()].map_fd
    cfg = bpf[b"np_config"]
    leaf = cfg.Leaf()
    raw = config.pack()
    ctypes.memmove(ctypes.addressof(leaf), raw, min(len(raw), ctypes.sizeof(leaf)))
    cfg[cfg.Key(0)] = leaf
    one = ctypes.c_uint8(1)
    for port in skip_inbound:
        bpf[b"np_skip_inbound"][ctypes.c_uint16(port)] = one
    for uid in skip_uids:
        bpf[b"np_skip_uid"][ctypes.c_uint32(uid)] = one
    return loaded


def verifier_log(func: str, source: Path = SOURCE) -> str:
    """Load ``func`` alone in a child process and return what bcc printed (the verifier log
    when the kernel refused it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT),
                                                      env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "redirect.ebpf.loader", str(source), func],
                              capture_output=True, text=True, timeout=120, env=env,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(could not obtain the verifier log: {exc})"
    return proc.stderr.split("Traceback (most recent call last)")[0]


def _main(argv: list[str]) -> int:
    bcc = _bcc()
    source, func = argv
    names = {f: name for name, (f, _) in PROGRAMS.items()}
    ptype, atype = _PROG_TYPES[names[func]]
    bpf = bcc.BPF(src_file=source.encode(), cflags=["-w"], debug=bcc.DEBUG_BPF)
    bpf.load_func(func.encode(), ptype, attach_type=atype)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
