"""Shared fixtures, built once per test session: the tiny random-initialised backbone (never for claimed results)
and the demo registries trained on it (tests/_registry_fixture.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _registry_fixture import Registries, build_registries
from _server_fixture import Server, demo_server

from mmserve.backbone import TINY_MODEL, Backbone, BackboneSpec, load_backbone


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models run fastest on one thread, and far slower oversubscribed on a shared 2-core machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The tiny open_clip model (2+2 layers, width 64), random weights from seed 0."""
    return load_backbone(BackboneSpec(TINY_MODEL, seed=0))


@pytest.fixture(scope="session")
def demo_registries(tmp_path_factory: pytest.TempPathFactory) -> Registries:
    """Two versions of a small trained registry (classification + fusion tasks) on the tiny backbone."""
    return build_registries(tmp_path_factory.mktemp("demo-registries"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, demo_registries: Registries) -> Iterator[Server]:
    """`bentoml serve` on demo_registries.v1, started once; a test that reloads another registry restores v1."""
    with demo_server(tmp_path_factory.mktemp("server"), demo_registries) as running:
        yield running
