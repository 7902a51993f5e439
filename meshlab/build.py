"""Build, use and tear down a namespace cluster planned by :mod:`meshlab.topology`.

Creation runs a handful of ``ip -batch`` processes (one per namespace, stages in parallel)
instead of one process per command.  Teardown is convergent: it works from whatever exists
on the system (every netns whose name starts with the prefix), so it also cleans up after a
creation that failed half way or a crashed run (:func:`sweep`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from linuxns import setns
from meshlab import cgroups
from meshlab.capture import Capture
from meshlab.topology import (
    NETNS_DIR,
    NODE_SYSCTLS,
    Batch,
    ClusterPlan,
    LabError,
    NodePlan,
    PodPlan,
    plan_more_pods,
    render_pod_stages,
    render_stages,
    without_pods,
)
from meshlab.web import (
    CurlResult,
    HttpApp,
    HttpReply,
    curl_argv,
    fetch_argv,
    parse_curl_results,
    parse_http_reply,
)

_IP_TIMEOUT = 30.0
_POD_SYSCTLS: tuple[tuple[str, str], ...] = (
    # No IPv6 on lab links: keeps router solicitations and DAD out of captures.
    ("net/ipv6/conf/default/disable_ipv6", "1"),
)


def _run_batches(batches: Sequence[Batch]) -> None:
    """Run independent ``ip -batch`` jobs in parallel; raise with the first failure."""
    procs = []
    for batch in batches:
        argv = ["ip"] + (["-n", batch.netns] if batch.netns else []) + ["-batch", "-"]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((batch, proc))
    failures = []
    for batch, proc in procs:
        try:
            _, err = proc.communicate("\n".join(batch.lines) + "\n", timeout=_IP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = f"timed out after {_IP_TIMEOUT:.0f}s"
        if proc.returncode != 0:
            failures.append(f"[{batch.netns or 'root'}] {err.strip()}")
    if failures:
        raise LabError(
            "building the namespace cluster failed: " + "; ".join(failures),
            hint="is this root with iproute2, veth and bridge support?",
        )


def write_sysctls(jobs: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> None:
    """Write /proc/sys values inside namespaces given by path, from one short-lived thread
    (setns changes only the calling thread; /proc/sys/net follows the opener's netns)."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for path, items in jobs:
                setns(path)  # raises linuxns.NetnsEnterError (an OSError) with the path
                for key, value in items:
                    with open(f"/proc/sys/{key}", "w") as fh:
                        fh.write(value)
        except BaseException as exc:  # reported to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=work, name="lab-sysctl", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise LabError(f"setting sysctls in the lab namespaces failed: {errors[0]}")


def list_netns(netns_dir: str = NETNS_DIR) -> list[str]:
    try:
        return sorted(os.listdir(netns_dir))
    except FileNotFoundError:
        return []


def netns_pids(names: Sequence[str], netns_dir: str = NETNS_DIR) -> list[int]:
    """Processes whose network namespace is one of ``names`` (like ``ip netns pids``, for
    many namespaces at once and without spawning anything)."""
    wanted = set()
    for name in names:
        try:
            st = os.stat(os.path.join(netns_dir, name))
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    pids: list[int] = []
    if not wanted:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry))
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie waits for its parent to reap it, e.g. a Popen the
    caller has not waited for yet; it holds no namespace)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_pids(pids: Sequence[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            alive = [p for p in alive if _running(p)]
            if not alive:
                return
            time.sleep(0.02)
        pids = alive


def remove_netns(names: Sequence[str], *, grace: float = 2.0) -> list[str]:
    """Kill what still runs inside ``names`` (processes keep a namespace and its veths
    alive after its name is gone), then delete the namespaces.  Returns what was removed."""
    pids = sorted(set(netns_pids(names)) - {os.getpid()})
    _kill_pids(pids, grace)
    removed = []
    if names:
        proc = subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns delete {n}\n" for n in names),
            capture_output=True, text=True, check=False,
        )
        del proc  # -force: keep deleting after a failure; the result is checked below
    existing = set(list_netns())
    for name in names:
        if name in existing:
            raise LabError(
                f"could not delete network namespace {name}",
                hint="is something holding it (mount, open fd)? try 'ip netns delete' by hand",
            )
        removed.append(name)
    return removed


_LAB_SUFFIX = re.compile(r"(fab|n[0-9]+|n[0-9]+p[0-9]+)")


def is_lab_netns(name: str, prefix_glob: str) -> bool:
    """Whether ``name`` is a lab namespace (``<prefix>fab``, ``<prefix>n1``,
    ``<prefix>n1p2``) of a prefix matching ``prefix_glob``; anything else is never touched."""
    for cut in range(len(name)):
        if _LAB_SUFFIX.fullmatch(name[cut:]) and fnmatch.fnmatchcase(name[:cut], prefix_glob):
            return True
    return False


def sweep(prefix_glob: str) -> list[str]:
    """Remove the lab namespaces of every prefix matching ``prefix_glob`` (an exact prefix
    such as ``np3fa9-`` or a glob such as ``np????-``), e.g. leftovers of crashed runs.
    Returns the names removed."""
    removed = remove_netns([n for n in list_netns() if is_lab_netns(n, prefix_glob)])
    cgroups.sweep(prefix_glob)
    return removed


class Cluster:
    """A built cluster.  Use as a context manager, or call :meth:`destroy`."""

    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan
        self._procs: list[subprocess.Popen[Any]] = []
        self._captures: list[Capture] = []

    @classmethod
    def create(cls, plan: ClusterPlan) -> Cluster:
        """Build ``plan``; on any failure everything already created is removed."""
        cluster = cls(plan)
        taken = [n for n in plan.all_netns() if n in set(list_netns())]
        if taken:
            raise LabError(
                f"network namespaces already exist: {', '.join(taken)}",
                hint=f"pick another prefix or run sweep({plan.prefix!r})",
            )
        try:
            stages = render_stages(plan)
            _run_batches(stages[0])
            write_sysctls(
                [(n.netns_path, NODE_SYSCTLS + _POD_SYSCTLS) for n in plan.nodes]
                + [(p.netns_path, _POD_SYSCTLS) for p in plan.pods]
                + [(plan.fabric_netns_path, _POD_SYSCTLS)]
            )
            for stage in stages[1:]:
                _run_batches(stage)
            cgroups.create([p.netns for p in plan.pods])
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    # -- growing and shrinking a running cluster -------------------------------------------

    def add_pods(self, node: str, count: int = 1) -> tuple[PodPlan, ...]:
        """Add ``count`` pods to ``node`` (next free indices, e.g. n2p4) and return them;
        on failure whatever was created of them is removed again.  :meth:`destroy` and
        :func:`sweep` remove them like the others (same prefix, same naming)."""
        plan, added = plan_more_pods(self.plan, node, count)
        taken = [p.netns for p in added if p.netns in set(list_netns())]
        if taken:
            raise LabError(f"network namespaces already exist: {', '.join(taken)}",
                           hint=f"a leftover of an earlier run? try sweep({self.prefix!r})")
        try:
            stages = render_pod_stages(plan, added)
            _run_batches(stages[0])
            write_sysctls([(p.netns_path, _POD_SYSCTLS) for p in added])
            for stage in stages[1:]:
                _run_batches(stage)
            cgroups.create([p.netns for p in added])
        except BaseException:
            remove_netns([p.netns for p in added if p.netns in set(list_netns())])
            cgroups.remove([p.netns for p in added])
            raise
        self.plan = plan
        return added

    def remove_pods(self, names: Sequence[str]) -> None:
        """Remove pods (and whatever still runs inside them) from the running cluster; their
        node-side veths and routes go with their namespaces."""
        pods = [self.plan.pod(n) for n in names]
        remove_netns([p.netns for p in pods])
        cgroups.remove([p.netns for p in pods])
        self.plan = without_pods(self.plan, [p.name for p in pods])

    # -- lookup ---------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self.plan.prefix

    @property
    def nodes(self) -> tuple[NodePlan, ...]:
        return self.plan.nodes

    @property
    def pods(self) -> tuple[PodPlan, ...]:
        return self.plan.pods

    def pod(self, name: str) -> PodPlan:
        return self.plan.pod(name)

    def node(self, name: str) -> NodePlan:
        return self.plan.node(name)

    def _netns(self, target: str) -> str:
        """Accept a netns name, a pod or node name, or "fabric"."""
        if target in ("fabric", self.plan.fabric_netns):
            return self.plan.fabric_netns
        if target in self.plan.all_netns():
            return target
        for pod in self.plan.pods:
            if target == pod.name:
                return pod.netns
        return self.plan.node(target).netns

    # -- running things inside ------------------------------------------------------------

    def exec(
        self, netns: str, argv: Sequence[str], **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``netns``; captures text output and times out after 30 s
        unless overridden."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        kw.setdefault("check", False)
        ns = self._netns(netns)
        return subprocess.run(cgroups.wrap(["ip", "netns", "exec", ns, *argv], ns), **kw)

    def popen(self, netns: str, argv: Sequence[str], *, host_mounts: bool = False,
              **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``netns`` (and, for a pod, inside its cgroup); the
        process is killed by :meth:`destroy`."""
        ns = self._netns(netns)
        if host_mounts:
            # nsenter keeps this mount namespace (``ip netns exec`` remounts /sys, which
            # hides bpffs and cgroup2: the eBPF-mode agent needs both).
            # In its own cgroup when the lab made one for this namespace (the fast path).
            cmd = cgroups.wrap(["nsenter", f"--net={NETNS_DIR}/{ns}", *argv], ns)
        else:
            cmd = cgroups.wrap(["ip", "netns", "exec", ns, *argv], ns)
        proc = subprocess.Popen(cmd, **kw)
        self._procs.append(proc)
        return proc

    def capture(
        self, netns: str, iface: str | None = None, bpf_filter: str = "tcp"
    ) -> Capture:
        """Start tcpdump on ``iface`` (default: the node's link to the fabric) inside
        ``netns``; returns once tcpdump is listening."""
        ns = self._netns(netns)
        if iface is None:
            iface = "eth0"
        cap = Capture.start(["ip", "netns", "exec", ns], iface, bpf_filter)
        self._captures.append(cap)
        return cap

    # -- traffic apps (meshlab.apps) --------------------------------------------------

    def serve(
        self, netns: str, port: int, *, tag: str | None = None, record: str | None = None,
        timeout: float = 10.0,
    ) -> subprocess.Popen[str]:
        """Start the echo server app inside ``netns`` and wait until it listens."""
        argv = [sys.executable, "-m", "meshlab.apps", "server", "--port", str(port),
                "--tag", tag or netns]
        if record is not None:
            argv += ["--record", record]
        proc = self.popen(netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._await_listening(proc, netns, port, timeout)
        return proc

    def _await_listening(self, proc: subprocess.Popen[str], netns: str, port: int,
                         timeout: float) -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if '"listening"' not in line:
            proc.kill()
            _, err = proc.communicate()
            raise LabError(
                f"app server in {netns} on port {port} did not start: "
                f"{(err or '').strip()[-500:]}",
                hint="is the port already taken in that namespace?",
            )

    def serve_http(
        self, netns: str, port: int, *, tag: str | None = None, record: str | Path,
        fail_percent: int = 0, fail_status: int = 503, delay_ms: int = 0,
        timeout: float = 10.0,
    ) -> HttpApp:
        """Start the HTTP app (``meshlab.apps http``) inside ``netns`` and wait until it
        listens.  Its behaviour can be changed later (:meth:`HttpApp.set`)."""
        tag = tag or netns
        argv = [sys.executable, "-m", "meshlab.apps", "http", "--port", str(port), "--tag", tag,
                "--fail-percent", str(fail_percent), "--fail-status", str(fail_status),
                "--delay-ms", str(delay_ms), "--record", str(record)]
        # stderr to a file: a pipe nobody reads could fill up and stall the app.
        errors = Path(f"{record}.stderr")
        with open(errors, "ab") as err:
            proc = self.popen(netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=err, text=True)
        try:
            self._await_listening(proc, netns, port, timeout)
        except LabError as exc:
            raise LabError(f"{exc.message} {errors.read_text(errors='replace').strip()[-500:]}",
                           hint=exc.hint) from None
        return HttpApp(proc, pod=netns, port=port, tag=tag, record=Path(record))

    def curl(
        self, netns: str, urls: Sequence[str], *, parallel: int = 0, method: str = "GET",
        headers: Sequence[str] = (), max_time: float = 10.0,
    ) -> list[CurlResult]:
        """Run curl inside ``netns``: one result per transfer (in completion order when
        ``parallel``).  Bodies are discarded; see :meth:`fetch` for one full reply."""
        argv = curl_argv(urls, parallel=parallel, method=method, headers=headers,
                         max_time=max_time)
        out = self.exec(netns, argv, timeout=max_time * max(len(urls), 1) + 30)
        results = parse_curl_results(out.stdout)
        if not results:
            raise LabError(f"curl in {netns} printed no result (exit {out.returncode}): "
                           f"{out.stderr.strip()[-500:]}")
        return results

    def fetch(
        self, netns: str, url: str, *, method: str = "GET", headers: Sequence[str] = (),
        max_time: float = 10.0,
    ) -> HttpReply:
        """One request with curl inside ``netns``; the whole reply (head and body)."""
        argv = fetch_argv(url, method=method, headers=headers, max_time=max_time)
        out = self.exec(netns, argv, text=False, timeout=max_time + 30)
        return parse_http_reply(out.stdout)

    def connect(
        self, netns: str, target: str, text: str = "hello", *, count: int = 1,
        timeout: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Run the client app inside ``netns`` against ``target`` (``ip:port``); one result
        dict per connection (see meshlab.apps)."""
        out = self.exec(
            netns,
            [sys.executable, "-m", "meshlab.apps", "client", "--connect", target,
             "--send", text, "--timeout", str(timeout), "--count", str(count)],
            timeout=timeout * count + 30,
        )
        results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if len(results) != count:
            raise LabError(
                f"client app in {netns} printed {len(results)} of {count} results: "
                f"{out.stderr.strip()[-500:]}"
            )
        return results

    # -- teardown -------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove everything of this cluster; safe to call twice or after a failed create."""
        for cap in self._captures:
            cap.close()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        remove_netns([n for n in list_netns() if is_lab_netns(n, self.prefix)])
        cgroups.remove([p.netns for p in self.plan.pods])
        cgroups.sweep(self.prefix)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
