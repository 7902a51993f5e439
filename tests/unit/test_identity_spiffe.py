"""SPIFFE ID / node ID parsing: table of accepted and rejected shapes, with the reason."""

from __future__ import annotations

import pytest

from ztunnel_cfg.errors import SpiffeIdError
from ztunnel_cfg.spiffe import NodeId, SpiffeId

VALID = [
    ("spiffe://cluster.local/ns/default/sa/client", ("cluster.local", "default", "client")),
    ("spiffe://td/ns/a/sa/b", ("td", "a", "b")),
    (
        "spiffe://my-td_1.example/ns/kube-system/sa/x.y-z",
        ("my-td_1.example", "kube-system", "x.y-z"),
    ),
    ("spiffe://cluster.local/ns/0ns/sa/9", ("cluster.local", "0ns", "9")),
]

INVALID = [
    ("", "does not start with 'spiffe://'"),
    ("http://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///ns/a/sa/b", "trust domain is empty"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local:443/ns/a/sa/b", "trust domain"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local", "is not of the form"),
    ("spiffe://cluster.local/", "is not of the form"),
    ("spiffe://cluster.local/ns/a", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sa", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sa/b/", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "is not of the form"),
    ("spiffe://cluster.local/sa/b/ns/a", "is not of the form"),
    ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
    ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
    ("spiffe://cluster.local/ns/A/sa/b", "namespace 'A' is not a valid name"),
    ("spiffe://cluster.local/ns/a/sa/B", "service account 'B' is not a valid name"),
    ("spiffe://cluster.local/ns/-a/sa/b", "is not a valid name"),
    ("spiffe://cluster.local/ns/a-/sa/b", "is not a valid name"),
    ("spiffe://cluster.local/ns/a_b/sa/b", "is not a valid name"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query, fragment"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "query, fragment"),
    ("spiffe://cluster.local/ns/a%2F/sa/b", "query, fragment and percent-encoding"),
    ("spiffe://cluster.local/node/node1", "is not of the form"),
    ("spiffe://cluster.local/ns/./sa/b", "is not a valid name"),
]


@pytest.mark.parametrize(("text", "parts"), VALID)
def test_valid_spiffe_ids_round_trip(text: str, parts: tuple[str, str, str]) -> None:
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == parts
    assert sid.uri == text
    assert str(sid) == text
    assert SpiffeId.of(parts[1], parts[2], parts[0]) == sid


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_spiffe_ids_are_rejected_with_reason(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert reason in str(info.value)


def test_non_string_is_rejected() -> None:
    with pytest.raises(SpiffeIdError, match="not a string"):
        SpiffeId.parse(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("spiffe://cluster.local/node/node1", True),
        ("spiffe://td/node/worker-3.zone", True),
        ("spiffe://cluster.local/node/", False),
        ("spiffe://cluster.local/node/Node1", False),
        ("spiffe://cluster.local/node/a/b", False),
        ("spiffe://cluster.local/ns/a/sa/b", False),
        ("spiffe://cluster.local/nodes/node1", False),
    ],
)
def test_node_ids(text: str, ok: bool) -> None:
    if ok:
        assert NodeId.parse(text).uri == text
    else:
        with pytest.raises(SpiffeIdError):
            NodeId.parse(text)


def test_workload_and_node_ids_are_distinct_types() -> None:
    sid = SpiffeId.of("default", "node1")
    nid = NodeId.of("node1")
    node_as_object: object = nid  # distinct types: never equal, even with the same text
    assert sid != node_as_object
    assert str(nid) == "spiffe://cluster.local/node/node1"
