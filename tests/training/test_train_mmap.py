"""Multi-task MmAP trainer on the tiny backbone: learning, registry round trip, determinism, resume, ablations."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmserve.backbone import TINY_MODEL
from mmserve.builders import load_classify_prompts, load_registry
from mmserve.prompts import MmAPConfig, mmap_param_count
from training.classify import Towers, predict
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.data import BadFiles, Item
from training.grouping import GroupingConfig
from training.mmap_trainer import MultiTaskConfig, PromptSpec, train_multitask
from training.splits import read_split
from training.synthetic import write_image_task
from training.tensors import part_tensors


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Two colour tasks (same classes, different drawings), 12 images per class."""
    root = tmp_path_factory.mktemp("mmap") / "data"
    for i, task in enumerate(("clipart", "sketch")):
        write_image_task(root, task, {"red": "red", "blue": "blue"}, 12, seed=i)
    return root


def _config(root: Path, run_dir: Path, **changes) -> MultiTaskConfig:
    cfg = MultiTaskConfig(root=str(root), run_dir=str(run_dir), backbone=BackboneConfig(TINY_MODEL),
                          split=SplitConfig(shots=8, test_fraction=0.3),
                          optim=OptimConfig(epochs=15, batch_size=8, lr=0.1, schedule="constant", weight_decay=0.0),
                          grouping=GroupingConfig("all"), progress=False)
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def trained(data_root: Path, tiny_backbone):
    """One full MmAP run (group-shared + task-specific)."""
    return train_multitask(_config(data_root, data_root.parent / "run"), tiny_backbone)


def _registry_predictions(run_dir: Path, backbone) -> dict[str, list[str]]:
    """Predict every test image of the run's split through load_registry + builders, as a server would."""
    registry = load_registry(run_dir / "registry", backbone)
    split = read_split(run_dir / "split.json")
    towers = Towers.of(backbone)
    out = {}
    for name, task in split.tasks.items():
        entry = registry.manifest.task(name)
        names = task.name_of()
        items = [Item(it.image, names[it.label]) for it in task.test]
        part = part_tensors(split.root, items, entry.classes, backbone.preprocess, BadFiles("stop"))
        prompts = load_classify_prompts(registry, name, backbone)()
        out[name] = [entry.classes[j] for j in predict(towers, part.images, entry.classes, entry.template, prompts)]
    return out


def test_loss_falls_and_beats_zero_shot(trained):
    losses = [e["train_loss"] for e in trained.epochs]
    assert len(losses) == 15
    assert losses[0] - losses[-1] > 0.2
    assert losses[-1] < math.log(2) - 0.05  # below chance: the prompts discriminate, not just flatten logits
    assert trained.epochs[-1]["train_accuracy"] > 0.8
    assert trained.final["accuracy_mean"] >= 0.75 > trained.final["zero_shot_accuracy_mean"]


def test_run_dir_holds_config_metrics_split_and_registry(trained):
    run = trained.run_dir
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["optim"]["lr"] == 0.1 and config["prompt"]["kind"] == "mmap" and config["backbone_fingerprint"]
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 16))
    assert all("test_accuracy" in e["tasks"]["clipart"] for e in metrics["epochs"])
    assert metrics["final"]["tasks"]["sketch"]["accuracy"] == trained.final["tasks"]["sketch"]["accuracy"]
    manifest = json.loads((run / "registry" / "manifest.json").read_text())
    assert manifest["backbone"]["model"] == TINY_MODEL
    (group,) = manifest["groups"]
    assert group["tasks"] == ["clipart", "sketch"]
    per_prompt = mmap_param_count(MmAPConfig(), 64, 64, 2)
    assert group["trainable_params"] == per_prompt and trained.trainable_params == 3 * per_prompt
    for task in manifest["tasks"]:
        assert task["group"] == "group0" and task["trainable_params"] == per_prompt
        assert task["metrics"]["accuracy"] == trained.final["tasks"][task["name"]]["accuracy"]
        assert 0 <= task["metrics"]["zero_shot_accuracy"] <= 1 and task["metrics"]["params_used"] == 2 * per_prompt


