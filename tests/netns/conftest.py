"""Fixtures for the root-only namespace suite.

``lab_cluster`` is a factory: ``make_cluster(nodes=2, pods_per_node=2) -> Cluster``.  Every
cluster it builds gets its own random prefix and is torn down in a finalizer, also when the
test fails; the finalizer then checks that nothing of the prefix is left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from meshlab import Cluster, ClusterSpec, cgroups, plan_cluster, random_prefix, sweep
from meshlab.build import is_lab_netns, list_netns

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def lab_cluster() -> Iterator[MakeCluster]:
    made: list[Cluster] = []

    def make_cluster(nodes: int = 2, pods_per_node: int = 2) -> Cluster:
        plan = plan_cluster(ClusterSpec(random_prefix(), nodes=nodes, pods_per_node=pods_per_node))
        # create() removes what it built if it fails, and refuses a prefix that is already
        # in use, so only a successfully created cluster is ours to tear down.
        cluster = Cluster.create(plan)
        made.append(cluster)
        return cluster

    yield make_cluster

    errors = []
    for cluster in made:
        try:
            cluster.destroy()
        except Exception as exc:  # keep tearing the others down
            errors.append(exc)
            sweep(cluster.prefix)
    leftovers = [n for c in made for n in list_netns() if is_lab_netns(n, c.prefix)]
    leftovers += [p for c in made for p in cgroups.leftovers(c.prefix)]
    assert not errors, f"teardown failed: {errors}"
    assert not leftovers, f"lab namespaces left behind: {leftovers}"
