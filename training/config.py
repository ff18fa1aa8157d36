"""Configuration shared by the trainers: backbone choice, split, optimiser."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mmserve.backbone import EMBEDDED_MODEL, TINY_MODEL, Backbone, BackboneSpec, load_backbone, pretrained_or_none

PRETRAINED_ENV = "MMSERVE_BACKBONE_PRETRAINED"


@dataclass
class BackboneConfig:
    """Which frozen backbone to train on: open_clip model name and pretrained tag or checkpoint path."""

    model: str = EMBEDDED_MODEL
    pretrained: str | None = None  # tag or path; None = $MMSERVE_BACKBONE_PRETRAINED; "none" = random init
    device: str = "cpu"
    seed: int = 0  # random init only (tests)

    def spec(self) -> BackboneSpec:
        """The BackboneSpec to load; refuses a random init of a real model unless asked for with 'none'."""
        pretrained = self.pretrained if self.pretrained is not None else os.environ.get(PRETRAINED_ENV)
        if pretrained is None and self.model != TINY_MODEL:
            raise ValueError(f"backbone '{self.model}' needs --pretrained TAG_OR_PATH (or ${PRETRAINED_ENV}); "
                             f"pass --pretrained none for a random init")
        return BackboneSpec(self.model, pretrained_or_none(pretrained), device=self.device, seed=self.seed)


@dataclass
class SplitConfig:
    """How a train/test split is drawn: k shots per class for training, a disjoint held-out test part."""

    shots: int | None = 16  # training samples per class (None = all that are not test)
    test_fraction: float = 0.5  # per class, this fraction (at least one when a class has two or more) is test
    max_test: int | None = None  # cap on test samples per class (None = no cap)
    split_by: str = "file"  # "file", or "stem": files with one stem (one identity) fall on one side in every task
    seed: int = 0


@dataclass
class OptimConfig:
    """Optimiser and schedule; defaults are MmAP's (SGD, lr 0.0035, 5 epochs, batch 16, as in MaPLe)."""

    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.0035
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 16  # per task and step
    schedule: str = "cosine"  # "cosine" or "constant"
    warmup_epochs: int = 0  # constant lr `warmup_lr` for this many epochs first (MaPLe uses 1 with 1e-5)
    warmup_lr: float = 1e-5


def mope_optim(epochs: int = 10) -> OptimConfig:
    """MoPE's fusion recipe: AdamW lr 4e-4 (the paper's vision-side lr), weight decay 0.01, batch 32."""
    return OptimConfig(optimizer="adamw", lr=4e-4, weight_decay=0.01, epochs=epochs, batch_size=32)


def reuse_or_load(backbone: Backbone | None, cfg: BackboneConfig) -> Backbone:
    """`backbone` when given (it must be the configured model), else load the configured one."""
    if backbone is None:
        return load_backbone(cfg.spec())
    if backbone.spec.model != cfg.model:
        raise ValueError(f"the backbone passed in is {backbone.spec.model}, the config names {cfg.model}")
    return backbone