def test_registry_entry_predicts_what_the_trainer_evaluated(trained, tiny_backbone):
    served = _registry_predictions(trained.run_dir, tiny_backbone)
    assert served == trained.predictions
    split = read_split(trained.run_dir / "split.json")
    for name, preds in served.items():
        names = split.tasks[name].name_of()
        truth = [names[it.label] for it in split.tasks[name].test]
        acc = sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth)
        assert acc == pytest.approx(trained.final["tasks"][name]["accuracy"])


def test_same_seed_gives_the_same_split_and_metrics(trained, data_root, tiny_backbone):
    again = train_multitask(_config(data_root, data_root.parent / "again"), tiny_backbone)
    assert (again.run_dir / "split.json").read_bytes() == (trained.run_dir / "split.json").read_bytes()
    assert again.epochs == trained.epochs and again.final == trained.final


def test_resume_continues_exactly_where_it_stopped(trained, data_root, tiny_backbone, monkeypatch):
    run_dir = data_root.parent / "resumed"
    first = train_multitask(_config(data_root, run_dir, stop_after_epoch=6), tiny_backbone)
    assert first.final == {"stopped_after_epoch": 6} and not (run_dir / "registry").exists()
    with pytest.raises(ValueError, match="different config"):
        train_multitask(_config(data_root, run_dir, resume=True, optim=OptimConfig(lr=0.2)), tiny_backbone)
    import training.mmap_trainer as trainer

    steps = []
    real_step = trainer.multitask_step
    monkeypatch.setattr(trainer, "multitask_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    resumed = train_multitask(_config(data_root, run_dir, resume=True), tiny_backbone)
    assert len(steps) == 9 * 2  # only epochs 7..15 ran (2 steps each)
    assert resumed.epochs == trained.epochs and resumed.final == trained.final


@pytest.mark.parametrize(("kind", "sharing"), [("text", "task"), ("vision", "task"), ("mmap", "task"),
                                               ("mmap", "group"), ("text", "group+task")])
def test_ablations_train_save_and_load(kind, sharing, data_root, tiny_backbone):
    run_dir = data_root.parent / f"{kind}-{sharing}"
    cfg = _config(data_root, run_dir, prompt=PromptSpec(kind=kind, sharing=sharing),
                  optim=OptimConfig(epochs=2, batch_size=8, lr=0.1))
    result = train_multitask(cfg, tiny_backbone)
    assert _registry_predictions(run_dir, tiny_backbone) == result.predictions
    manifest = json.loads((run_dir / "registry" / "manifest.json").read_text())
    per_prompt = 2 * 4 * 64 if kind != "mmap" else mmap_param_count(MmAPConfig(), 64, 64, 2)  # K * b * d
    assert all(t["trainable_params"] == per_prompt for t in manifest["tasks"])
    if sharing == "task":
        assert manifest["groups"] == [] and all(t["group"] is None for t in manifest["tasks"])
        assert result.trainable_params == 2 * per_prompt
    elif sharing == "group":  # one shared prompt, stored under each task
        assert manifest["groups"] == [] and result.trainable_params == per_prompt
        assert all(t["metrics"]["shared_with"] == ["clipart", "sketch"] for t in manifest["tasks"])
        weights = load_registry(run_dir / "registry", tiny_backbone).task_weights
        assert all(torch.equal(weights["clipart"][k], weights["sketch"][k]) for k in weights["clipart"])
    else:
        assert len(manifest["groups"]) == 1 and result.trainable_params == 3 * per_prompt
    tower = {"text": "text", "vision": "vision"}.get(kind)
    if tower:
        assert all(t["prompt_config"]["tower"] == tower for t in manifest["tasks"])


def test_text_only_steps_run_the_image_tower_once_per_run_with_the_same_losses(tiny_backbone, monkeypatch):
    from mmserve.prompts import TowerPrompts
    from training.multitask import TaskData, multitask_step
    from training.tensors import PartTensors

    towers = Towers.of(tiny_backbone)
    gen = torch.Generator().manual_seed(0)
    tasks = [TaskData(f"t{i}", ["a", "b", "c"], ["cat", "dog", "owl"],
                      PartTensors(torch.randn(10, 3, 32, 32, generator=gen), torch.arange(10) % 3, [None] * 10),
                      PartTensors(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), []))
             for i in range(2)]
    text = torch.randn(2, 4, 64, generator=gen).requires_grad_()  # (K, P, d) of the tiny text tower
    prompts = [TowerPrompts(text=text), TowerPrompts(text=-text)]
    batches = [torch.tensor([3, 1, 7]), torch.tensor([0, 9])]

    def uncached(t: TaskData, idx: torch.Tensor, p: TowerPrompts) -> torch.Tensor:
        with torch.no_grad():
            img = towers.image(t.train.images[idx])
        txt = towers.text(t.class_tokens(towers, "{}", 4), p.text)
        return torch.nn.functional.cross_entropy(tiny_backbone.logit_scale * img @ txt.T, t.train.targets[idx])

    images_seen = []
    real_image = towers.image
    monkeypatch.setattr(towers, "image", lambda x, *a, **k: images_seen.append(len(x)) or real_image(x, *a, **k))
    for _ in range(3):
        out = multitask_step(towers, tasks, prompts, batches, "{}")
    assert images_seen == [10, 10]  # every train image of each task once, over three steps
    monkeypatch.setattr(towers, "image", real_image)
    for loss, t, idx, p in zip(out.losses, tasks, batches, prompts, strict=True):
        assert float(loss.detach()) == pytest.approx(float(uncached(t, idx, p).detach()), abs=1e-5)
    out.losses[0].backward()  # the text prompts still train
    assert text.grad is not None and float(text.grad.abs().sum()) > 0


