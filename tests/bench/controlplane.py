"""Control-plane scale benchmark: N workloads in etcd, 3 agents, one policy change.

    .venv/bin/python -m tests.bench.controlplane [--workloads 1000,10000,30000] [--json out]

For each size: a fresh single-member etcd (TLS + client-certificate auth, as deployed), the
whole config written by the same code as ``nodeproxy config apply``, then 3 real agent
processes (``nodeproxy run --config etcd://... --no-redirect``, each with its own node
certificate).  Measured:

- start-up: agent start to its registration showing the config revision (list + validate);
- convergence: ``config apply`` of one changed policy (the CAS write) until every agent's
  registration reports the new revision -- an agent reports it once the new snapshot is in
  force, i.e. new connections are decided by the changed policy;
- idle CPU (% of one core, over ``--idle`` seconds) and RSS of each agent afterwards.

The agents' nodes have no local pods (the workloads are spread over 100 other nodes), so the
numbers are the control plane's alone.  Not a timed test: it prints a table (and JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nodeproxy.controlplane.endpoint import parse_store_url
from nodeproxy.controlplane.registration import REGISTRY_PREFIX, Registration
from nodeproxy.controlplane.store import Store
from tests.helpers.etcd import EtcdCluster, setup_auth, single
from tests.helpers.etcd_pki import EtcdPki
from ztunnel_cfg.store_layout import encode

AGENTS = ("bench-a", "bench-b", "bench-c")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def workloads(n: int) -> list[dict[str, Any]]:
    return [{"name": f"w{i}", "namespace": f"ns{i % 20}", "serviceAccount": f"sa{i % 50}",
             "workloadIps": [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"],
             "node": f"node{i % 100}", "protocol": "HBONE"} for i in range(n)]


def policy(principal: str) -> dict[str, Any]:
    return {"name": "allow-frontend", "namespace": "ns0", "scope": "Namespace",
            "action": "Allow", "rules": [[[{"principals": [principal]}]]]}


def desired(n: int, principal: str) -> dict[str, bytes]:
    """The resources as `config apply` stores them (keys and canonical JSON)."""
    from ztunnel_cfg.loader import validate_config_text
    from ztunnel_cfg.store_layout import config_to_resources

    doc = {"workloads": workloads(n), "policies": [policy(principal)]}
    return config_to_resources(validate_config_text(json.dumps(doc)).config)


async def write(url: str, resources: dict[str, bytes]) -> tuple[int, float]:
    async with Store(parse_store_url(url)) as store:
        listing = await store.listing()
        start = time.perf_counter()
        result = await store.write(listing, resources)
        return result.revision, time.perf_counter() - start


async def wait_revision(url: str, revision: int, timeout: float) -> dict[str, float]:
    """When (perf_counter) each agent's registration first reports >= revision."""
    seen: dict[str, float] = {}
    deadline = time.perf_counter() + timeout
    async with Store(parse_store_url(url)) as store:
        while len(seen) < len(AGENTS) and time.perf_counter() < deadline:
            regs = await store.get_prefix(REGISTRY_PREFIX)
            now = time.perf_counter()
            for raw in regs.values():
                reg = Registration.from_json(raw)
                if reg.config_revision >= revision and reg.name not in seen:
                    seen[reg.name] = now
            await asyncio.sleep(0.005)
    if len(seen) < len(AGENTS):
        raise SystemExit(f"agents did not reach revision {revision} in {timeout} s: {seen}")
    return seen


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_agents(etcd: EtcdCluster, root: Path) -> list[subprocess.Popen[bytes]]:
    ca = root / "devca"
    subprocess.run([sys.executable, "-m", "cli.main", "ca", "init", "--dir", str(ca)],
                   check=True, capture_output=True)
    procs = []
    for node in AGENTS:
        log = (root / f"{node}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--log-level", "warning", "run",
             "--config", etcd.url(node), "--node", node, "--no-redirect",
             "--dev-ca-dir", str(ca), "--readiness-addr", "127.0.0.1:0",
             "--metrics-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_size(n: int, idle: float, changes: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"np-bench-cp-{n}-"))
    etcd = single(root, EtcdPki(root / "pki"))
    etcd.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        setup_auth(etcd, AGENTS)
        admin = etcd.url("admin")
        t0 = time.perf_counter()
        initial = desired(n, "spiffe://cluster.local/ns/ns1/sa/frontend")
        build = time.perf_counter() - t0
        revision, initial_write = asyncio.run(write(admin, initial))
        size = sum(len(v) for v in initial.values())
        started = time.perf_counter()
        procs = start_agents(etcd, root)
        ready = asyncio.run(wait_revision(admin, revision, 300))
        startup = max(ready.values()) - started
        converge: list[float] = []
        writes: list[float] = []
        for k in range(changes):
            changed = dict(initial)
            key = "/nodeproxy/v1/policies/ns0/allow-frontend"
            changed[key] = encode(policy(f"spiffe://cluster.local/ns/ns1/sa/frontend-{k}"))
            t_apply = time.perf_counter()
            revision, took = asyncio.run(write(admin, changed))
            seen = asyncio.run(wait_revision(admin, revision, 120))
            converge.append(max(seen.values()) - t_apply)
            writes.append(took)
            initial = changed
        before = {p.pid: cpu_seconds(p.pid) for p in procs}
        time.sleep(idle)
        cpu = [100 * (cpu_seconds(p.pid) - before[p.pid]) / idle for p in procs]
        rss = [rss_mb(p.pid) for p in procs]
        return {
            "workloads": n, "resources": len(initial), "storedMB": round(size / 1e6, 2),
            "buildSeconds": round(build, 2), "initialWriteSeconds": round(initial_write, 2),
            "agentStartupSeconds": round(startup, 2),
            "convergeSeconds": [round(c, 3) for c in converge],
            "convergeMedian": round(sorted(converge)[len(converge) // 2], 3),
            "writeSeconds": round(sorted(writes)[len(writes) // 2], 4),
            "idleCpuPercent": [round(c, 2) for c in cpu],
            "rssMB": [round(r, 1) for r in rss],
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        etcd.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="1000,10000,30000")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    ap.add_argument("--changes", type=int, default=5, help="policy changes timed per size")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # SIGTERM runs the clean-up (agents, etcd, data dirs) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for n in (int(x) for x in args.workloads.split(",")):
        result = run_size(n, args.idle, args.changes)
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{'workloads':>10} {'start s':>8} {'converge s (median)':>20} {'idle CPU %':>18} "
          f"{'RSS MB':>18}")
    for r in results:
        print(f"{r['workloads']:>10} {r['agentStartupSeconds']:>8} {r['convergeMedian']:>20} "
              f"{'/'.join(map(str, r['idleCpuPercent'])):>18} "
              f"{'/'.join(map(str, r['rssMB'])):>18}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
