"""Configuration shared by the trainers: backbone choice, split, optimiser, and the options they share."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from mmserve.backbone import EMBEDDED_MODEL, TINY_MODEL, Backbone, BackboneSpec, load_backbone, pretrained_or_none
from mmserve.cli_args import positive_int
from training.data import BAD_FILE_POLICIES
from training.options import Opt, option

PRETRAINED_ENV = "MMSERVE_BACKBONE_PRETRAINED"

# options several configs share: one flag and help each
MODEL = Opt(help=f"open_clip model name (default {EMBEDDED_MODEL})")
PRETRAINED = Opt(help="open_clip tag or checkpoint path (default $MMSERVE_BACKBONE_PRETRAINED; 'none' = random)")
DEVICE = Opt(help="torch device, e.g. cuda")
# the options of the run fields of both trainers' configs (and of others with such a field), by field name
RUN = {
    "split_file": Opt("--split", help="split file: reused when it exists, else written"),
    "run_dir": Opt(help="where config, metrics, split and registry go"),
    "on_bad_file": Opt(choices=BAD_FILE_POLICIES,
                       help="a bad file is reported with its path, then left out (skip) or the run stops"),
    "seed": Opt(),
    "cache_dir": Opt(help="on-disk cache of preprocessed image tensors"),
    "progress": Opt("--no-progress", help="no progress bar"),
    "resume": Opt(help="continue from the run dir's last epoch checkpoint"),
    "stop_after_epoch": Opt(help="leave after this epoch (resumable)"),
    "eval_each_epoch": Opt("--no-eval-each-epoch", help="test only after the last epoch"),
}


def shots_value(value: str) -> int | None:
    """argparse type of --shots: a count, or 'all'."""
    return None if value == "all" else int(value)


@dataclass
class BackboneConfig:
    """Which frozen backbone to train on: open_clip model name and pretrained tag or checkpoint path."""

    model: str = option(EMBEDDED_MODEL, MODEL)
    pretrained: str | None = option(None, PRETRAINED)  # None = $MMSERVE_BACKBONE_PRETRAINED; "none" = random init
    device: str = option("cpu", DEVICE)
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

    shots: int | None = option(16, type=shots_value, help=lambda d: f"training samples per class, or 'all' (default "
                               f"{d or 'all'}); ignored for multi-label fusion data (every non-test sample trains)")
    # per class, this fraction (at least one when a class has two or more) is test
    test_fraction: float = option(0.5, help="per class, held out for test")
    max_test: int | None = option(None, help="cap on test samples per class")  # None = no cap
    split_by: str = option("file", choices=("file", "stem"),
                           help="'stem': one file stem (identity) is on one side in every task")
    seed: int = option(0, RUN["seed"])


@dataclass
class OptimConfig:
    """Optimiser and schedule; defaults are MmAP's (SGD, lr 0.0035, 5 epochs, batch 16, as in MaPLe)."""

    optimizer: str = option("sgd", choices=("sgd", "adamw"))
    lr: float = option(0.0035)
    momentum: float = option(0.9)  # sgd only
    weight_decay: float = option(5e-4)
    epochs: int = option(5)
    batch_size: int = option(16, type=positive_int,
                             help="samples per task and step: a multi-task step draws this many from EACH task and "
                                  "sums the task losses (MmAP eq. 11); an epoch is ceil(largest task / batch) steps")
    schedule: str = option("cosine", choices=("cosine", "constant", "step"))
    warmup_epochs: int = option(0)  # constant lr `warmup_lr` for this many epochs first (MaPLe uses 1 with 1e-5)
    warmup_lr: float = option(1e-5)
    # schedule "step": the lr is multiplied by decay_factor after each of these epochs (counted from 1)
    decay_epochs: list[int] = option(default_factory=list, help="with --schedule step: multiply the lr by "
                                     "--decay-factor after each of these epochs (e.g. 2 5)")
    decay_factor: float = option(0.1, help="with --schedule step (default 0.1)")


@dataclass(frozen=True)
class FuseRecipe:
    """A named fusion training recipe: the optimiser and schedule, and whether training images get RandAug."""

    name: str
    summary: str
    optim: OptimConfig
    randaug: bool


def _adamw(epochs: int, **schedule) -> OptimConfig:
    return OptimConfig(optimizer="adamw", lr=4e-4, weight_decay=0.01, epochs=epochs, batch_size=32, **schedule)


# AdamW lr 4e-4 (the paper's vision-side lr), weight decay 0.01, batch 32 in both; the decay factor of the paper's
# step schedule is not in the paper: 0.4 is the public MoPE code's (its milestones are epochs 3 and 6)
FUSE_RECIPES = {
    "mope-paper": FuseRecipe("mope-paper", "MoPE's paper recipe: 12 epochs, lr x 0.4 after epochs 2 and 5, RandAug",
                             _adamw(12, schedule="step", decay_epochs=[2, 5], decay_factor=0.4), randaug=True),
    "adamw-cosine-10": FuseRecipe("adamw-cosine-10", "mmserve's first fusion recipe: 10 epochs, cosine to 0, "
                                  "no augmentation", _adamw(10), randaug=False),
}
DEFAULT_FUSE_RECIPE = "adamw-cosine-10"  # what every fusion registry and table row so far was trained with
# names a recipe went by before; a clear error instead of a silent guess
RENAMED_FUSE_RECIPES = {
    "mope": "'mope' (\"MoPE's fusion recipe\") was never the paper's: it is 'adamw-cosine-10' (10 epochs, cosine, "
            "no RandAug); the paper's recipe is 'mope-paper'",
}


def fuse_recipe(name: str) -> FuseRecipe:
    """The named fusion recipe; ValueError naming the known ones (and what an old name became)."""
    if name in FUSE_RECIPES:
        return FUSE_RECIPES[name]
    if name in RENAMED_FUSE_RECIPES:
        raise ValueError(f"fusion recipe {RENAMED_FUSE_RECIPES[name]}")
    raise ValueError(f"unknown fusion recipe {name!r} (known: {', '.join(FUSE_RECIPES)})")


def recipe_optim(name: str, epochs: int | None = None) -> OptimConfig:
    """A copy of the named fusion recipe's optimiser, with `epochs` changed when given."""
    optim = fuse_recipe(name).optim
    return replace(optim, decay_epochs=list(optim.decay_epochs), **({} if epochs is None else {"epochs": epochs}))


def mope_optim(epochs: int = 10) -> OptimConfig:
    """The 'adamw-cosine-10' recipe's optimiser (its old name; it was never MoPE's paper recipe: 'mope-paper')."""
    return recipe_optim(DEFAULT_FUSE_RECIPE, epochs)


def reuse_or_load(backbone: Backbone | None, cfg: BackboneConfig) -> Backbone:
    """`backbone` when given (it must be the configured model), else load the configured one."""
    if backbone is None:
        return load_backbone(cfg.spec())
    if backbone.spec.model != cfg.model:
        raise ValueError(f"the backbone passed in is {backbone.spec.model}, the config names {cfg.model}")
    return backbone
