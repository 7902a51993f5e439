"""``nodeproxy nodes --store etcd://...``: the fleet, and whether it has converged."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from cli.config_store import store_option
from cli.tables import FORMATS, render, render_table
from nodeproxy.controlplane.endpoint import parse_store_url

if TYPE_CHECKING:  # aetcd/grpc load only when the command runs
    from nodeproxy.controlplane.registration import Fleet
    from nodeproxy.controlplane.store import Store


async def read_fleet(store: Store) -> Fleet:
    from nodeproxy.controlplane.registration import REGISTRY_PREFIX, fleet_view

    listing = await store.listing()
    members = await store.get_prefix(REGISTRY_PREFIX)
    return fleet_view(listing.latest_config_revision, members)


async def poll_fleet(url: str, wait: float, expect: int) -> tuple[Fleet, bool]:
    """The fleet, polled (one connection, one event loop) until converged or ``wait`` ends."""
    deadline = time.monotonic() + wait
    from nodeproxy.controlplane.store import Store

    async with Store(parse_store_url(url)) as store:
        while True:
            fleet = await read_fleet(store)
            done = fleet.converged and len(fleet.members) >= expect
            if done or time.monotonic() >= deadline:
                return fleet, done
            await asyncio.sleep(0.1)


def _table(fleet: Fleet) -> str:
    rows = [(m.registration.name, m.registration.kind, m.registration.version,
             m.registration.config_revision, len(m.registration.enrolled),
             "stale" if m.registration.stale else "live", "yes" if m.converged else "no")
            for m in fleet.members]
    return render_table(["NAME", "KIND", "VERSION", "REVISION", "PODS", "STORE", "CONVERGED"],
                        rows)


def _data(fleet: Fleet) -> dict[str, Any]:
    return {
        "latestRevision": fleet.latest_revision,
        "converged": fleet.converged,
        "members": [{"name": m.registration.name, "kind": m.registration.kind,
                     "version": m.registration.version,
                     "configRevision": m.registration.config_revision,
                     "enrolled": list(m.registration.enrolled),
                     "stale": m.registration.stale, "converged": m.converged}
                    for m in fleet.members],
        "unreadable": list(fleet.bad),
    }


@click.command(name="nodes")
@store_option
@click.option("-o", "--output", "fmt", type=click.Choice(FORMATS), default="table",
              show_default=True)
@click.option("--wait", "wait", type=float, default=0.0, metavar="SECONDS",
              help="poll until every member has converged (and --expect members are there)")
@click.option("--expect", type=int, default=0, help="with --wait: at least this many members")
def command(store_url: str, fmt: str, wait: float, expect: int) -> None:
    """List registered agents and waypoints; exit 1 unless all run the latest config."""
    fleet, done = asyncio.run(poll_fleet(store_url, wait, expect))
    click.echo(render(fmt, lambda: _table(fleet), lambda: _data(fleet)), nl=False)
    ok = sum(1 for m in fleet.members if m.converged)
    click.echo(f"{ok}/{len(fleet.members)} converged to revision {fleet.latest_revision}", err=True)
    if not done:
        sys.exit(1)
