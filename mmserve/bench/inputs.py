"""The benchmark's inputs: synthetic pictures, a random registry, real images paired with their tasks."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmserve.backbone import Backbone
from mmserve.builders import classify_prompt_module
from mmserve.prompts import MmAPConfig, count_params
from mmserve.registry import BackboneRef, GroupEntry, Manifest, TaskEntry, save_registry


def synthetic_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic procedural pictures (coloured shapes on a tinted background)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(size // 8, size // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        images.append(img)
    return images


def make_random_registry(root: Path, backbone: Backbone, n_tasks: int, n_classes: int = 10,
                         tasks_per_group: int = 4, seed: int = 0) -> Path:
    """A registry of `n_tasks` MmAP tasks with random (untrained) prompts: for speed measurements only."""
    torch.manual_seed(seed)
    config = MmAPConfig().to_dict()
    groups, tasks, group_w, task_w = [], [], {}, {}
    for g in range((n_tasks + tasks_per_group - 1) // tasks_per_group):
        names = [f"task{t:02d}" for t in range(g * tasks_per_group, min(n_tasks, (g + 1) * tasks_per_group))]
        group = classify_prompt_module(config, backbone)
        groups.append(GroupEntry(f"group{g}", names, config, count_params(group)))
        group_w[f"group{g}"] = group.state_dict()
        for name in names:
            module = classify_prompt_module(config, backbone)
            tasks.append(TaskEntry(name, "classify", [f"thing {c} of {name}" for c in range(n_classes)], config,
                                   count_params(module), group=f"group{g}"))
            task_w[name] = module.state_dict()
    manifest = Manifest(BackboneRef(backbone.spec.model, backbone.fingerprint, backbone.spec.pretrained), groups,
                        tasks)
    save_registry(root, manifest, group_w, task_w)
    return root


def mixed_tasks(task_names: list[str], batch: int) -> list[str]:
    """Task names cycled over a batch: every sample of a mixed batch from another task."""
    return [task_names[i % len(task_names)] for i in range(batch)]


def agreement_inputs(root: Path, n: int, task_names: list[str], seed: int) -> tuple[list[Path], list[str]]:
    """Up to `n` image files under `root` (seeded sample), each with its task: the first folder under `root`
    when that is a task name (e.g. <root>/<style>/<class>/x.png), else the tasks cycled."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise ValueError(f"--agreement-root {root}: no .png/.jpg image under it")
    files = sorted(random.Random(seed).sample(files, min(n, len(files))))
    cycled = mixed_tasks(task_names, len(files))
    tasks = [p.relative_to(root).parts[0] if p.relative_to(root).parts[0] in task_names else t
             for p, t in zip(files, cycled, strict=True)]
    return files, tasks
