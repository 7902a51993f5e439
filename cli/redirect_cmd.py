"""`nodeproxy redirect install|verify|remove|show --netns PATH [--backend ...]`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from redirect import ops
from redirect.ebpf import ops as ebpf_ops
from redirect.spec import RedirectSpec

_CHOICES = (*ops.BACKENDS, "ebpf")
_BACKEND = click.option(
    "--backend",
    type=click.Choice(_CHOICES),
    default="iptables",
    show_default=True,
    help="iptables follows the flavour (nft/legacy) the namespace already uses.",
)
_NETNS = click.option(
    "--netns",
    "netns",
    required=True,
    help="network namespace path, e.g. /var/run/netns/NAME or /proc/PID/ns/net",
)
_CGROUP = click.option(
    "--cgroup",
    default=None,
    help="the pod's cgroup v2 directory (--backend ebpf attaches there)",
)


def _spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--exclude-uid",
            "exclude_uids",
            type=int,
            multiple=True,
            help="outbound traffic of this uid is not captured (repeatable)",
        ),
        click.option(
            "--exclude-gid",
            "exclude_gids",
            type=int,
            multiple=True,
            help="outbound traffic of this gid is not captured (repeatable)",
        ),
        click.option(
            "--exclude-cidr",
            "exclude_cidrs",
            multiple=True,
            help="outbound destinations not captured (repeatable)",
        ),
        click.option(
            "--exclude-inbound-port",
            "exclude_ports",
            type=int,
            multiple=True,
            help="inbound ports not captured (repeatable)",
        ),
        click.option(
            "--probe-source-ip",
            default="169.254.7.127",
            show_default=True,
            help="kubelet probes SNAT'd from this address bypass capture; '' = none",
        ),
        click.option(
            "--capture-dns/--no-capture-dns",
            default=False,
            show_default=True,
            help="redirect DNS (port 53) to the DNS proxy on 15053",
        ),
        click.option("--ipv6/--no-ipv6", default=False, show_default=True),
        click.option("--route-table", type=int, default=133, show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _spec(kw: dict[str, Any]) -> RedirectSpec:
    return RedirectSpec(
        exclude_uids=tuple(kw["exclude_uids"]),
        exclude_gids=tuple(kw["exclude_gids"]),
        exclude_outbound_cidrs=tuple(kw["exclude_cidrs"]),
        exclude_inbound_ports=tuple(kw["exclude_ports"]),
        probe_source_ip=kw["probe_source_ip"] or None,
        capture_dns=kw["capture_dns"],
        ipv6=kw["ipv6"],
        route_table=kw["route_table"],
    )


@click.group(name="redirect")
def command() -> None:
    """Install, verify and remove traffic capture in a pod's network namespace."""


@command.command()
@_NETNS
@_BACKEND
@_CGROUP
@_spec_options
def install(netns: str, backend: str, cgroup: str | None, **kw: Any) -> None:
    """Install (or converge) capture rules and policy routing."""
    if backend == "ebpf":
        click.echo(str(ebpf_ops.install(netns, _spec(kw), cgroup)))
        return
    click.echo(str(ops.install(netns, _spec(kw), backend)))


@command.command()
@_NETNS
@_BACKEND
@_CGROUP
@_spec_options
def verify(netns: str, backend: str, cgroup: str | None, **kw: Any) -> None:
    """Compare installed rules with the plan; exit 1 and list the drift if they differ."""
    if backend == "ebpf":
        drift = ebpf_ops.verify(netns, _spec(kw), cgroup)
    else:
        drift = ops.verify(netns, _spec(kw), backend)
    click.echo(str(drift))
    if not drift.ok:
        sys.exit(1)


@command.command()
@_NETNS
@click.option(
    "--backend",
    type=click.Choice(_CHOICES),
    default=None,
    help="only this backend's rules (default: whatever nodeproxy installed)",
)
@_CGROUP
def remove(netns: str, backend: str | None, cgroup: str | None) -> None:
    """Remove nodeproxy's rules, programs and policy routing; nothing else is touched."""
    if backend in (None, "ebpf"):
        report = ebpf_ops.remove(netns, cgroup)
        if backend == "ebpf" or report.removed:
            click.echo(str(report))
        if backend == "ebpf":
            return
    click.echo(str(ops.remove(netns, backend)))


@command.command()
@_NETNS
@click.option("--backend", type=click.Choice(_CHOICES), default=None,
              help="only this backend (default: all)")
@_CGROUP
def show(netns: str, backend: str | None, cgroup: str | None) -> None:
    """Print nodeproxy's rules, programs and policy routing in the namespace."""
    if backend == "ebpf":
        click.echo(ebpf_ops.show(netns, cgroup))
        return
    if backend is None and ebpf_ops.pinned(netns):
        click.echo(ebpf_ops.show(netns, cgroup) + "\n")
    click.echo(ops.show(netns))
