"""Network namespaces for a 3-member etcd cluster: one namespace per member on a bridge.

``10.77.<n>.1/24`` is the bridge in the root namespace (where agents and the CLI run);
member ``i`` lives in namespace ``npe<tag>m<i>`` at ``10.77.<n>.1<i>``.  Names carry a tag
unique to this process so parallel runs do not collide; ``close()`` removes everything.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class EtcdNetns:
    members: int = 3
    tag: str = field(default_factory=lambda: format(os.getpid() % 0xFFFF, "x"))
    namespaces: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"npe{self.tag}br"

    @property
    def subnet(self) -> str:
        return f"10.77.{os.getpid() % 200 + 20}"

    def create(self) -> EtcdNetns:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.members):
                ns, host = f"npe{self.tag}m{i}", f"{self.subnet}.1{i}"
                outside, inside = f"npe{self.tag}v{i}", "eth0"
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
                _ip("link", "set", outside, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{host}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        for i in range(self.members):
            _ip("link", "del", f"npe{self.tag}v{i}", check=False)
        _ip("link", "del", self.bridge, check=False)
        self.namespaces.clear()
