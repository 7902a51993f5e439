"""One netns mesh for every privileged abuse test (package scope: built once, ~10 s); each
test gets it back in its base state through ``fresh`` (also after a failure half way)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.abuse.netns_mesh import fresh, module_mesh
from tests.netns.mesh_fixtures import MeshEnv


@pytest.fixture(scope="package")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshEnv]:
    with module_mesh(tmp_path_factory, "abuse") as env:
        yield env


@pytest.fixture
def env(shared_mesh: MeshEnv) -> Iterator[MeshEnv]:
    with fresh(shared_mesh) as env:
        yield env
