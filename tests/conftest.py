"""Shared fixtures, built once per test session: the tiny random-initialised backbone (never for claimed results)
and the demo registries trained on it (tests/_registry_fixture.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from _registry_fixture import Registries, build_registries
from _s3_fixture import S3Server, seaweedfs
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
def server(tmp_path_factory: pytest.TempPathFactory, demo_registries: Registries, s3: S3Server) -> Iterator[Server]:
    """`bentoml serve` on demo_registries.v1, started once; a test that reloads another registry restores v1."""
    with demo_server(tmp_path_factory.mktemp("server"), demo_registries, s3.env) as running:
        yield running


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on loopback; its endpoint and keys in this process's AWS_* variables."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
