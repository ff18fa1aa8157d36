"""Named fusion recipes (MoPE's paper recipe and mmserve's first), the step schedule and RandAug on cached tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmserve.backbone import TINY_MODEL
from mmserve.prompts.mope import MoPEConfig
from training.augment import TensorRandAugment
from training.config import BackboneConfig, OptimConfig, SplitConfig, fuse_recipe, mope_optim, recipe_optim
from training.mope_trainer import FuseConfig, train_mope
from training.optim import make_optimizer, make_scheduler
from training.synthetic import write_fusion_jsonl


def _lrs(cfg: OptimConfig, steps_per_epoch: int) -> list[float]:
    """The lr of the first step of every epoch."""
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for step in range(cfg.epochs * steps_per_epoch):
        if step % steps_per_epoch == 0:
            lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_the_paper_recipe_is_12_epochs_step_decay_after_2_and_5_with_randaug():
    paper = fuse_recipe("mope-paper")
    assert paper.randaug and (paper.optim.optimizer, paper.optim.lr, paper.optim.epochs) == ("adamw", 4e-4, 12)
    f = paper.optim.decay_factor
    assert _lrs(paper.optim, 3) == pytest.approx([4e-4] * 2 + [4e-4 * f] * 3 + [4e-4 * f * f] * 7)
    first = fuse_recipe("adamw-cosine-10")
    assert not first.randaug and (first.optim.schedule, first.optim.epochs) == ("cosine", 10)
    assert mope_optim() == first.optim and mope_optim(20).epochs == 20  # the old name still gives that recipe
    copy = recipe_optim("mope-paper")
    copy.decay_epochs.append(9)
    assert fuse_recipe("mope-paper").optim.decay_epochs == [2, 5]  # callers get copies


def test_old_and_unknown_recipe_names_are_refused_clearly():
    with pytest.raises(ValueError, match="adamw-cosine-10.*mope-paper"):
        fuse_recipe("mope")
    with pytest.raises(ValueError, match="known: mope-paper, adamw-cosine-10"):
        FuseConfig(recipe="fast")
    with pytest.raises(ValueError, match="decay_epochs"):
        make_scheduler(make_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(schedule="step")),
                       OptimConfig(schedule="step"), 1)


def test_a_named_recipe_sets_the_optimiser_and_randaug():
    cfg = FuseConfig(recipe="mope-paper", optim=OptimConfig(epochs=3))
    assert cfg.optim == recipe_optim("mope-paper") and cfg.randaug
    assert FuseConfig().optim == mope_optim() and not FuseConfig().randaug


def test_randaug_draws_per_sample_and_keeps_shape(tiny_backbone):
    aug = TensorRandAugment(tiny_backbone.preprocess)
    images = torch.stack([tiny_backbone.preprocess(_picture(i)) for i in range(4)])
    torch.manual_seed(0)
    out = aug(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    torch.manual_seed(0)
    assert torch.equal(aug(images), out)  # seeded: repeatable
    changed = [(out[i] - images[i]).abs().max().item() > 1e-3 for i in range(4)]
    assert any(changed)
    with pytest.raises(ValueError, match="Normalize"):
        TensorRandAugment(lambda x: x)


def _picture(i: int):
    from PIL import Image

    img = Image.new("RGB", (40, 40), (40 * i, 200 - 30 * i, 90))
    img.paste((250, 250, 250), (5 + i, 5, 20 + i, 30))
    return img


def test_a_randaug_run_trains_and_records_it(tmp_path: Path, tiny_backbone):
    write_fusion_jsonl(tmp_path / "single.jsonl", 24)
    optim = OptimConfig("adamw", 0.03, weight_decay=0.0, epochs=2, batch_size=12, schedule="step", decay_epochs=[1],
                        decay_factor=0.5)
    cfg = FuseConfig(train=str(tmp_path / "single.jsonl"), run_dir=str(tmp_path / "run"),
                     backbone=BackboneConfig(TINY_MODEL), mope=MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=32),
                     split=SplitConfig(shots=None, test_fraction=0.25), optim=optim, randaug=True, progress=False)
    run = train_mope(cfg, tiny_backbone)
    assert [e["lr"] for e in run.epochs] == pytest.approx([0.03, 0.015])
    saved = json.loads((run.run_dir / "config.json").read_text())
    assert saved["randaug"] is True and saved["optim"]["decay_epochs"] == [1]
