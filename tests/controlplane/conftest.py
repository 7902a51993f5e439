"""Fixtures: a real etcd (TLS, client-certificate auth, the documented roles) per module.

``loop_hygiene`` is the suite's (tests/conftest.py) with one allowance: gRPC (under aetcd)
keeps process-wide pollers (an epoll set, an eventfd and unix socketpairs per poller thread)
that it creates lazily and tears down on its own schedule, so those are not blamed on the test
that happened to start them.  TCP sockets (a channel left open) are still leaks.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers.etcd import EtcdCluster, setup_auth, single
from tests.helpers.etcd_pki import EtcdPki
from tests.helpers.hygiene import Baseline, LoopErrors, open_fds

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


def _unix_inodes() -> set[str]:
    with open("/proc/self/net/unix") as f:
        return {line.split()[6] for line in f.readlines()[1:] if len(line.split()) > 6}


def _grpc_pollers() -> dict[int, str]:
    unix = _unix_inodes()
    return {fd: what for fd, what in open_fds().items()
            if what in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]")
            or (what.startswith("socket:[") and what[8:-1] in unix)}


@pytest.fixture
async def loop_hygiene() -> AsyncIterator[LoopErrors]:
    loop = asyncio.get_running_loop()
    baseline = Baseline()
    errors = LoopErrors()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(errors)
    warnings.filterwarnings("error", category=ResourceWarning)
    try:
        yield errors
        baseline.fds.update(_grpc_pollers())
        problems = await baseline.check(errors)
    finally:
        warnings.filterwarnings("always", category=ResourceWarning)
        loop.set_exception_handler(previous)
    if problems:
        pytest.fail("async hygiene: " + "\n".join(problems), pytrace=False)
