"""Zero-shot baseline: "a photo of a {class}." with the frozen backbone, on a split's test part."""

from __future__ import annotations

from pathlib import Path

import torch

from mmserve.backbone import Backbone
from mmserve.registry import DEFAULT_TEMPLATE
from training.classify import Towers, class_scores
from training.data import BadFiles
from training.metrics import accuracy, f1_scores
from training.splits import Split
from training.tensors import PartTensors, part_tensors


def zero_shot_metrics(towers: Towers, part: PartTensors, class_names: list[str], head: str = "multiclass",
                      template: str = DEFAULT_TEMPLATE, labels_per_sample: float | None = None) -> dict:
    """Zero-shot accuracy, or for multi-label heads F1 of the top-m classes (m = mean labels per sample)."""
    scores = class_scores(towers, part.images, class_names, template)
    if head == "multiclass":
        return {"accuracy": accuracy(scores.argmax(dim=-1).cpu(), part.targets)}
    m = max(1, round(labels_per_sample if labels_per_sample else float(part.targets.sum(dim=1).mean())))
    top = scores.topk(min(m, scores.shape[1]), dim=-1).indices.cpu()
    pred = torch.zeros_like(part.targets, dtype=torch.bool).scatter_(1, top, True)
    return f1_scores(pred, part.targets) | {"top_m": m}


def zero_shot(backbone: Backbone | Towers, split: Split, root: str | Path | None = None,
              template: str = DEFAULT_TEMPLATE, bad: BadFiles | None = None,
              cache_dir: str | Path | None = None) -> dict[str, dict]:
    """Zero-shot metrics of every task of `split` on its test part (images resolved against `root`)."""
    towers = backbone if isinstance(backbone, Towers) else Towers.of(backbone)
    bad = bad or BadFiles()
    root = root or split.root
    out = {}
    for name, task in split.tasks.items():
        multilabel = task.head == "multilabel"
        test = part_tensors(root, task.test, task.classes, towers.backbone.preprocess, bad, multilabel, cache_dir)
        train_labels = None
        if multilabel and task.train:
            train_labels = sum(len(it.label) for it in task.train) / len(task.train)
        out[name] = zero_shot_metrics(towers, test, task.class_names, task.head, template, train_labels)
        out[name]["n_test"] = len(test)
    return out
