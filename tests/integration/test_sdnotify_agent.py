"""The real agent (`nodeproxy run` in a subprocess) talks sd_notify to a fake systemd: READY=1
once started, STATUS= lines, WATCHDOG=1 pings at half of WATCHDOG_USEC, RELOADING=1 + READY=1
on SIGHUP, STOPPING=1 on SIGTERM, exit status 0.  Loopback (--no-redirect) mode, no root."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from nodeproxy.identity.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]

CONFIG = textwrap.dedent(
    """
    workloads:
    - uid: c1//Pod/default/sd-a
      name: sd-a
      namespace: default
      serviceAccount: sd
      workloadIps: ["127.0.9.1"]
      node: node1
      protocol: HBONE
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeSystemd:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[list[str]] = []

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
            self.seen.append(msg)
            if pred(msg):
                return msg
        raise AssertionError(f"no matching notification in {timeout} s; got {self.seen}")


def test_agent_notifies_systemd(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    fake = FakeSystemd(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    argv = [sys.executable, "-m", "cli.main", "run", "--no-redirect", "--config", str(cfg),
            "--node", "node1", "--dev-ca-dir", str(tmp_path / "ca"),
            "--readiness-addr", f"127.0.0.1:{_free_port()}",
            "--metrics-addr", f"127.0.0.1:{_free_port()}",
            "--admin-addr", f"127.0.0.1:{_free_port()}",
            "--hbone-port", str(_free_port()), "--outbound-port", str(_free_port()),
            "--inbound-port", str(_free_port()), "--drain-timeout", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ready = fake.wait_for(lambda m: "READY=1" in m, timeout=15)
        status = [line for line in ready if line.startswith("STATUS=")]
        assert status, ready
        assert "sd-a" in status[0] or "ready" in status[0], status  # the enrollment state
        # Watchdog: pings at ~100 ms; at least two within three intervals after READY.
        start = len([m for m in fake.seen if m == ["WATCHDOG=1"]])
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            fake.wait_for(lambda m: m == ["WATCHDOG=1"], timeout=1)
        assert len([m for m in fake.seen if m == ["WATCHDOG=1"]]) - start >= 2
        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        proc.send_signal(signal.SIGHUP)
        reloading = fake.wait_for(lambda m: "RELOADING=1" in m, timeout=10)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        fake.wait_for(lambda m: "READY=1" in m, timeout=10)
        # SIGTERM: STOPPING=1, then a clean exit.
        proc.send_signal(signal.SIGTERM)
        fake.wait_for(lambda m: "STOPPING=1" in m, timeout=10)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        fake.sock.close()
