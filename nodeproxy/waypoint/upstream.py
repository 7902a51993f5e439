"""The waypoint's way to its endpoints: HBONE with the waypoint's own identity, pooled.

Every upstream byte stream is one CONNECT stream on a pooled mTLS connection to
``endpoint_ip:15008`` (the destination agent admits only the waypoint's identity there).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from nodeproxy.pool import ConnectionPool, Lease
from nodeproxy.proxy import tunnel
from nodeproxy.sockets import SocketFactory
from nodeproxy.tls import ContextCache
from ztunnel_cfg.model import HBONE_PORT, IPAddress, Service, Workload
from ztunnel_cfg.spiffe import SpiffeId


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream address: a workload and the port its app listens on."""

    workload: Workload
    ip: IPAddress
    port: int
    # Identities the endpoint may present: its own, plus the service's subjectAltNames.
    identities: tuple[SpiffeId, ...]
    # "ip:port" ("[ip]:port" for IPv6), the key of per-endpoint state.  Computed once: read ~8
    # times per request, formatting the address each time was ~40 us of a request (issue 14).
    address: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        text = f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"
        object.__setattr__(self, "address", text)


def endpoint_for(workload: Workload, service: Service | None, port: int,
                 like: IPAddress | None = None) -> Endpoint:
    """The endpoint serving ``service`` port ``port`` on ``workload`` (or the pod port itself
    when no service is involved)."""
    target = port
    if service is not None:
        target = workload.target_port(service.key, port) or service.target_port(port) or port
    ip = next((a for a in workload.workload_ips if like is None or a.version == like.version),
              workload.workload_ips[0])
    identities = [workload.identity]
    if service is not None:
        identities.extend(SpiffeId.parse(s) for s in service.subject_alt_names
                          if SpiffeId.parse(s) != workload.identity)
    return Endpoint(workload, ip, target, tuple(identities))


@dataclass(frozen=True, slots=True)
class _PoolKey:
    source: SpiffeId
    destinations: tuple[SpiffeId, ...]
    ip: str


class UpstreamTunnel:
    """One open CONNECT stream to an endpoint and the pool lease that carries it."""

    __slots__ = ("endpoint", "lease", "stream")

    def __init__(self, endpoint: Endpoint, stream: tunnel.Stream,
                 lease: Lease[tunnel.ClientConnection]) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.lease = lease

    def close(self) -> None:
        """Release: RST the stream unless both directions already ended; free the lease."""
        self.stream.close()
        self.lease.release()


class Upstreams:
    def __init__(self, identity: Callable[[], SpiffeId], contexts: ContextCache,
                 sockets: SocketFactory, *, connect_timeout: float = 10.0) -> None:
        self._identity = identity
        self._contexts = contexts
        self._sockets = sockets
        self._connect_timeout = connect_timeout
        self.pool: ConnectionPool[tunnel.ClientConnection] = ConnectionPool(self._connect)

    async def open(self, endpoint: Endpoint,
                   headers: Sequence[tuple[str, str]]) -> UpstreamTunnel:
        """A CONNECT stream to ``endpoint`` (raises a NodeproxyError/OSError on failure)."""
        key = _PoolKey(self._identity(), endpoint.identities, str(endpoint.ip))
        lease = await self.pool.acquire(key)
        try:
            stream = await lease.conn.open_stream(endpoint.address, headers)
        except BaseException:
            lease.release()
            raise
        return UpstreamTunnel(endpoint, stream, lease)

    async def _connect(self, key: Hashable) -> tunnel.ClientConnection:
        assert isinstance(key, _PoolKey)
        ctx = await self._contexts.client(key.source)
        sock = await self._sockets.connect(key.ip, HBONE_PORT, timeout=self._connect_timeout)
        return await tunnel.connect(sock, ctx, expected=key.destinations,
                                    trust_domain=key.source.trust_domain,
                                    timeout=self._connect_timeout)

    def start(self) -> None:
        self.pool.start_reaper()

    async def aclose(self, timeout: float = 1.0) -> None:
        await self.pool.aclose(timeout=timeout)
