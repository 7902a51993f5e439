"""The runner: build the cluster, start the CA service and the agents
(:class:`meshlab.mesh.Mesh`), start the apps, drive the scenario's traffic with captures
running, collect the observations, report, and tear everything down (also on Ctrl-C, SIGTERM
or failure) unless asked to keep it."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from meshlab.build import Cluster, is_lab_netns, list_netns, sweep
from meshlab.config import render_config
from meshlab.demo.l7 import L7Observations, L7Scenario, build_l7_scenario, check_l7, render_l7
from meshlab.demo.observe import (
    Connection,
    LogTail,
    Observations,
    PodInfo,
    WireCapture,
    await_records,
    certificates_from_dump,
    check,
    describe_pods,
    new_connections,
    summarize_metrics,
)
from meshlab.demo.report import Style, render_next_steps, render_report
from meshlab.demo.scenario import (
    DEMO_GLOB,
    DEMO_STEM,
    WORKDIR_STEM,
    Intent,
    Scenario,
    build_scenario,
    marker_for,
)
from meshlab.topology import ClusterSpec, plan_cluster, random_prefix

if TYPE_CHECKING:
    from meshlab.mesh import Mesh


@dataclass(frozen=True, slots=True)
class DemoOptions:
    nodes: int = 2
    backend: str = "iptables"
    keep: bool = False
    color: bool = False
    prefix: str | None = None
    workdir_root: str | None = None  # default: the system temp dir
    scenario: Scenario | None = None  # default: build_scenario(nodes)
    l7: L7Scenario | None = None  # default: build_l7_scenario()
    l7_act: bool = True  # the L7 act (a waypoint joins the mesh) after the L4 one


@dataclass(slots=True)
class DemoResult:
    exit_code: int
    prefix: str
    workdir: Path
    problems: list[str] = field(default_factory=list)
    observations: Observations | None = None
    l7: L7Observations | None = None
    seconds: float = 0.0


class Progress:
    """``[1/6] building namespaces ... ok (0.1 s)`` lines."""

    def __init__(self, out: TextIO, total: int, style: Style,
                 clock: Callable[[], float] = time.monotonic, tag: str = "") -> None:
        self.out, self.total, self.st, self.clock = out, total, style, clock
        self.tag = tag  # e.g. "L7 ": "[L7 1/3] ..." for the steps of an act
        self.n = 0
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, text: str, label: str) -> Iterator[None]:
        self.n += 1
        self.out.write(f"[{self.tag}{self.n}/{self.total}] {text} ... ")
        self.out.flush()
        started = self.clock()
        try:
            yield
        except BaseException:
            self.out.write(self.st.red("failed") + f" ({self.clock() - started:.1f} s)\n")
            self.out.flush()
            raise
        took = self.clock() - started
        self.timings.append((label, took))
        self.out.write(self.st.green("ok") + f" ({took:.2f} s)\n" if took < 1
                       else self.st.green("ok") + f" ({took:.1f} s)\n")
        self.out.flush()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM tears down like Ctrl-C does (only possible from the main thread)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Teardown must finish even if Ctrl-C is pressed again."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Build, start, drive, report, and (unless ``keep``) tear down.  The report goes to
    ``out``; the exit code is non-zero when the mesh misbehaved."""
    from meshlab.mesh import Mesh  # imports the agent-side helpers; only when running

    st = Style(options.color)
    scenario = options.scenario or build_scenario(options.nodes)
    prefix = options.prefix or random_prefix(DEMO_STEM)
    plan = plan_cluster(ClusterSpec(prefix, scenario.nodes, scenario.pods_per_node))
    root = options.workdir_root or tempfile.gettempdir()
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_STEM}{prefix}", dir=root))
    progress = Progress(out, 6, st)
    started = time.monotonic()
    result = DemoResult(1, prefix, workdir)
    cluster: Cluster | None = None
    mesh: Mesh | None = None
    keep = False
    pods = describe_pods(plan, scenario.roles)
    try:
        with _sigterm_as_interrupt():
            with progress.step(f"building namespaces ({scenario.nodes} nodes, "
                               f"{len(plan.pods)} pods, prefix {prefix})", "namespaces"):
                cluster = Cluster.create(plan)
            doc = render_config(plan, scenario.roles, scenario.services, scenario.policies)
            mesh = Mesh(cluster, workdir, backend=options.backend, log_format="json")
            with progress.step(f"starting the CA service and {scenario.nodes} agents "
                               f"(redirect: {options.backend}), waiting until ready", "mesh"):
                mesh.start(doc)
            with progress.step(f"starting {len(scenario.servers)} echo apps in the pods",
                               "apps"):
                records = {}
                for pod, port in scenario.servers:
                    rec = workdir / f"received-{pod}-{port}.bin"
                    cluster.serve(pod, port, tag=pod, record=str(rec))
                    records[(pod, port)] = rec
            total = sum(s.count for s in scenario.steps)
            with progress.step(f"sending {total} connections, tcpdump on every node link",
                               "traffic"):
                conns, captures = _drive(cluster, scenario, pods, records, workdir, prefix)
            with progress.step("reading access logs, /metrics and /config_dump", "collect"):
                metrics, certs = [], []
                for node in cluster.nodes:
                    metrics += summarize_metrics(node.name, mesh.metrics(node.name))
                    certs += certificates_from_dump(node.name, mesh.config_dump(node.name))
            obs = Observations(
                prefix=prefix, backend=options.backend,
                nodes=tuple((n.name, n.ip) for n in plan.nodes), pods=pods,
                services=scenario.services, policies=scenario.policies, steps=scenario.steps,
                connections=tuple(conns), captures=tuple(captures), metrics=tuple(metrics),
                certificates=tuple(certs), timings=tuple(progress.timings),
            )
            problems = check(obs)
            result.observations, result.problems = obs, problems
            result.exit_code = 1 if problems else 0
            out.write(render_report(obs, problems, color=options.color))
            if options.l7_act:
                l7 = options.l7 or build_l7_scenario()
                l7_obs = _l7_act(cluster, mesh, scenario, l7, workdir, out, st)
                l7_problems = check_l7(l7, l7_obs)
                out.write(render_l7(l7, l7_obs, l7_problems, color=options.color))
                result.l7 = l7_obs
                result.problems = problems + [f"L7 act: {p}" for p in l7_problems]
                result.exit_code = 1 if result.problems else 0
            keep = options.keep
    finally:
        with _uninterruptible():
            if keep and cluster is not None:
                progress.n = progress.total
                out.write(f"[{progress.n}/{progress.total}] keeping the cluster, agents and "
                          f"apps running\n")
                if mesh is not None:
                    mesh.detach()  # threads only; agents keep running
                out.write(render_next_steps(prefix, workdir, [n.name for n in plan.nodes],
                                            pods))
            else:
                progress.n = progress.total - 1
                with progress.step("tearing everything down", "teardown"):
                    if mesh is not None:
                        mesh.stop()
                    if cluster is not None:
                        cluster.destroy()
                    sweep(prefix)  # also when Cluster.create failed half way
                if result.exit_code == 0:
                    shutil.rmtree(workdir, ignore_errors=True)
                else:
                    out.write(f"agent logs and config kept in {workdir}\n")
            result.seconds = time.monotonic() - started
            out.write(st.dim(f"total {result.seconds:.1f} s") + "\n")
            out.flush()
    return result


