"""``nodeproxy config apply|get|diff|delete --store etcd://...``: the config in etcd.

``apply FILE...`` takes the whole desired state (the union of FILES), validates it exactly as
an agent will (schema + cross references; each error names the file, line and store key) and
writes it in one compare-and-swap transaction: keys not in FILES are removed.  Nothing is
written when anything is invalid, or when another writer got in first.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml

from cli.tables import render_table
from nodeproxy.controlplane.endpoint import parse_store_url

if TYPE_CHECKING:  # aetcd/grpc load only when a store command runs
    from nodeproxy.controlplane.store import Listing
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.errors import ConfigError, ConfigIssue
from ztunnel_cfg.loader import LoadResult
from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.store_layout import (
    CONFIG_PREFIX,
    Item,
    config_to_resources,
    decode_value,
    diff_resources,
    items_from_document,
    join_resources,
    parse_key,
    render_diff,
)

T = TypeVar("T")
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

store_option = click.option(
    "--store", "store_url", required=True, envvar="NODEPROXY_STORE",
    help="etcd://HOST:PORT[,HOST:PORT...][?ca=FILE&cert=FILE&key=FILE] (env NODEPROXY_STORE)")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _file_items(path: str) -> tuple[list[Item], list[ConfigIssue]]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [ConfigIssue(path, None, None, "", f"cannot read config file: {exc}")]
    try:
        root = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return [], [ConfigIssue(path, mark.line + 1 if mark else None,
                                mark.column + 1 if mark else None, "",
                                f"YAML syntax error: {getattr(exc, 'problem', exc)}")]
    if data is None:
        return [], []
    lines: dict[tuple[str, int], int] = {}
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            section = str(key_node.value)
            if isinstance(value_node, yaml.SequenceNode):
                for index, node in enumerate(value_node.value):
                    lines[(section, index)] = node.start_mark.line + 1
            else:
                lines[(section, 0)] = value_node.start_mark.line + 1
    return items_from_document(data, path, lines)


def desired_state(files: tuple[str, ...]) -> tuple[LoadResult, dict[str, bytes]]:
    """Validate FILES together; the resources to store.  Raises ConfigError."""
    items: list[Item] = []
    issues: list[ConfigIssue] = []
    for path in files:
        found, problems = _file_items(path)
        items += found
        issues += problems
    if issues:
        raise ConfigError(issues)
    result = join_resources(items)
    Snapshot.build(result.config)
    return result, config_to_resources(result.config)


def _print_changes(listing: Listing, desired: dict[str, bytes], full: bool) -> bool:
    diff = diff_resources(listing.values, desired)
    if full:
        click.echo(render_diff(diff, listing.values, desired), nl=False)
    else:
        for sign, keys in (("+", diff.added), ("~", diff.changed), ("-", diff.removed)):
            for key in keys:
                click.echo(f"{sign} {key}")
    return not diff.empty


@click.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@store_option
@click.option("--dry-run", is_flag=True, help="validate and show the diff; write nothing")
def apply(files: tuple[str, ...], store_url: str, dry_run: bool) -> None:
    """Make the store hold exactly FILES (validated together; one CAS transaction)."""
    spec = parse_store_url(store_url)
    result, desired = desired_state(files)
    for warning in result.warnings:
        click.echo(str(warning), err=True)

    async def go() -> None:
        from nodeproxy.controlplane.store import Store

        async with Store(spec) as store:
            listing = await store.listing()
            if dry_run:
                changed = _print_changes(listing, desired, full=True)
                diff = diff_resources(listing.values, desired)
                click.echo(f"dry run: {diff.summary()} (nothing written)"
                           if changed else "dry run: no changes", err=True)
                return
            written = await store.write(listing, desired)
            _print_changes(listing, desired, full=False)
            if written.diff.empty:
                click.echo(f"no changes (revision {written.revision})", err=True)
            else:
                click.echo(f"applied: {written.diff.summary()} at revision {written.revision}",
                           err=True)

    _run(go())


@click.command("diff")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@store_option
def diff(files: tuple[str, ...], store_url: str) -> None:
    """Show what `apply FILES` would change.  Exit 1 when there are differences."""
    spec = parse_store_url(store_url)
    _result, desired = desired_state(files)

    async def go() -> bool:
        from nodeproxy.controlplane.store import Store

        async with Store(spec) as store:
            return _print_changes(await store.listing(), desired, full=True)

    if _run(go()):
        sys.exit(1)


def _selector_prefix(selector: str | None) -> str:
    if not selector:
        return CONFIG_PREFIX
    text = selector[len(CONFIG_PREFIX):] if selector.startswith(CONFIG_PREFIX) else selector
    parts = [p for p in text.split("/") if p]
    if len(parts) > 3:
        raise click.BadParameter(f"{selector!r}: want KIND[/NAMESPACE[/NAME]]")
    if parts:
        try:
            parse_key(CONFIG_PREFIX + "/".join([*parts, *["x"] * (3 - len(parts))]))
        except ValueError as exc:
            raise click.BadParameter(f"{selector!r}: {exc}") from None
    prefix = CONFIG_PREFIX + "/".join(parts)
    return prefix if len(parts) == 3 else prefix + "/"


@click.command("get")
@click.argument("selector", required=False)
@store_option
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]),
              default="table", show_default=True)
def get(selector: str | None, store_url: str, fmt: str) -> None:
    """Show the config in the store (all of it, or KIND[/NAMESPACE[/NAME]])."""
    spec = parse_store_url(store_url)
    prefix = _selector_prefix(selector)

    async def go() -> Listing:
        from nodeproxy.controlplane.store import Store

        async with Store(spec) as store:
            return await store.listing()

    listing = _run(go())
    keys = sorted(k for k in listing.values if k.startswith(prefix))
    if fmt == "table":
        rows = []
        for key in keys:
            try:
                rk = parse_key(key)
                rows.append((rk.kind, rk.namespace, rk.name, str(listing.mod_revisions[key])))
            except ValueError:
                rows.append(("?", "?", key, str(listing.mod_revisions[key])))
        click.echo(render_table(["KIND", "NAMESPACE", "NAME", "REVISION"], rows), nl=False)
        click.echo(f"revision {listing.latest_config_revision}, {len(keys)} resource(s)",
                   err=True)
        return
    if selector is None:
        items = [decode_value(k, listing.values[k]) for k in keys]
        bad = [i for i in items if isinstance(i, ConfigIssue)]
        if bad:
            raise ConfigError(bad)
        data: Any = config_to_document(
            join_resources([i for i in items if isinstance(i, Item)]).config)
    else:
        data = {}
        for key in keys:
            try:
                data[key] = json.loads(listing.values[key])
            except ValueError:
                data[key] = listing.values[key].decode(errors="replace")
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


@click.command("delete")
@click.argument("selectors", nargs=-1, required=True)
@store_option
@click.option("--dry-run", is_flag=True, help="validate and show the diff; write nothing")
def delete(selectors: tuple[str, ...], store_url: str, dry_run: bool) -> None:
    """Remove resources KIND/NAMESPACE/NAME (or whole KIND[/NAMESPACE]); what remains must
    still be valid."""
    spec = parse_store_url(store_url)
    prefixes = [_selector_prefix(s) for s in selectors]

    async def go() -> None:
        from nodeproxy.controlplane.store import Store

        async with Store(spec) as store:
            listing = await store.listing()
            doomed = {k for k in listing.values if any(k.startswith(p) for p in prefixes)}
            if not doomed:
                raise click.ClickException("nothing in the store matches "
                                           + ", ".join(selectors))
            kept = {k: v for k, v in listing.values.items() if k not in doomed}
            items = [decode_value(k, v) for k, v in kept.items()]
            bad = [i for i in items if isinstance(i, ConfigIssue)]
            if bad:
                raise ConfigError(bad)
            join_resources([i for i in items if isinstance(i, Item)])
            if dry_run:
                _print_changes(listing, kept, full=True)
                click.echo(f"dry run: {len(doomed)} removed (nothing written)", err=True)
                return
            written = await store.write(listing, kept)
            _print_changes(listing, kept, full=False)
            click.echo(f"deleted: {written.diff.summary()} at revision {written.revision}",
                       err=True)

    _run(go())


commands = [apply, diff, get, delete]
