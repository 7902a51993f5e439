"""The agent's side of eBPF capture: the original destination of an accepted connection.

Outbound (the connection arrived on the outbound port): np_sockops recorded it in the pod's
pinned ``origdst`` map (``origdst6`` for IPv6) under the connecting socket's (source IP,
source port), which is the accepted socket's peer.  The pod is found by the accepted
socket's netns cookie.  Inbound (np_ingress assigned the SYN to the listener): the local
address already is the original destination.  ``None`` means "not found" (the caller fails
the connection).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from redirect.ebpf import bpfsys
from redirect.ebpf.errors import EbpfError
from redirect.ebpf.plan import (
    CONFIG_SIZE,
    PIN_SUBDIR,
    PodConfig,
    origdst6_key,
    origdst6_value,
    origdst_key,
    origdst_value,
)
from redirect.spec import OUTBOUND_PORT

SO_NETNS_COOKIE = 71


class OriginalDst:
    def __init__(self, bpffs: str = "/sys/fs/bpf", outbound_port: int = OUTBOUND_PORT) -> None:
        self.root = os.path.join(bpffs, PIN_SUBDIR)
        self.outbound_port = outbound_port
        self._maps: dict[int, int] = {}  # netns cookie -> fd of that pod's origdst map
        self._maps6: dict[int, int] = {}  # netns cookie -> fd of that pod's origdst6 map

    def _rescan(self) -> None:
        for fd in (*self._maps.values(), *self._maps6.values()):
            os.close(fd)
        self._maps.clear()
        self._maps6.clear()
        try:
            pods = os.listdir(self.root)
        except OSError:
            return
        for pod in pods:
            try:
                cfg_fd = bpfsys.obj_get(os.path.join(self.root, pod, "config"))
            except EbpfError:
                continue
            try:
                raw = bpfsys.map_lookup(cfg_fd, struct.pack("=I", 0), CONFIG_SIZE)
            finally:
                os.close(cfg_fd)
            if raw is None:
                continue
            cookie = PodConfig.unpack(raw).netns_cookie
            for name, maps in (("origdst", self._maps), ("origdst6", self._maps6)):
                try:
                    maps[cookie] = bpfsys.obj_get(os.path.join(self.root, pod, name))
                except EbpfError:
                    continue

    def _lookup(self, cookie: int, key: bytes, v6: bool) -> tuple[str, int] | None:
        fd = (self._maps6 if v6 else self._maps).get(cookie)
        if fd is None:
            return None
        raw = bpfsys.map_lookup(fd, key, 20 if v6 else 8)
        if raw is None:
            return None
        bpfsys.map_delete(fd, key)
        return origdst6_value(raw) if v6 else origdst_value(raw)

    def __call__(self, sock: socket.socket) -> tuple[str, int] | None:
        local_ip, local_port = sock.getsockname()[:2]
        if local_port != self.outbound_port:
            return str(local_ip), int(local_port)
        peer_ip, peer_port = sock.getpeername()[:2]
        (cookie,) = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        peer = ipaddress.ip_address(peer_ip)
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # an IPv4 client on a dual-stack listener
        v6 = peer.version == 6
        key = (origdst6_key(str(peer), int(peer_port)) if v6
               else struct.pack("=Q", origdst_key(str(peer), int(peer_port))))
        found = self._lookup(cookie, key, v6)
        if found is None:  # a pod enrolled (or re-installed) since the last scan
            self._rescan()
            found = self._lookup(cookie, key, v6)
        return found
