"""route(): table-driven, in the manner of ztunnel's build_request tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from ztunnel_cfg import RouteKind, Snapshot, Workload, load_config_text, route

CONFIG = """\
workloads:
- {name: client, namespace: default, serviceAccount: client, workloadIps: ["10.0.1.1"], node: n1}
- name: echo-a
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.1.2", "fd00::2"]
  node: n1
  services: {"default/echo.default.svc.cluster.local": {80: 8080, 443: 8443}}
- name: echo-b
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.2.2"]
  node: n2
  services: {"default/echo.default.svc.cluster.local": {80: 9999}}   # overrides service port
- name: echo-sick
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.0.2.3"]
  node: n2
  healthy: false
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
- name: legacy
  namespace: legacy
  workloadIps: ["10.0.1.9"]
  node: n1
  protocol: TCP
  services: {"legacy/db.legacy.svc.cluster.local": {5432: 5432}}
- name: cart
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.2.4"]
  node: n2
  services: {"shop/cart.shop.svc.cluster.local": {80: 9090}}
- name: billing
  namespace: shop
  serviceAccount: billing
  workloadIps: ["10.0.2.5"]
  node: n2
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local", hboneMtlsPort: 15009}
- name: wp
  namespace: shop
  serviceAccount: waypoint
  workloadIps: ["10.0.2.6"]
  node: n2
  services: {"shop/waypoint.shop.svc.cluster.local": {15008: 15008}}
- name: lonely
  namespace: shop
  workloadIps: ["10.0.2.7"]
  node: n2
  waypoint: {destination: "shop/dead-wp.shop.svc.cluster.local"}
services:
- name: echo
  namespace: default
  vips: ["/10.96.0.10", "/fd00:96::10"]
  ports: {80: 8080, 443: 8443, 8000: 8000}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo-svc"]