def test_visual_only_steps_run_the_text_tower_once_per_run_with_the_same_losses(tiny_backbone, monkeypatch):
    from mmserve.prompts import TowerPrompts
    from training.multitask import TaskData, multitask_step
    from training.tensors import PartTensors

    towers = Towers.of(tiny_backbone)
    gen = torch.Generator().manual_seed(1)
    tasks = [TaskData(f"t{i}", ["a", "b", "c"], ["cat", "dog", "owl"],
                      PartTensors(torch.randn(10, 3, 32, 32, generator=gen), torch.arange(10) % 3, [None] * 10),
                      PartTensors(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), []))
             for i in range(2)]
    vision = torch.randn(2, 4, 64, generator=gen).requires_grad_()  # (K, P, d) of the tiny image tower
    prompts = [TowerPrompts(vision=vision), TowerPrompts(vision=-vision)]
    batches = [torch.tensor([3, 1, 7]), torch.tensor([0, 9])]

    def uncached(t: TaskData, idx: torch.Tensor, p: TowerPrompts) -> torch.Tensor:
        img = towers.image(t.train.images[idx], p.vision)
        with torch.no_grad():
            txt = towers.text(t.class_tokens(towers, "{}", 0))
        return torch.nn.functional.cross_entropy(tiny_backbone.logit_scale * img @ txt.T, t.train.targets[idx])

    rows_seen = []
    real_forward = towers.text.forward  # patched on the module: class_tokens still needs towers.text.tokenize
    monkeypatch.setattr(towers.text, "forward", lambda x, *a, **k: rows_seen.append(len(x)) or real_forward(x, *a, **k))
    for _ in range(3):
        out = multitask_step(towers, tasks, prompts, batches, "{}")
    assert rows_seen == [3, 3]  # each task's 3 class prompts once, over three steps
    monkeypatch.setattr(towers.text, "forward", real_forward)
    for loss, t, idx, p in zip(out.losses, tasks, batches, prompts, strict=True):
        assert float(loss.detach()) == pytest.approx(float(uncached(t, idx, p).detach()), abs=1e-5)
    out.losses[0].backward()  # the visual prompts still train
    assert vision.grad is not None and float(vision.grad.abs().sum()) > 0
