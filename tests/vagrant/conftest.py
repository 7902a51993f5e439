"""tests/vagrant runs only against a live cluster: ``make test-vagrant`` sets NPV_SSH_CONFIG.
Without it nothing here is collected (so ``make test`` neither runs nor skips these)."""

from __future__ import annotations

import os

import pytest

from tests.vagrant.cluster import Cluster

SSH_CONFIG = os.environ.get("NPV_SSH_CONFIG")
if not SSH_CONFIG:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    assert SSH_CONFIG, "NPV_SSH_CONFIG is not set: run 'make test-vagrant'"
    return Cluster(SSH_CONFIG)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_vagrant_ebpf.py runs last: it switches the node pair to eBPF mode for good."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/vagrant/test_vagrant_ebpf.py"))