- {name: db, namespace: legacy, vips: ["/10.96.0.20"], ports: {5432: 5432}}
- name: cart
  namespace: shop
  vips: ["/10.96.0.30"]
  ports: {80: 9090}
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local"}
- {name: waypoint, namespace: shop, vips: ["/10.96.0.40"], ports: {15008: 15008}}
- {name: empty, namespace: shop, vips: ["/10.96.0.50"], ports: {80: 80}}
- {name: dead-wp, namespace: shop, vips: ["/10.96.0.60"], ports: {15008: 15008}}
"""

SNAPSHOT = Snapshot.build(load_config_text(CONFIG, "routing.yaml"))


def w(name: str) -> Workload:
    found = [x for x in SNAPSHOT.config.workloads if x.name == name]
    assert found, name
    return found[0]


def last(endpoints: Sequence[Workload]) -> Workload:
    return endpoints[-1]


@dataclass(frozen=True)
class Case:
    name: str
    source: str | None
    dst: str
    port: int
    kind: RouteKind
    target: str | None
    target_port: int
    tunnel_port: int | None
    destination: str | None = None
    service: str | None = None
    identities: tuple[str, ...] = ()
    authority: str | None = None
    choose: object = None
    reason: str = ""


ECHO = "spiffe://cluster.local/ns/default/sa/echo"
ECHO_SVC = "spiffe://cluster.local/ns/default/sa/echo-svc"
WP = "spiffe://cluster.local/ns/shop/sa/waypoint"
ECHO_KEY = "default/echo.default.svc.cluster.local"
CART_KEY = "shop/cart.shop.svc.cluster.local"

CASES = [
    Case(
        "vip -> first healthy endpoint, service target port",
        "client",
        "10.96.0.10",
        80,
        RouteKind.HBONE,
        "10.0.1.2",
        8080,
        15008,
        "echo-a",
        ECHO_KEY,
        (ECHO, ECHO_SVC),
        "10.0.1.2:8080",
        reason="-> endpoint default/echo-a",
    ),
    Case(
        "vip -> chosen endpoint's own port mapping wins",
        "client",
        "10.96.0.10",
        80,
        RouteKind.HBONE,
        "10.0.2.2",
        9999,
        15008,
        "echo-b",
        ECHO_KEY,
        (ECHO, ECHO_SVC),
        "10.0.2.2:9999",
        choose=last,
    ),
    Case(
        "vip second port",
        "client",
        "10.96.0.10",
        443,
        RouteKind.HBONE,
        "10.0.1.2",
        8443,
        15008,
        "echo-a",
        ECHO_KEY,
        (ECHO, ECHO_SVC),
        "10.0.1.2:8443",
    ),
    Case(
        "vip port not mapped by workload nor service falls back to same port",
        None,
        "10.96.0.10",
        8000,
        RouteKind.HBONE,
        "10.0.1.2",
        8000,
        15008,
        "echo-a",
        ECHO_KEY,
        (ECHO, ECHO_SVC),
        "10.0.1.2:8000",
    ),
    Case(
        "vip on undeclared port is not the service",
        "client",
        "10.96.0.10",
        81,
        RouteKind.PASSTHROUGH,
        "10.96.0.10",
        81,
        None,
        reason="not a known workload or service",
    ),
    Case(
        "ipv6 vip picks the endpoint's ipv6 address",
        "client",
        "fd00:96::10",
        80,
        RouteKind.HBONE,
        "fd00::2",
        8080,
        15008,
        "echo-a",
        ECHO_KEY,
        (ECHO, ECHO_SVC),
        "[fd00::2]:8080",
    ),
    Case(
        "vip -> TCP endpoint is load-balanced passthrough",
        "client",
        "10.96.0.20",
        5432,
        RouteKind.PASSTHROUGH,
        "10.0.1.9",
        5432,
        None,
        "legacy",
        "legacy/db.legacy.svc.cluster.local",
        reason="not in the mesh",
    ),
    Case(
        "service without endpoints",
        "client",
        "10.96.0.50",
        80,
        RouteKind.NO_ENDPOINTS,
        "10.96.0.50",
        80,
        None,
        None,
        "shop/empty.shop.svc.cluster.local",
        reason="has no healthy endpoints (0 listed, 0 unhealthy)",
    ),
    Case(
        "service with waypoint -> waypoint",
        "client",
        "10.96.0.30",
        80,
        RouteKind.WAYPOINT,
        "10.0.2.6",
        80,
        15008,
        "wp",
        CART_KEY,
        (WP,),
        "10.96.0.30:80",
        reason="has waypoint shop/waypoint.shop.svc.cluster.local",
    ),
    Case(
        "from plaintext/unknown source, still via waypoint",
        None,
        "10.96.0.30",
        80,
        RouteKind.WAYPOINT,
        "10.0.2.6",
        80,
        15008,
        "wp",
        CART_KEY,
        (WP,),
        "10.96.0.30:80",
    ),
    Case(
        "the waypoint itself goes to the endpoint",
        "wp",
        "10.96.0.30",
        80,
        RouteKind.HBONE,
        "10.0.2.4",
        9090,
        15008,
        "cart",
        CART_KEY,
        ("spiffe://cluster.local/ns/shop/sa/cart",),
        "10.0.2.4:9090",
    ),
    Case(
        "pod IP of a workload whose service has a waypoint -> that waypoint (no bypass)",
        "client",
        "10.0.2.4",
        9090,
        RouteKind.WAYPOINT,
        "10.0.2.6",
        9090,
        15008,
        "wp",
        None,
        (WP,),
        "10.0.2.4:9090",
        reason="workload shop/cart has waypoint shop/waypoint.shop.svc.cluster.local",
    ),
    Case(
        "pod IP of a workload with no waypoint anywhere -> HBONE direct",
        "client",
        "10.0.1.2",
        8080,
        RouteKind.HBONE,
        "10.0.1.2",
        8080,
        15008,
        "echo-a",
        None,
        (ECHO,),
        "10.0.1.2:8080",
    ),
    Case(
        "pod IP of a workload with waypoint -> waypoint on its hboneMtlsPort",
        "client",
        "10.0.2.5",
        7000,
        RouteKind.WAYPOINT,
        "10.0.2.6",
        7000,
        15009,
        "wp",
        None,
        (WP,),
        "10.0.2.5:7000",
        reason="workload shop/billing has waypoint",
    ),
    Case(
        "waypoint reaching its workload goes direct",
        "wp",
        "10.0.2.5",
        7000,
        RouteKind.HBONE,
        "10.0.2.5",
        7000,
        15008,
        "billing",
        None,
        ("spiffe://cluster.local/ns/shop/sa/billing",),
        "10.0.2.5:7000",
    ),
    Case(
        "waypoint without workloads -> NO_ENDPOINTS",
        "client",
        "10.0.2.7",
        80,
        RouteKind.NO_ENDPOINTS,
        "10.0.2.7",
        80,
        None,
        "lonely",
        None,
        reason="which has no healthy workloads",
    ),
    Case(
        "TCP workload by pod IP -> passthrough",
        "client",
        "10.0.1.9",
        5432,
        RouteKind.PASSTHROUGH,
        "10.0.1.9",
        5432,
        None,
        "legacy",
    ),
    Case(
        "unhealthy pod addressed directly still routes",
        "client",
        "10.0.2.3",
        8080,
        RouteKind.HBONE,
        "10.0.2.3",
        8080,
        15008,
        "echo-sick",
        None,
        (ECHO,),
        "10.0.2.3:8080",
    ),
    Case(
        "unknown IP -> passthrough",
        "client",
        "93.184.216.34",
        443,
        RouteKind.PASSTHROUGH,
        "93.184.216.34",
        443,
        None,
    ),
    Case(
        "unknown IPv6 -> passthrough",
        None,
        "2001:db8::1",
        443,
        RouteKind.PASSTHROUGH,
        "2001:db8::1",
        443,
        None,
    ),
    Case(
        "not an IP at all",
        "client",
        "not-an-ip",
        80,
        RouteKind.PASSTHROUGH,
        None,
        80,
        None,
        reason="is not an IP address",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_route(case: Case) -> None:
    source = w(case.source) if case.source else None
    r = route(SNAPSHOT, source, case.dst, case.port, choose=case.choose)  # type: ignore[arg-type]
    assert r.kind is case.kind, r.reason
    expected_ip = ipaddress.ip_address(case.target) if case.target else None
    assert (r.target_ip, r.target_port, r.tunnel_port) == (
        expected_ip,
        case.target_port,
        case.tunnel_port,
    ), r.reason
    assert (r.destination.name if r.destination else None) == case.destination
    if case.service is not None or case.kind is not RouteKind.HBONE:
        assert (r.service.key if r.service else None) == case.service
    if case.identities or case.kind is not RouteKind.HBONE:
        assert tuple(str(i) for i in r.expected_identities) == case.identities
    if case.authority is not None or case.kind in (RouteKind.PASSTHROUGH, RouteKind.NO_ENDPOINTS):
        assert r.authority == case.authority
    assert case.reason in r.reason


def test_only_healthy_endpoints_are_offered_to_the_chooser() -> None:
    offered: list[tuple[str, ...]] = []

    def spy(endpoints: Sequence[Workload]) -> Workload:
        offered.append(tuple(e.name for e in endpoints))
        return endpoints[0]

    route(SNAPSHOT, w("client"), "10.96.0.10", 80, choose=spy)
    assert offered == [("echo-a", "echo-b")]


def test_round_robin_chooser_spreads_connections() -> None:
    counter = iter(range(100))

    def rr(endpoints: Sequence[Workload]) -> Workload:
        return endpoints[next(counter) % len(endpoints)]

    picks = [route(SNAPSHOT, None, "10.96.0.10", 80, choose=rr).destination for _ in range(4)]
    assert [p.name for p in picks if p] == ["echo-a", "echo-b", "echo-a", "echo-b"]


def test_all_endpoints_unhealthy() -> None:
    text = CONFIG.replace(
        '  workloadIps: ["10.0.1.2", "fd00::2"]\n  node: n1\n',
        '  workloadIps: ["10.0.1.2", "fd00::2"]\n  node: n1\n  healthy: false\n',
    )
    text = text.replace(
        '  workloadIps: ["10.0.2.2"]\n  node: n2\n',
        '  workloadIps: ["10.0.2.2"]\n  node: n2\n  healthy: false\n',
    )
    snapshot = Snapshot.build(load_config_text(text))
    r = route(snapshot, None, "10.96.0.10", 80)
    assert r.kind is RouteKind.NO_ENDPOINTS
    assert "(3 listed, 3 unhealthy)" in r.reason


ADMISSION = [
    # (destination, peer, refused?)
    ("cart", "spiffe://cluster.local/ns/shop/sa/waypoint", False),
    ("cart", "spiffe://cluster.local/ns/default/sa/client", True),
    ("cart", None, True),
    ("billing", "spiffe://cluster.local/ns/shop/sa/waypoint", False),
    ("billing", "spiffe://cluster.local/ns/shop/sa/cart", True),
    ("echo-a", "spiffe://cluster.local/ns/default/sa/client", False),
    ("echo-a", None, False),
]


@pytest.mark.parametrize(("dst", "peer", "refused"), ADMISSION,
                         ids=[f"{d}<-{p or 'plaintext'}" for d, p, _ in ADMISSION])
def test_inbound_waypoint_admission(dst: str, peer: str | None, refused: bool) -> None:
    from ztunnel_cfg.routing import inbound_waypoint_refusal
    from ztunnel_cfg.spiffe import SpiffeId

    why = inbound_waypoint_refusal(SNAPSHOT, w(dst), SpiffeId.parse(peer) if peer else None)
    assert (why is not None) is refused, why
    if why is not None:
        assert "bypasses the waypoint" in why
        assert "shop/waypoint.shop.svc.cluster.local" in why


def test_waypoints_are_not_captured() -> None:
    from ztunnel_cfg.routing import is_waypoint

    assert is_waypoint(SNAPSHOT, w("wp")) is False  # not declared under waypoints: here
    snap = Snapshot.build(load_config_text(CONFIG + """\
