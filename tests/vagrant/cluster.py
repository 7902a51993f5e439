"""Drive the Vagrant cluster over ssh (the config written by ``vagrant ssh-config``, with a
ControlMaster so each command costs one channel, not one handshake, under TCG)."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

NODE_OF_POD = {"client-0": "node1", "intruder-0": "node1", "echo-0": "node2",
               "web-v1": "node2", "web-v2": "node2"}
POD_IP = {"client-0": "10.251.1.2", "intruder-0": "10.251.1.3", "echo-0": "10.251.2.2",
          "web-v1": "10.251.2.3", "web-v2": "10.251.2.4"}
ECHO_PORT = 8080
HBONE_PORT = 15008
# Every pod's cgroup v2 directory is <this>/pv-<pod> (pods.sh, cluster.yaml's ``cgroup:``).
POD_CGROUPS = "/sys/fs/cgroup/nodeproxy-lab"


def in_pod(pod: str) -> str:
    """Shell prefix that runs a command as a process of ``pod``: in its cgroup (eBPF mode
    captures outbound connections by cgroup) and in its network namespace.  The shell moves
    itself into the cgroup first: ``ip netns exec`` remounts /sys, hiding cgroup2 from the
    command."""
    return f"echo $$ > {POD_CGROUPS}/pv-{pod}/cgroup.procs && ip netns exec pv-{pod} "


@dataclass(frozen=True, slots=True)
class Result:
    rc: int
    out: str
    err: str


class Cluster:
    def __init__(self, ssh_config: str) -> None:
        self.ssh_config = ssh_config

    def sh(self, vm: str, script: str, *, check: bool = True, timeout: float = 180) -> Result:
        """Run ``script`` with bash as root on ``vm``."""
        proc = subprocess.run(
            ["ssh", "-F", self.ssh_config, vm, "sudo", "bash", "-s"],
            input=script, text=True, capture_output=True, timeout=timeout, check=False,
        )
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and res.rc != 0:
            raise AssertionError(f"{vm}: exit {res.rc}\n$ {script}\n{res.out}\n{res.err}")
        return res

    def pod(self, pod: str, args: str, *, timeout: float = 180) -> Result:
        """Run the pod test app as a process of ``pod`` (its cgroup and network namespace)
        on its node."""
        return self.sh(
            NODE_OF_POD[pod],
            f"{in_pod(pod)}python3 /opt/npv-test/podnet.py {args}",
            check=False, timeout=timeout,
        )

    def echo(self, src: str, dst: str, message: str) -> Result:
        return self.pod(src, f"echo {POD_IP[dst]} {ECHO_PORT} {shlex.quote(message)}")

    def http_get(self, vm: str, url: str) -> tuple[int, str]:
        script = (
            "python3 - <<'PY'\n"
            "import urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen({url!r}, timeout=5); print(r.status); "
            "print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n"
            "except OSError:\n    print(0)\n"
            "PY\n"
        )
        out = self.sh(vm, script, check=False).out
        status, _, body = out.partition("\n")
        return int(status or 0), body

    def wait_ready(self, vm: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http_get(vm, "http://127.0.0.1:15021/healthz/ready")[0] == 200:
                return
            time.sleep(2)
        journal = self.sh(vm, "journalctl -u nodeproxy --no-pager -n 40", check=False).out
        raise AssertionError(f"agent on {vm} not ready after {timeout:.0f} s\n{journal}")

    def journal(self, vm: str, unit: str) -> str:
        return self.sh(vm, f"journalctl -u {unit} -b --no-pager -o cat").out

    def unit_props(self, vm: str, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(vm, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).out
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def marker() -> str:
    return f"NPV-MARKER-{secrets.token_hex(8)}"


def cross_vm_hbone_only(cluster: Cluster) -> None:
    """client-0 (node1) -> echo-0 (node2) echoes, and a capture on node2's private NIC sees
    TLS towards 15008, nothing on the app port, never the message."""
    # Capture everything on node2's private NIC while client-0 (node1) talks to echo-0 (node2).
    cluster.sh("node2", """
        rm -f /tmp/npv-cap.pcap
        systemctl reset-failed npv-cap 2>/dev/null || true
        systemd-run -q --unit=npv-cap tcpdump -i eth1 -nn -U -s 0 -w /tmp/npv-cap.pcap tcp
        for i in $(seq 50); do [ -s /tmp/npv-cap.pcap ] && break; sleep 0.2; done
        sleep 1
    """)
    secret = marker()
    try:
        res = cluster.echo("client-0", "echo-0", secret)
    finally:
        cluster.sh("node2", "sleep 1; systemctl stop npv-cap", check=False)
    assert res.rc == 0, f"client-0 -> echo-0 failed: {res.out}{res.err}"
    assert res.out.strip() == secret

    summary = cluster.sh("node2", f"""
        echo hbone=$(tcpdump -r /tmp/npv-cap.pcap -nn 'tcp port {HBONE_PORT}' 2>/dev/null | wc -l)
        echo plain=$(tcpdump -r /tmp/npv-cap.pcap -nn 'tcp port {ECHO_PORT}' 2>/dev/null | wc -l)
        # TLS handshake records (content type 0x16) opening a payload towards 15008
        echo tls=$(tcpdump -r /tmp/npv-cap.pcap -nn \\
          'tcp dst port {HBONE_PORT} and tcp[((tcp[12]&0xf0)>>2)] = 0x16' 2>/dev/null | wc -l)
        echo marker=$(grep -ac {secret} /tmp/npv-cap.pcap)
        echo pods=$(tcpdump -r /tmp/npv-cap.pcap -nn \\
          'host {POD_IP["client-0"]} and host {POD_IP["echo-0"]}' 2>/dev/null | wc -l)
    """, check=False).out
    counts = dict(line.split("=", 1) for line in summary.split())
    assert int(counts["pods"]) > 0, f"no pod traffic crossed eth1: {counts}"
    assert int(counts["hbone"]) > 0, f"no HBONE (15008) traffic on eth1: {counts}"
    assert int(counts["tls"]) > 0, f"no TLS handshake towards 15008: {counts}"
    assert int(counts["plain"]) == 0, f"plaintext to the app port crossed the wire: {counts}"
    assert int(counts["marker"]) == 0, "the marker crossed the wire in clear text"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in a Prometheus text exposition whose labels include
    ``labels``, with all its labels."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(_LABEL.findall(m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            out.append((got, float(m.group(3))))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(value for _, value in metric_samples(text, name, **labels))


def metric_by(text: str, name: str, label: str, **labels: str) -> dict[str, float]:
    """``name`` summed per value of ``label``."""
    out: dict[str, float] = {}
    for got, value in metric_samples(text, name, **labels):
        out[got.get(label, "")] = out.get(got.get(label, ""), 0.0) + value
    return out


def poll(check: Callable[[], bool], timeout: float, describe: Callable[[], str],
         interval: float = 0.5) -> None:
    """Until ``check()`` holds, at most ``timeout`` seconds; else fail with ``describe()``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {describe()}")
        time.sleep(interval)
