"""Run a real mesh on a lab cluster: a CA service in the fabric netns, one agent per node, and
waypoint proxies in pods.

Used by ``nodeproxy demo`` and by the netns test suite.  Every process is started through the
cluster (so ``Cluster.destroy`` ends it even after a crash) and logs to a file in ``workdir``.
A waypoint runs inside its pod's netns (the pod is the waypoint workload, which agents do not
capture) with the credentials of that pod's node: the CA service issues the waypoint's
certificate to that node only (node-restricted issuance).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meshlab.build import Cluster
from meshlab.topology import LabError
from nodeproxy.netns import NetnsWorker

CA_PORT = 15012
NODEPROXY = [sys.executable, "-m", "cli.main"]


class Mesh:
    def __init__(self, cluster: Cluster, workdir: Path, *, backend: str = "iptables",
                 log_level: str = "info", log_format: str = "text",
                 extra_agent_args: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.backend = backend
        self.log_level = log_level
        self.log_format = log_format
        self.extra_agent_args = extra_agent_args
        self.config_path = workdir / "cluster.yaml"
        self.ca_dir = workdir / "ca"
        self.ca_ip = cluster.plan.fabric_ip
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.waypoints: dict[str, subprocess.Popen[bytes]] = {}  # by pod short name
        self.ca_proc: subprocess.Popen[bytes] | None = None
        self._workers: dict[str, NetnsWorker] = {}

    # -- setup ----------------------------------------------------------------------------
    def write_config(self, doc: Mapping[str, Any]) -> None:
        """Atomically replace the config (agents and the CA service watch it)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
        os.replace(tmp, self.config_path)

    def write_raw_config(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*NODEPROXY, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LabError(f"nodeproxy {' '.join(args[:2])} failed: {proc.stderr.strip()}")

    def reload_counts(self, node: str) -> tuple[int, int]:
        """(ok, failed) config reloads of the agent of ``node`` (or of a pod's waypoint)."""
        reloads = self.config_dump(node).get("configReloads", {})
        return int(reloads.get("ok", 0)), int(reloads.get("failed", 0))

    def apply_config(self, doc: Mapping[str, Any], *, also: tuple[str, ...] = (),
                     timeout: float = 10.0) -> None:
        """Write ``doc`` and wait until every agent (and the waypoints in the pods listed in
        ``also``) has loaded it; a rejection fails at once with the log."""
        watchers = (*(n.name for n in self.cluster.nodes), *also)
        before = {w: self.reload_counts(w) for w in watchers}
        self.write_config(doc)
        deadline = time.monotonic() + timeout
        pending = set(watchers)
        while pending:
            for who in list(pending):
                ok, failed = self.reload_counts(who)
                if failed > before[who][1]:
                    raise LabError(f"{who} rejected the new config:\n{self._tail_of(who)}")
                if ok > before[who][0]:
                    pending.discard(who)
            if pending and time.monotonic() > deadline:
                raise LabError(f"config not loaded after {timeout:g} s by "
                               f"{', '.join(sorted(pending))}:\n"
                               + "\n".join(self._tail_of(w) for w in sorted(pending)))
            if pending:
                time.sleep(0.05)

    def enrolled(self, node: str) -> list[str]:
        return sorted(self.config_dump(node).get("enrolled", []))

    def wait_enrolled(self, want: Mapping[str, list[str]], timeout: float = 30.0) -> None:
        """Until each node's agent has enrolled exactly the uids in ``want`` (see
        ``meshlab.config.captured_workloads``); enrolment follows a reload asynchronously."""
        nodes = [n.name for n in self.cluster.nodes]
        deadline = time.monotonic() + timeout
        while True:
            got = {n: self.enrolled(n) for n in nodes}
            if all(got[n] == sorted(want.get(n, [])) for n in nodes):
                return
            if time.monotonic() > deadline:
                raise LabError(f"enrolled {got}, want {dict(want)} after {timeout:g} s:\n"
                               + "\n".join(self.log_tail(n) for n in nodes))
            time.sleep(0.05)

    def _tail_of(self, who: str) -> str:
        if any(who == n.name for n in self.cluster.nodes):
            return self.log_tail(who)
        return self.waypoint_log_tail(who)

    def start(self, doc: Mapping[str, Any], *, wait: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config(doc)
        self._run("ca", "init", "--dir", str(self.ca_dir))
        for node in self.cluster.nodes:
            self._run(
                "ca", "issue-node", "--dir", str(self.ca_dir), "--node", node.name,
                "--out-cert", str(self.workdir / f"{node.name}-cert.pem"),
                "--out-key", str(self.workdir / f"{node.name}-key.pem"),
                "--out-bundle", str(self.workdir / "bundle.pem"), "--force",
            )
        log = open(self.workdir / "ca.log", "wb")  # noqa: SIM115 - owned by the process
        self.ca_proc = self.cluster.popen(
            "fabric",
            [*NODEPROXY, "--log-level", self.log_level, "ca", "serve", "--dir", str(self.ca_dir),
             "--config", str(self.config_path), "--listen", f"{self.ca_ip}:{CA_PORT}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        self._wait_port("fabric", self.ca_ip, CA_PORT, wait, self.workdir / "ca.log")
        for node in self.cluster.nodes:
            self.start_agent(node.name)
        self.wait_ready(wait)

    def start_agent(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"agent-{node}.log", "ab")  # noqa: SIM115
        proc = self.cluster.popen(
            node,
            [*NODEPROXY, "--log-level", self.log_level, "--log-format", self.log_format, "run",
             "--config", str(self.config_path), "--node", node,
             "--ca-address", f"https://{self.ca_ip}:{CA_PORT}",
             "--node-cert", str(self.workdir / f"{node}-cert.pem"),
             "--node-key", str(self.workdir / f"{node}-key.pem"),
             "--ca-bundle", str(self.workdir / "bundle.pem"),
             "--state-dir", str(self.workdir / f"state-{node}"),
             "--redirect", self.backend, "--drain-timeout", "1",
             *self.extra_agent_args, *extra],
            stdout=log, stderr=subprocess.STDOUT, host_mounts=self.backend == "ebpf",
        )
        self.agents[node] = proc
        return proc

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        proc = self.agents.pop(node)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    # -- waypoints ------------------------------------------------------------------------
    def start_waypoint(self, pod: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
        """Start ``nodeproxy waypoint run`` for the waypoint ``name`` (``ns/name`` under
        ``waypoints:``) inside ``pod``'s netns, listening on the pod's IP.  Returns at once;
        see :meth:`wait_waypoint_ready`."""
        plan = self.cluster.pod(pod)
        if plan.name in self.waypoints and self.waypoints[plan.name].poll() is None:
            raise LabError(f"a waypoint already runs in {plan.name}",
                           hint="stop it first (stop_waypoint)")
        log = open(self.waypoint_log_path(plan.name), "ab")  # noqa: SIM115 - owned by the process
        try:
            proc = self.cluster.popen(
                plan.name,
                [*NODEPROXY, "--log-level", self.log_level, "--log-format", self.log_format,
                 "waypoint", "run", "--config", str(self.config_path), "--name", name,
                 "--node", plan.node, "--listen-ip", plan.ip,
                 "--ca-address", f"https://{self.ca_ip}:{CA_PORT}",
                 "--node-cert", str(self.workdir / f"{plan.node}-cert.pem"),
                 "--node-key", str(self.workdir / f"{plan.node}-key.pem"),
                 "--ca-bundle", str(self.workdir / "bundle.pem"),
                 "--drain-timeout", "1", *extra],
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()  # the child has its own copy
        self.waypoints[plan.name] = proc
        return proc

    def wait_waypoint_ready(self, pod: str, timeout: float = 30.0) -> None:
        """Until the waypoint in ``pod`` answers 200 on :15021/healthz/ready inside the pod's
        netns; fails at once if it exited, with its log."""
        short = self.cluster.pod(pod).name
        deadline = time.monotonic() + timeout
        while True:
            proc = self.waypoints.get(short)
            if proc is None:
                raise LabError(f"no waypoint was started in {short}")
            if proc.poll() is not None:
                raise LabError(f"waypoint in {short} exited with {proc.returncode}:\n"
                               + self.waypoint_log_tail(short))
            status, body = self.http(short, 15021, "/healthz/ready", timeout=1.0)
            if status == 200:
                return
            if time.monotonic() > deadline:
                detail = self.http(short, 15000, "/healthz/ready", timeout=1.0)
                raise LabError(f"waypoint in {short} not ready after {timeout:.0f} s: "
                               f"{status} {body.strip()[:200]} (admin: {detail})\n"
                               + self.waypoint_log_tail(short))
            time.sleep(0.1)

    def stop_waypoint(self, pod: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        short = self.cluster.pod(pod).name
        proc = self.waypoints.pop(short)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def waypoint_log_path(self, pod: str) -> Path:
        return self.workdir / f"waypoint-{self.cluster.pod(pod).name}.log"

    def waypoint_log_tail(self, pod: str, lines: int = 30) -> str:
        path = self.waypoint_log_path(pod)
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- observation ----------------------------------------------------------------------
    def _netns_path(self, netns: str) -> str:
        """The path of a netns given as "fabric", a node name or a pod name."""
        plan = self.cluster.plan
        if netns == "fabric":
            return plan.fabric_netns_path
        if any(netns in (p.name, p.netns) for p in plan.pods):
            return self.cluster.pod(netns).netns_path
        return self.cluster.node(netns).netns_path

    def _worker(self, netns: str) -> NetnsWorker:
        path = self._netns_path(netns)
        if path not in self._workers:
            self._workers[path] = NetnsWorker(path)
        return self._workers[path]

    def release(self, netns: str) -> None:
        """Close this process's helper thread in ``netns`` (a thread inside a namespace
        keeps it alive: release a pod before removing it)."""
        worker = self._workers.pop(self._netns_path(netns), None)
        if worker is not None:
            worker.close()

    def http(self, node: str, port: int, path: str, method: str = "GET",
             timeout: float = 5.0) -> tuple[int, str]:
        """An HTTP request to 127.0.0.1:PORT inside a node's (or a pod's) netns."""
        url = f"http://127.0.0.1:{port}{path}"

        def fetch() -> tuple[int, str]:
            req = urllib.request.Request(url, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        return self._worker(node).call(fetch)

    def ready(self, node: str) -> bool:
        return self.http(node, 15021, "/healthz/ready", timeout=1.0)[0] == 200

    def wait_ready(self, timeout: float = 30.0, nodes: tuple[str, ...] | None = None) -> None:
        names = nodes or tuple(n.name for n in self.cluster.nodes)
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for node in list(pending):
                proc = self.agents.get(node)
                if proc is not None and proc.poll() is not None:
                    raise LabError(f"agent on {node} exited with {proc.returncode}:\n"
                                   + self.log_tail(node))
                if self.ready(node):
                    pending.discard(node)
            if pending and time.monotonic() > deadline:
                # The public port says only "N of M pods enrolled"; the admin API says which.
                detail = {n: self.http(n, 15000, "/healthz/ready", timeout=1.0) for n in pending}
                raise LabError(f"agents not ready after {timeout:.0f} s: {detail}\n"
                               + "\n".join(self.log_tail(n) for n in pending))
            if pending:
                time.sleep(0.1)

    def metrics(self, node: str) -> str:
        """``/metrics`` of the agent of ``node``, or of the waypoint in a pod."""
        status, body = self.http(node, 15020, "/metrics")
        if status != 200:
            raise LabError(f"metrics of {node}: HTTP {status} {body[:200]}")
        return body

    def config_dump(self, node: str) -> dict[str, Any]:
        """``/config_dump`` of the agent of ``node``, or of the waypoint in a pod."""
        status, body = self.http(node, 15000, "/config_dump")
        if status != 200:
            raise LabError(f"config_dump of {node}: HTTP {status} {body[:200]}")
        return dict(json.loads(body))

    def log_tail(self, node: str, lines: int = 30) -> str:
        path = self.workdir / f"agent-{node}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def log(self, node: str) -> str:
        path = self.workdir / f"agent-{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_port(self, netns: str, ip: str, port: int, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout

        def probe() -> bool:
            with contextlib.closing(socket.socket()) as s:
                s.settimeout(0.5)
                return s.connect_ex((ip, port)) == 0

        worker = self._worker(netns)
        while not worker.call(probe):
            if self.ca_proc is not None and self.ca_proc.poll() is not None:
                raise LabError(f"CA service exited: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"nothing listens on {ip}:{port} in {netns} after {timeout} s")
            time.sleep(0.05)

    # -- teardown -------------------------------------------------------------------------
    def detach(self) -> None:
        """Release this process's helper threads; the CA service and agents keep running."""
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def stop(self) -> None:
        for pod in list(self.waypoints):
            with contextlib.suppress(Exception):
                self.stop_waypoint(pod)
        for node in list(self.agents):
            with contextlib.suppress(Exception):
                self.stop_agent(node)
        if self.ca_proc is not None and self.ca_proc.poll() is None:
            self.ca_proc.terminate()
            try:
                self.ca_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.ca_proc.kill()
                self.ca_proc.wait()
        self.detach()
