"""Fixtures: a real etcd (TLS, client-certificate auth, the documented roles) per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.etcd import EtcdCluster, setup_auth, single
from tests.helpers.etcd_pki import EtcdPki

NODES = ("node1", "node2", "node3", "waypoint")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    root: Path = tmp_path_factory.mktemp("etcd")
    cluster = single(root, EtcdPki(root / "pki"))
    cluster.start()
    try:
        setup_auth(cluster, NODES)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def store(etcd: EtcdCluster) -> EtcdCluster:
    """The module's etcd, emptied of nodeproxy keys before the test."""
    etcd.etcdctl(["del", "--prefix", "/nodeproxy/"])
    return etcd
