"""Pure parts of the control plane: store URLs, registrations, the fleet view, status text."""

from __future__ import annotations

import pytest

from nodeproxy.controlplane.endpoint import parse_store_url
from nodeproxy.controlplane.errors import StoreError
from nodeproxy.controlplane.registration import Registration, fleet_view, registration_key
from nodeproxy.controlplane.source import StoreStatus


@pytest.mark.parametrize(("url", "target", "tls"), [
    ("etcd://127.0.0.1:2379", "127.0.0.1:2379", False),
    ("etcd://etcd.example:2379", "etcd.example:2379", False),
    ("etcd://10.0.0.1:2379,10.0.0.2:2379", "ipv4:10.0.0.1:2379,10.0.0.2:2379", False),
    ("etcd://[::1]:2379", "[::1]:2379", False),
    ("etcd://10.0.0.1:2379?ca=/ca.pem&cert=/c.pem&key=/k.pem", "10.0.0.1:2379", True),
])
def test_store_urls(url: str, target: str, tls: bool) -> None:
    spec = parse_store_url(url)
    assert spec.target == target
    assert spec.tls is tls


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:2379", "not a store URL"),
    ("etcd://127.0.0.1", "bad endpoint"),
    ("etcd://127.0.0.1:99999", "bad endpoint"),
    ("etcd://a.example:1,b.example:2", "not an IP address"),
    ("etcd://127.0.0.1:2379?cert=/c.pem&key=/k.pem", "needs TLS"),
    ("etcd://127.0.0.1:2379?ca=/ca.pem&cert=/c.pem", "both cert= and key="),
    ("etcd://127.0.0.1:2379?bogus=1", "unknown parameter 'bogus'"),
    ("etcd://127.0.0.1:2379?timeout=soon", "timeout must be seconds"),
])
def test_bad_store_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        parse_store_url(url)


def test_registration_round_trip_and_key() -> None:
    reg = Registration("node1", "agent", "0.1.0", 42, ("a", "b"), stale=False)
    assert Registration.from_json(reg.to_json()) == reg
    assert registration_key("default/waypoint") == "/nodeproxy/nodes/v1/default.waypoint"


def test_fleet_view_says_who_has_converged() -> None:
    fleet = fleet_view(10, {
        "/nodeproxy/nodes/v1/a": Registration("a", "agent", "v", 10).to_json(),
        "/nodeproxy/nodes/v1/b": Registration("b", "agent", "v", 9).to_json(),
        "/nodeproxy/nodes/v1/c": Registration("c", "agent", "v", 11, stale=True).to_json(),
        "/nodeproxy/nodes/v1/d": b"not json",
    })
    assert [(m.registration.name, m.converged) for m in fleet.members] == [
        ("a", True), ("b", False), ("c", False)]
    assert fleet.bad == ("/nodeproxy/nodes/v1/d",)
    assert not fleet.converged
    assert fleet_view(5, {}).converged


def test_status_text() -> None:
    live = StoreStatus("etcd://x:1", connected=True, revision=7)
    assert live.detail(100.0) == "config: etcd revision 7"
    assert live.summary(100.0)["state"] == "live"
    stale = StoreStatus("etcd://x:1", connected=False, revision=7, stale_since=90.0,
                        last_error="UNAVAILABLE")
    assert stale.detail(100.0).startswith("config stale: etcd unreachable for 10 s (UNAVAILABLE)")
    assert stale.summary(100.0)["staleSeconds"] == 10.0
