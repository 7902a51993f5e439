"""Fleet membership: each agent and waypoint keeps a key under a lease with a heartbeat.

``/nodeproxy/nodes/v1/<name>`` holds a :class:`Registration` (JSON) attached to a lease of
``ttl`` seconds that the member keeps alive every ``ttl / 3`` seconds; the value is rewritten
when what it says changes (config revision applied, enrolled pods, stale).  A member that
dies or loses the store disappears when its lease runs out; on a clean stop the lease is
revoked so it disappears at once.  Node identities may write their own key only (roles in
docs/control-plane.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc

from nodeproxy.controlplane.client import describe, make_client
from nodeproxy.controlplane.endpoint import StoreSpec

log = logging.getLogger("nodeproxy.controlplane")
_EXTRA = {"component": "registration"}
REGISTRY_PREFIX = "/nodeproxy/nodes/v1/"
_TROUBLE = (etcd_errors.ClientError, asyncio.TimeoutError, OSError, ConnectionError)


def registration_key(name: str) -> str:
    return REGISTRY_PREFIX + name.replace("/", ".")


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    kind: str  # "agent" | "waypoint"
    version: str
    config_revision: int
    enrolled: tuple[str, ...] = ()
    stale: bool = False

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["enrolled"] = list(self.enrolled)
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Registration:
        doc: dict[str, Any] = json.loads(raw)
        return cls(name=str(doc["name"]), kind=str(doc.get("kind", "agent")),
                   version=str(doc.get("version", "?")),
                   config_revision=int(doc.get("config_revision", 0)),
                   enrolled=tuple(doc.get("enrolled") or ()), stale=bool(doc.get("stale")))


class _Expired(Exception):
    pass


class Registrar:
    """Keeps ``info()`` registered under a lease until :meth:`stop`."""

    def __init__(self, spec: StoreSpec, info: Callable[[], Registration], *, ttl: int = 10,
                 check_interval: float = 0.5,
                 client_factory: Callable[[StoreSpec], aetcd.Client] = make_client,
                 backoff_cap: float = 5.0) -> None:
        self.spec = spec
        self._info = info
        self.ttl = ttl
        self._check = check_interval
        self._client_factory = client_factory
        self._backoff_cap = backoff_cap
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()
        self.registered: Registration | None = None
        self.last_error: str | None = None
        self.leases_granted = 0

    def poke(self, *_: object) -> None:
        """Something the registration says may have changed: write it soon."""
        self._poke.set()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            client = self._client_factory(self.spec)
            try:
                await client.connect()
                await self._session(client)
            except (_Expired, *_TROUBLE) as exc:
                text = describe(exc) if not isinstance(exc, _Expired) else "lease expired"
                if text != self.last_error:
                    log.warning("registration in %s lost (%s): retrying", self.spec, text,
                                extra=_EXTRA)
                self.last_error = text
                self.registered = None
                attempt += 1
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            if attempt and not self._stop.is_set():
                delay = min(self._backoff_cap, 0.2 * 2 ** min(attempt - 1, 8))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay * random.uniform(0.5, 1))

    async def _session(self, client: aetcd.Client) -> None:
        lease = await client.lease(self.ttl)
        self.leases_granted += 1
        current = self._info()
        key = registration_key(current.name).encode()
        # One keep-alive stream for the session (aetcd's Lease.refresh() opens a stream per
        # beat and leaves it open).
        keepalive = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
        try:
            await client.put(key, current.to_json(), lease=lease.id)
            self.registered, self.last_error = current, None
            log.info("registered %s in %s (lease %x, ttl %d s)", key.decode(), self.spec,
                     lease.id, self.ttl, extra=_EXTRA)
            next_beat = time.monotonic() + self.ttl / 3
            while not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), self._check)
                self._poke.clear()
                if self._stop.is_set():
                    break
                latest = self._info()
                if latest != self.registered:
                    await client.put(key, latest.to_json(), lease=lease.id)
                    self.registered = latest
                if time.monotonic() >= next_beat:
                    await keepalive.write(rpc.LeaseKeepAliveRequest(ID=lease.id))
                    reply = await asyncio.wait_for(keepalive.read(), self.spec.timeout)
                    if reply is grpc.aio.EOF or reply.TTL <= 0:
                        raise _Expired
                    next_beat = time.monotonic() + self.ttl / 3
        except grpc.aio.AioRpcError as exc:
            raise etcd_errors.ClientError(describe(exc)) from exc
        finally:
            keepalive.cancel()
            if self._stop.is_set():  # a clean stop: leave the fleet at once
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(lease.revoke(), 2)


@dataclass(frozen=True, slots=True)
class Member:
    registration: Registration
    converged: bool


@dataclass(frozen=True, slots=True)
class Fleet:
    latest_revision: int
    members: tuple[Member, ...]
    bad: tuple[str, ...]  # registration keys that do not parse

    @property
    def converged(self) -> bool:
        return all(m.converged for m in self.members)


def fleet_view(latest_revision: int, values: Mapping[str, bytes]) -> Fleet:
    """Who is registered and whether each has applied ``latest_revision`` (pure)."""
    members: list[Member] = []
    bad: list[str] = []
    for key in sorted(values):
        try:
            reg = Registration.from_json(values[key])
        except (ValueError, KeyError, TypeError):
            bad.append(key)
            continue
        members.append(Member(reg, reg.config_revision >= latest_revision and not reg.stale))
    return Fleet(latest_revision, tuple(members), tuple(bad))
