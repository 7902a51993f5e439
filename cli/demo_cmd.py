"""``nodeproxy demo``: a two-node mesh in network namespaces, traffic, and a report.

Thin: options and exit codes only; the scenario, the runner and the report live in
:mod:`meshlab.demo`.
"""

from __future__ import annotations

import os
import sys

import click

from meshlab.demo import DEMO_GLOB, DemoError, DemoOptions, run_demo, teardown_leftovers


@click.command("demo")
@click.option("--keep", is_flag=True, help="Leave the cluster, agents and apps running.")
@click.option("--nodes", type=click.IntRange(2, 50), default=2, show_default=True,
              help="Number of node namespaces.")
@click.option("--backend", type=click.Choice(["iptables", "nftables", "ebpf"]), default="iptables",
              show_default=True, help="Redirection rules the agents install in the pods.")
@click.option("--down", "down", is_flag=True,
              help="Tear down demos left running by --keep, then exit.")
@click.option("--prefix", default=None, metavar="PREFIX",
              help="Namespace name prefix (default: random, npdXXXX-); with --down, remove "
                   "only this demo.")
@click.option("--color/--no-color", default=None,
              help="Colour the report (default: only when stdout is a terminal).")
def command(keep: bool, nodes: int, backend: str, down: bool, prefix: str | None,
            color: bool | None) -> None:
    """Build a mesh of network namespaces, send traffic through it and report what happened.

    Needs root.  Everything is torn down at the end (also on Ctrl-C or failure) unless
    --keep is given; then `nodeproxy demo --down` removes it.
    """
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (network namespaces, netfilter)",
                        hint="run it with sudo, e.g. 'sudo make demo'")
    if down:
        removed, dirs = teardown_leftovers(prefix or DEMO_GLOB)
        click.echo(f"removed {len(removed)} namespace(s) and {len(dirs)} workdir(s)")
        return
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    result = run_demo(DemoOptions(nodes=nodes, backend=backend, keep=keep, color=color,
                                  prefix=prefix))
    if result.exit_code != 0:
        raise DemoError(
            f"the mesh did not behave as configured: {len(result.problems)} problem(s), "
            "listed above",
            hint=f"agent logs are in {result.workdir}",
        )
