"""The agent's side of eBPF capture: the original destination of an accepted connection.

Outbound (the connection arrived on the outbound port): np_sockops recorded it in the pod's
pinned ``origdst`` map under the connecting socket's (source IP, source port), which is the
accepted socket's peer.  The pod is found by the accepted socket's netns cookie.  Inbound
(np_ingress assigned the SYN to the listener): the local address already is the original
destination.  ``None`` means "not found" (the caller fails the connection).
"""

from __future__ import annotations

import os
import socket
import struct

from redirect.ebpf import bpfsys
from redirect.ebpf.errors import EbpfError
from redirect.ebpf.plan import PIN_SUBDIR, PodConfig, origdst_key, origdst_value
from redirect.spec import OUTBOUND_PORT

SO_NETNS_COOKIE = 71


class OriginalDst:
    def __init__(self, bpffs: str = "/sys/fs/bpf", outbound_port: int = OUTBOUND_PORT) -> None:
        self.root = os.path.join(bpffs, PIN_SUBDIR)
        self.outbound_port = outbound_port
        self._maps: dict[int, int] = {}  # netns cookie -> fd of that pod's origdst map

    def _rescan(self) -> None:
        for fd in self._maps.values():
            os.close(fd)
        self._maps.clear()
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
                raw = bpfsys.map_lookup(cfg_fd, struct.pack("=I", 0), 40)
            finally:
                os.close(cfg_fd)
            if raw is None:
                continue
            cookie = PodConfig.unpack(raw).netns_cookie
            try:
                self._maps[cookie] = bpfsys.obj_get(os.path.join(self.root, pod, "origdst"))
            except EbpfError:
                continue

    def _lookup(self, cookie: int, key: bytes) -> tuple[str, int] | None:
        fd = self._maps.get(cookie)
        if fd is None:
            return None
        raw = bpfsys.map_lookup(fd, key, 8)
        if raw is None:
            return None
        bpfsys.map_delete(fd, key)
        return origdst_value(raw)

    def __call__(self, sock: socket.socket) -> tuple[str, int] | None:
        local_ip, local_port = sock.getsockname()[:2]
        if local_port != self.outbound_port:
            return str(local_ip), int(local_port)
        peer_ip, peer_port = sock.getpeername()[:2]
        (cookie,) = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        key = struct.pack("=Q", origdst_key(str(peer_ip), int(peer_port)))
        found = self._lookup(cookie, key)
        if found is None:  # a pod enrolled (or re-installed) since the last scan
            self._rescan()
            found = self._lookup(cookie, key)
        return found
