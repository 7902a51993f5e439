"""Reads and writes of the config resources in etcd (``config apply|get|diff|delete``).

A write replaces the whole desired state in one transaction guarded by compare-and-swap: it
succeeds only if (a) the generation key ``/nodeproxy/meta/v1/generation`` is still at the
revision read, which every write through this module bumps, and (b) no key under the config
prefix changed after the read (also catching hand-made edits).  A lost race is a
:class:`StoreConflictError`; nothing is written then.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import transactions as etcd_tx
from aetcd import utils as etcd_utils

from nodeproxy.controlplane.client import describe, make_client
from nodeproxy.controlplane.endpoint import StoreSpec
from nodeproxy.controlplane.errors import StoreConflictError, StoreError
from ztunnel_cfg.store_layout import CONFIG_PREFIX, ConfigDiff, diff_resources

GENERATION_KEY = "/nodeproxy/meta/v1/generation"


@dataclass(frozen=True, slots=True)
class Listing:
    """The config prefix as read at ``revision`` (the store's revision at that read)."""

    revision: int
    values: Mapping[str, bytes]
    mod_revisions: Mapping[str, int]
    generation_revision: int  # mod revision of the generation key, 0 if absent

    @property
    def latest_config_revision(self) -> int:
        """The revision of the newest config change this listing shows."""
        return max([self.generation_revision, *self.mod_revisions.values()], default=0)


async def list_config(client: aetcd.Client, generation: bool = True) -> Listing:
    """All config resources, with the store revision of the read.

    The generation key is read first: a write landing between the two reads makes a later
    compare-and-swap on it fail, never pass wrongly.  Agents, which may read the config
    prefix only, pass ``generation=False``.
    """
    gen = await client.get(GENERATION_KEY.encode()) if generation else None
    got = await client.get_prefix(CONFIG_PREFIX.encode())
    values: dict[str, bytes] = {}
    mods: dict[str, int] = {}
    for kv in got:
        key = kv.key.decode(errors="replace")
        values[key] = bytes(kv.value)
        mods[key] = int(kv.mod_revision)
    return Listing(int(got.header.revision), values, mods,
                   int(gen.mod_revision) if gen is not None else 0)


@dataclass(frozen=True, slots=True)
class WriteResult:
    diff: ConfigDiff
    revision: int  # the revision of the write; the listing's when nothing changed


async def write_config(client: aetcd.Client, listing: Listing, desired: Mapping[str, bytes],
                       who: str | None = None) -> WriteResult:
    """Make the config prefix equal ``desired`` in one CAS transaction."""
    diff = diff_resources(listing.values, desired)
    if diff.empty:
        return WriteResult(diff, listing.latest_config_revision)
    tx = client.transactions
    prefix = CONFIG_PREFIX.encode()
    gen = GENERATION_KEY.encode()
    compare = [
        tx.mod(gen) == listing.generation_revision,
        # Nothing under the prefix was modified after our read.
        tx.mod(prefix, etcd_utils.prefix_range_end(prefix)) < listing.revision + 1,
    ]
    ops: list[object] = [etcd_tx.Put(k.encode(), desired[k]) for k in (*diff.added, *diff.changed)]
    ops += [etcd_tx.Delete(k.encode()) for k in diff.removed]
    stamp = {"by": who or f"{socket.gethostname()}", "at": time.time(),
             "resources": len(desired), "change": diff.summary()}
    ops.append(etcd_tx.Put(gen, json.dumps(stamp).encode()))
    ok, _ = await client.transaction(compare=compare, success=ops, failure=[])
    if not ok:
        raise StoreConflictError(
            "the store changed while this write was prepared (another apply?); nothing was "
            "written", hint="run the command again: it re-reads the store")
    after = await client.get(gen)
    return WriteResult(diff, int(after.mod_revision) if after is not None else 0)


class Store:
    """``async with Store(spec) as store``: a connected client with store-level errors."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        self.client = make_client(spec)

    async def __aenter__(self) -> Store:
        try:
            await self.client.connect()
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    def _error(self, exc: BaseException) -> StoreError:
        text = describe(exc)
        if "permission denied" in text or "PERMISSION_DENIED" in text:
            hint = ("the client certificate's user (its CN) has no role for this: see the "
                    "roles in docs/control-plane.md")
        elif "UNAUTHENTICATED" in text or "authentication" in text:
            hint = "etcd has auth on: connect with a client certificate (cert=, key=)"
        else:
            hint = "is etcd running and reachable, and are the TLS files right?"
        return StoreError(f"etcd at {self.spec}: {text}", hint=hint)

    async def listing(self) -> Listing:
        try:
            return await list_config(self.client)
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None

    async def write(self, listing: Listing, desired: Mapping[str, bytes]) -> WriteResult:
        try:
            return await write_config(self.client, listing, desired)
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        try:
            got = await self.client.get_prefix(prefix.encode())
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None
        return {kv.key.decode(errors="replace"): bytes(kv.value) for kv in got}
