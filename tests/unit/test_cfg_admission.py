"""admit_inbound(): the destination agent's decision, table-driven (data path and explain)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ztunnel_cfg import Snapshot, load_config_text
from ztunnel_cfg.admission import DEFAULT_CAPTURE_PORTS, admit_inbound
from ztunnel_cfg.authz import ConnectionInfo
from ztunnel_cfg.spiffe import SpiffeId

CONFIG = """\
workloads:
- {name: client, namespace: default, serviceAccount: client, workloadIps: ["10.0.1.1"], node: n1}
- {name: echo, namespace: default, serviceAccount: echo, workloadIps: ["10.0.2.2"], node: n2}
- {name: vault, namespace: secure, serviceAccount: vault, workloadIps: ["10.0.2.3"], node: n2}
- name: cart
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.2.4"]
  node: n2
  services: {"shop/cart.shop.svc.cluster.local": {80: 9090}}
- name: wp
  namespace: shop
  serviceAccount: waypoint
  workloadIps: ["10.0.2.6"]
  node: n2
  services: {"shop/waypoint.shop.svc.cluster.local": {15008: 15008}}
services:
- name: cart
  namespace: shop
  vips: ["/10.96.0.30"]
  ports: {80: 9090}
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local"}
- {name: waypoint, namespace: shop, vips: ["/10.96.0.40"], ports: {15008: 15008}}
waypoints:
- {name: waypoint, namespace: shop, service: shop/waypoint.shop.svc.cluster.local}
peerAuthentication:
- {name: strict, namespace: secure, mode: STRICT}
policies:
- name: only-client
  namespace: default
  scope: WorkloadSelector
  selector: {app: echo}
  action: Allow
  rules: [[[{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]]]
"""

SNAPSHOT = Snapshot.build(load_config_text(CONFIG, "admission.yaml"))
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
WAYPOINT = "spiffe://cluster.local/ns/shop/sa/waypoint"
OTHER = "spiffe://cluster.local/ns/shop/sa/cart"


@dataclass(frozen=True)
class Case:
    name: str
    dst: str
    peer: str | None  # None: plaintext
    port: int
    allowed: bool
    flags: str
    status: int
    rejection: str = ""
    reason: str = ""  # a part of the reason
    policy: str | None = None


CASES = [
    Case("policy allows the client", "echo", CLIENT, 8080, True, "-", 200,
         policy="default/only-client"),
    Case("policy: no ALLOW matches another identity", "echo", OTHER, 8080, False, "DENY", 401),
    Case("plaintext meets the ALLOW policy: no principal", "echo", None, 8080, False, "DENY", 401),
    Case("own capture port first, even for an allowed peer", "echo", CLIENT, 15006, False, "NR",
         400, rejection="own_port", reason="own capture ports"),
    Case("own HBONE port", "echo", CLIENT, 15008, False, "NR", 400, rejection="own_port"),
    Case("behind a waypoint: its identity is admitted", "cart", WAYPOINT, 9090, True, "-", 200),
    Case("behind a waypoint: a mesh client bypassing it", "cart", CLIENT, 9090, False, "DENY",
         401, rejection="waypoint_bypass", reason="bypasses the waypoint"),
    Case("behind a waypoint: plaintext", "cart", None, 9090, False, "DENY", 401,
         rejection="waypoint_bypass", reason="a plaintext client"),
    Case("STRICT refuses plaintext before policy", "vault", None, 8200, False, "DENY", 401,
         reason="requires mTLS (STRICT, peerAuthentication strict of namespace secure)"),
    Case("STRICT admits mTLS (no policy: allow)", "vault", CLIENT, 8200, True, "-", 200),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_admit_inbound(case: Case) -> None:
    dst = next(w for w in SNAPSHOT.config.workloads if w.name == case.dst)
    peer = SpiffeId.parse(case.peer) if case.peer else None
    got = admit_inbound(SNAPSHOT, dst, ConnectionInfo(peer, "10.0.1.1", dst.workload_ips[0],
                                                      case.port))
    assert (got.allowed, got.response_flags, got.status, got.rejection) == (
        case.allowed, case.flags, case.status, case.rejection), got
    assert case.reason in got.reason
    if case.policy is not None:
        assert got.policy == case.policy


def test_capture_ports_are_the_agents() -> None:
    # An agent started with other ports refuses those, not the defaults.
    echo = next(w for w in SNAPSHOT.config.workloads if w.name == "echo")
    conn = ConnectionInfo(SpiffeId.parse(CLIENT), "10.0.1.1", "10.0.2.2", 15006)
    assert admit_inbound(SNAPSHOT, echo, conn, (25001, 25006, 25008)).allowed
    assert DEFAULT_CAPTURE_PORTS == (15001, 15006, 15008)
    assert not admit_inbound(SNAPSHOT, echo, ConnectionInfo(
        SpiffeId.parse(CLIENT), "10.0.1.1", "10.0.2.2", 25008), (25001, 25006, 25008)).allowed
