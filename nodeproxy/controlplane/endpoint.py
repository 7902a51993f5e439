"""``etcd://HOST:PORT[,HOST:PORT...][?ca=FILE&cert=FILE&key=FILE&server-name=NAME]`` (pure).

TLS is on when ``ca`` is given; ``cert`` and ``key`` are the client certificate (etcd's
``--client-cert-auth``: its CN is the etcd user).  Several endpoints must be IP addresses
(one gRPC channel picks the first that answers and moves on when it fails); the server
certificate is checked against ``server-name`` (default: the first endpoint's host).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from nodeproxy.controlplane.errors import StoreError

SCHEME = "etcd"
_PARAMS = {"ca", "cert", "key", "server-name", "timeout"}


@dataclass(frozen=True, slots=True)
class StoreSpec:
    endpoints: tuple[tuple[str, int], ...]
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    timeout: float = 5.0  # seconds for one unary call

    @property
    def tls(self) -> bool:
        return self.ca is not None

    @property
    def target(self) -> str:
        """The gRPC target: ``ipv4:a:p,b:p`` for several IPs, ``host:port`` for one."""
        if len(self.endpoints) == 1:
            host, port = self.endpoints[0]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        family = "ipv6" if ":" in self.endpoints[0][0] else "ipv4"
        joined = ",".join(f"[{h}]:{p}" if family == "ipv6" else f"{h}:{p}"
                          for h, p in self.endpoints)
        return f"{family}:{joined}"

    def __str__(self) -> str:
        return f"{SCHEME}://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)


def is_store_url(text: str) -> bool:
    return text.startswith(f"{SCHEME}://")


def parse_store_url(text: str) -> StoreSpec:
    """Parse a store URL; :class:`StoreError` says what is wrong."""
    if not is_store_url(text):
        raise StoreError(f"{text!r} is not a store URL", hint=f"want {SCHEME}://HOST:PORT[,...]")
    parts = urlsplit(text)
    endpoints: list[tuple[str, int]] = []
    for item in (parts.netloc or "").split(","):
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"bad endpoint {item!r} in {text!r}", hint="want HOST:PORT")
        endpoints.append((host, int(port)))
    if len(endpoints) > 1:
        for host, _ in endpoints:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise StoreError(f"endpoint {host!r} in {text!r} is not an IP address",
                                 hint="several endpoints must be IP addresses") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _PARAMS)
    if unknown:
        raise StoreError(f"unknown parameter {unknown[0]!r} in {text!r}",
                         hint=f"known: {', '.join(sorted(_PARAMS))}")
    one = {k: v[-1] for k, v in query.items()}
    if ("cert" in one) != ("key" in one):
        raise StoreError(f"{text!r}: give both cert= and key= (a client certificate)")
    if "cert" in one and "ca" not in one:
        raise StoreError(f"{text!r}: a client certificate needs TLS: give ca= too")
    try:
        timeout = float(one.get("timeout", "5"))
    except ValueError:
        raise StoreError(f"{text!r}: timeout must be seconds") from None
    return StoreSpec(tuple(endpoints), ca=one.get("ca"), cert=one.get("cert"),
                     key=one.get("key"), server_name=one.get("server-name"), timeout=timeout)