def _l7_act(cluster: Cluster, mesh: Mesh, scenario: Scenario, l7: L7Scenario, workdir: Path,
            out: TextIO, st: Style) -> L7Observations:
    """Add the waypoint and its backends to the running mesh, send the act's requests, and
    remove the act again (also on failure), so that the cluster is the L4 act's after it."""
    from meshlab.demo.l7_run import L7Act  # agent-side helpers, only when running

    progress = Progress(out, 3, st, tag="L7 ")
    act = L7Act(cluster, mesh, scenario, l7, workdir)
    started = time.monotonic()
    names = ", ".join(role.name or "?" for _node, role in l7.pods)
    try:
        out.write("\n")
        with progress.step(f"adding {len(l7.pods)} pods ({names}) and "
                           f"{len(l7.services)} services to the running mesh, starting the "
                           f"waypoint and {len(l7.apps)} HTTP apps", "l7-setup"):
            act.add()
        with progress.step(f"sending {l7.request_count} HTTP requests from {l7.client} "
                           "through the waypoint (curl)", "l7-traffic"):
            obs = act.drive(started)
    finally:
        with progress.step("removing the act: waypoint stopped, config back, its pods "
                           "deleted", "l7-teardown"):
            act.remove()
    return obs


def _drive(
    cluster: Cluster, scenario: Scenario, pods: Sequence[PodInfo],
    records: Mapping[tuple[str, int], Path], workdir: Path, prefix: str,
) -> tuple[list[Connection], list[WireCapture]]:
    """Make every connection of the scenario, one at a time, with captures running."""
    nodes = [n.name for n in cluster.nodes]
    tail = LogTail(workdir, nodes)
    tail.skip_to_end()
    caps = {n: cluster.capture(n) for n in nodes}
    by_short = {p.pod: p for p in pods}
    conns: list[Connection] = []
    seq = 0
    try:
        for index, step in enumerate(scenario.steps):
            src = by_short[step.src]
            if step.intent is Intent.SERVICE:
                svc = next(s for s in scenario.services if s.name == step.dst)
                target = f"{svc.vip}:{step.port}"
            else:
                target = f"{by_short[step.dst].ip}:{step.port}"
            for _ in range(step.count):
                seq += 1
                marker = marker_for(prefix, seq, step)
                [res] = cluster.connect(step.src, target, marker, timeout=3.0)
                recs = await_records(tail, src.node, pods)
                got = any(marker.encode() in path.read_bytes()
                          for path in records.values() if path.exists())
                conns.append(Connection(
                    step=index, seq=seq, marker=marker, target=target,
                    client_ok=bool(res.get("ok")), client_error=res.get("error"),
                    answered=res.get("tag") is not None, seen_from=res.get("seen_from"),
                    client_sent=int(res.get("bytes_sent") or 0),
                    client_received=int(res.get("bytes_received") or 0),
                    app_got_marker=got, records=recs,
                ))
    finally:
        results = {n: cap.stop() for n, cap in caps.items()}
    markers = [c.marker for c in conns]
    captures = [
        WireCapture(n, "eth0", len(r.packets), new_connections(r.packets),
                    frozenset(m for m in markers if r.contains(m.encode())))
        for n, r in results.items()
    ]
    return conns, captures


def teardown_leftovers(prefix_glob: str = DEMO_GLOB, workdir_root: str | None = None
                       ) -> tuple[list[str], list[str]]:
    """``nodeproxy demo --down``: remove the namespaces (and everything running in them) and
    the workdirs of demos left running with ``--keep``.  Returns (namespaces, workdirs)."""
    removed = sweep(prefix_glob)
    root = workdir_root or tempfile.gettempdir()
    dirs = []
    for path in sorted(glob.glob(os.path.join(root, f"{WORKDIR_STEM}{prefix_glob}*"))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            dirs.append(path)
    return removed, dirs


def leftover_netns(prefix_glob: str = DEMO_GLOB) -> list[str]:
    return [n for n in list_netns() if is_lab_netns(n, prefix_glob)]