waypoints:
- {name: waypoint, namespace: shop, service: shop/waypoint.shop.svc.cluster.local,
   trafficType: all}
""", "routing.yaml"))
    assert is_waypoint(snap, next(x for x in snap.config.workloads if x.name == "wp"))
    assert not is_waypoint(snap, next(x for x in snap.config.workloads if x.name == "cart"))


WAYPOINT_USE = """\
workloads:
- {name: wp, namespace: a, workloadIps: ["10.0.0.9"], node: n,
   services: {a/wp.a.svc.cluster.local: {15008: 15008}}}
- {name: pod, namespace: a, workloadIps: ["10.0.0.1"], node: n, %s
   services: {a/web.a.svc.cluster.local: {80: 80}}}
services:
- {name: wp, namespace: a, vips: ["/10.96.0.9"], ports: {15008: 15008}}
- {name: web, namespace: a, vips: ["/10.96.0.1"], ports: {80: 80}, %s}
waypoints: [{name: wp, namespace: a, service: a/wp.a.svc.cluster.local, trafficType: %s}]
"""
USE = "waypoint: {destination: a/wp.a.svc.cluster.local}"


@pytest.mark.parametrize(("workload", "service", "traffic_type", "error"), [
    (False, True, "service", None),
    (False, True, "all", None),
    (True, False, "workload", None),
    (True, True, "all", None),
    (False, True, "workload", "service a/web.a.svc.cluster.local uses waypoint a/wp, whose "
     "trafficType is workload: it handles no service traffic"),
    (True, False, "service", "workload a/pod uses waypoint a/wp, whose trafficType is "
     "service: it handles no workload traffic"),
])
def test_waypoint_traffic_type_is_checked(workload: bool, service: bool, traffic_type: str,
                                          error: str | None) -> None:
    from ztunnel_cfg.errors import ConfigError

    text = WAYPOINT_USE % (USE + "," if workload else "", USE if service else "x: 1",
                           traffic_type)
    text = text.replace(", x: 1}", "}")
    if error is None:
        load_config_text(text, "t.yaml")
        return
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "t.yaml")
    assert error in str(exc.value)


def test_waypoint_without_a_waypoints_entry_warns() -> None:
    from ztunnel_cfg.loader import validate_config_text

    text = (WAYPOINT_USE % ("", USE, "service")).replace("waypoints: [", "x: [")
    text = text.replace("\nx: [{name: wp, namespace: a, service: a/wp.a.svc.cluster.local, "
                        "trafficType: service}]", "")
    (warning,) = validate_config_text(text, "t.yaml").warnings
    assert "no 'waypoints:' entry declares it" in warning.message
    assert "refused until one does" in warning.message
