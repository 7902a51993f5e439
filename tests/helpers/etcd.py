"""Real etcd processes for tests: one member or a cluster, optional TLS + client-cert auth.

Each member gets a data directory under the test's tmp dir and free ports (or fixed
addresses inside network namespaces, given by the caller); ``stop``/``kill``/``start`` let
fault tests take members down and bring them back; ``close`` stops everything.  Readiness is
polled (``etcdctl endpoint health``) with a deadline, never slept for.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.etcd_pki import EtcdPki

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def client_endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass
class EtcdCluster:
    members: list[Member]
    pki: EtcdPki | None = None
    extra_args: Sequence[str] = ()
    _started: set[str] = field(default_factory=set)

    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    def url(self, user: str = "admin", members: Sequence[Member] | None = None) -> str:
        """The ``etcd://`` URL nodeproxy takes, with the client certificate of ``user``."""
        eps = ",".join(m.client_endpoint() for m in (members or self.members))
        if self.pki is None:
            return f"etcd://{eps}"
        cert, key = self.pki.client(user)
        return f"etcd://{eps}?ca={self.pki.ca}&cert={cert}&key={key}&server-name=etcd"

    def _cluster_arg(self) -> str:
        return ",".join(f"{m.name}={self.scheme}://{m.host}:{m.peer_port}" for m in self.members)

    def _argv(self, m: Member, state: str) -> list[str]:
        argv = [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"{self.scheme}://{m.host}:{m.client_port}",
            "--advertise-client-urls", f"{self.scheme}://{m.host}:{m.client_port}",
            "--listen-peer-urls", f"{self.scheme}://{m.host}:{m.peer_port}",
            "--initial-advertise-peer-urls", f"{self.scheme}://{m.host}:{m.peer_port}",
            "--initial-cluster", self._cluster_arg(),
            "--initial-cluster-state", state,
            "--initial-cluster-token", "nodeproxy-test",
            # Fast failure detection for fault tests; big transactions for whole-state applies.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--max-txn-ops", "200000", "--max-request-bytes", str(64 * 1024 * 1024),
            "--quota-backend-bytes", str(2 * 1024 * 1024 * 1024),
            "--logger", "zap", "--log-outputs", str(m.log),
        ]
        if self.pki is not None:
            server_cert, server_key = self.pki.server(m.name)
            argv += [
                "--cert-file", str(server_cert), "--key-file", str(server_key),
                "--trusted-ca-file", str(self.pki.ca), "--client-cert-auth",
                "--peer-cert-file", str(server_cert), "--peer-key-file", str(server_key),
                "--peer-trusted-ca-file", str(self.pki.ca), "--peer-client-cert-auth",
            ]
        argv += list(self.extra_args)
        if m.netns is not None:
            argv = ["ip", "netns", "exec", m.netns, *argv]
        return argv

    def start(self, member: Member | None = None, timeout: float = 30.0) -> None:
        for m in [member] if member else self.members:
            state = "existing" if m.name in self._started else "new"
            m.proc = subprocess.Popen(self._argv(m, state), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            self._started.add(m.name)
        if member is None:
            self.wait_healthy(self.members, timeout)
        # A member started alone joins a cluster that may have no quorum yet: the caller
        # waits for what it needs.

    def wait_healthy(self, members: Sequence[Member], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            for m in members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise AssertionError(f"etcd {m.name} exited ({m.proc.returncode}): "
                                         f"{self.log_tail(m)}")
            probe = self.etcdctl(["endpoint", "health"], members=members, check=False,
                                 timeout=5)
            if probe.returncode == 0:
                return
            problem = (probe.stderr or probe.stdout).strip()
            time.sleep(0.05)
        raise AssertionError(f"etcd not healthy after {timeout} s: {problem}")

    def log_tail(self, m: Member, lines: int = 5) -> str:
        try:
            return " | ".join(m.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def etcdctl(self, args: Sequence[str], members: Sequence[Member] | None = None,
                user: str = "root", check: bool = True,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
        eps = ",".join(f"{self.scheme}://{m.client_endpoint()}" for m in (members or self.members))
        argv = [ETCDCTL, "--endpoints", eps, "--dial-timeout", "2s", "--command-timeout", "5s"]
        if self.pki is not None:
            cert, key = self.pki.client(user)
            argv += ["--cacert", str(self.pki.ca), "--cert", str(cert), "--key", str(key)]
        argv += list(args)
        netns = (members or self.members)[0].netns
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(argv, capture_output=True, text=True, check=check,
                              timeout=timeout, env=env)

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)

    def stop(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGTERM)
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait(10)

    def close(self) -> None:
        for m in self.members:
            self.stop(m)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)


def single(root: Path, pki: EtcdPki | None = None, host: str = "127.0.0.1") -> EtcdCluster:
    m = Member("m0", host, free_port(host), free_port(host), root / "m0.etcd", root / "m0.log")
    return EtcdCluster([m], pki)


def cluster(root: Path, hosts: Sequence[str], netns: Sequence[str | None] | None = None,
            pki: EtcdPki | None = None) -> EtcdCluster:
    members = []
    for i, host in enumerate(hosts):
        ns = netns[i] if netns else None
        client = 2379 if ns else free_port(host)
        peer = 2380 if ns else free_port(host)
        members.append(Member(f"m{i}", host, client, peer, root / f"m{i}.etcd",
                              root / f"m{i}.log", ns))
    return EtcdCluster(members, pki)


def setup_auth(c: EtcdCluster, nodes: Sequence[str], readers: Sequence[str] = ("ca",)) -> None:
    """The roles of docs/control-plane.md: admin writes config, each node reads it and writes
    its own registration key; then auth on (client-certificate CN = user)."""
    run = c.etcdctl
    run(["user", "add", "root", "--no-password"])
    run(["role", "add", "root"])
    run(["user", "grant-role", "root", "root"])
    run(["role", "add", "nodeproxy-admin"])
    run(["role", "grant-permission", "nodeproxy-admin", "readwrite", "--prefix", "/nodeproxy/"])
    run(["user", "add", "admin", "--no-password"])
    run(["user", "grant-role", "admin", "nodeproxy-admin"])
    run(["role", "add", "nodeproxy-reader"])
    run(["role", "grant-permission", "nodeproxy-reader", "read", "--prefix", "/nodeproxy/v1/"])
    for node in nodes:
        run(["role", "add", f"nodeproxy-node-{node}"])
        run(["role", "grant-permission", f"nodeproxy-node-{node}", "readwrite",
             f"/nodeproxy/nodes/v1/{node}"])
        run(["user", "add", node, "--no-password"])
        run(["user", "grant-role", node, "nodeproxy-reader"])
        run(["user", "grant-role", node, f"nodeproxy-node-{node}"])
    for reader in readers:  # e.g. the CA service: placement only
        run(["user", "add", reader, "--no-password"])
        run(["user", "grant-role", reader, "nodeproxy-reader"])
    run(["auth", "enable"])
