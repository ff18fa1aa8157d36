"""Shared fixtures: the tiny random-initialised backbone used by unit tests (never for claimed results)."""

from __future__ import annotations

import pytest
import torch

from mmserve.backbone import TINY_MODEL, Backbone, BackboneSpec, load_backbone


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models run fastest on one thread, and far slower oversubscribed on a shared 2-core machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The tiny open_clip model (2+2 layers, width 64), random weights from seed 0."""
    return load_backbone(BackboneSpec(TINY_MODEL, seed=0))
