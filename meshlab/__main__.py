"""Manual use: ``python -m meshlab up|down`` (see docs/lab.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshlab.build import Cluster, sweep
from meshlab.topology import ClusterPlan, ClusterSpec, LabError, plan_cluster, random_prefix


def describe(plan: ClusterPlan) -> str:
    lines = [f"cluster {plan.prefix}  fabric netns {plan.fabric_netns} "
             f"({plan.bridge} {plan.fabric_ip}/24)"]
    for node in plan.nodes:
        lines.append(f"  {node.name:<7} netns {node.netns:<14} {node.uplink} {node.ip:<13} "
                     f"pods {node.pod_cidr}")
        for pod in plan.pods_on(node.name):
            lines.append(f"    {pod.name:<8} netns {pod.netns:<14} {pod.ip:<13} "
                         f"(node side {pod.node_iface})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshlab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a cluster and leave it running")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--pods", type=int, default=2, help="pods per node")
    up.add_argument("--prefix", default=None)
    down = sub.add_parser("down", help="remove every lab netns of PREFIX (a glob is allowed)")
    down.add_argument("prefix")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            plan = plan_cluster(ClusterSpec(args.prefix or random_prefix(), args.nodes, args.pods))
            Cluster.create(plan)
            print(describe(plan))
            print(f"\nremove with: python -m meshlab down {plan.prefix}")
            return 0
        removed = sweep(args.prefix)
        names = f": {' '.join(removed)}" if removed else ""
        print(f"removed {len(removed)} namespace(s){names}")
        return 0
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
