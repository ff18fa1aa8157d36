"""One multi-task step: every task's image batch and class prompts go through the towers in one forward pass.

Batch semantics (MmAP eq. 11/12): `batch_size` is per task. A step draws `batch_size` samples FROM EACH task
(Batcher: T index batches, T x batch_size images in all) and returns T per-task losses, which the trainer sums
into one update: a group-shared prompt gets the sum of its tasks' gradients (eq. 11), a task-specific prompt
only its own task's (eq. 12). An epoch is `max_t ceil(n_t / batch_size)` steps (the largest task sees each of
its samples once), and each step runs every task's class prompts through the text tower once, so the text
cost per epoch is that of a single-task run, not T times it (as it would be with one mixed batch of
`batch_size` over all tasks, which needs T times more steps).

Per-sample prompts (B, K, P, d) let one batch mix tasks, each with its own (group + task) prompts; the
loss of each task is cross-entropy on cosine logits times CLIP's temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmserve.prompts import TowerPrompts
from training.classify import Towers, class_tokens, image_features, predict
from training.metrics import accuracy
from training.tensors import PartTensors


@dataclass
class TaskData:
    """A classification task's tensors and class prompt names."""

    name: str
    classes: list[str]
    class_names: list[str]
    train: PartTensors
    test: PartTensors
    tokens: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (template, n_prompt) -> (C, L)
    frozen_text: dict[str, torch.Tensor] = field(default_factory=dict)  # template -> unprompted class features
    frozen_images: torch.Tensor | None = None  # (N_train, E) unprompted image features, once per run

    def class_tokens(self, towers: Towers, template: str, n_prompt: int) -> torch.Tensor:
        """Tokens of "X..X <template>" for every class, cached per template and prompt length."""
        if (template, n_prompt) not in self.tokens:
            self.tokens[template, n_prompt] = class_tokens(towers, self.class_names, template, n_prompt)
        return self.tokens[template, n_prompt]

    def frozen_image_features(self, towers: Towers) -> torch.Tensor:
        """Unprompted image features (N_train, E) of every train image, computed on first use: a method without
        visual prompts (text-only) then runs the image tower once per run, not once per step."""
        if self.frozen_images is None:
            self.frozen_images = image_features(towers, self.train.images, None)
        return self.frozen_images

    def frozen_text_features(self, towers: Towers, template: str) -> torch.Tensor:
        """Unprompted class features (C, E) under `template`, computed on first use: a method without text
        prompts (visual-only) runs the text tower once per run and template, not once per step."""
        if template not in self.frozen_text:
            with torch.no_grad():
                self.frozen_text[template] = towers.text(self.class_tokens(towers, template, 0))
        return self.frozen_text[template]


class Batcher:
    """Seeded per-task shuffles: each call gives one index batch per task; a task that runs out reshuffles."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch size (--batch-size) must be >= 1, got {batch_size}")
        self.sizes = sizes
        self.batch_size = batch_size
        self.gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(sizes))]
        self.queues: list[list[int]] = [[] for _ in sizes]

    @property
    def steps_per_epoch(self) -> int:
        """Steps for the largest task to see each of its samples once."""
        return max(math.ceil(n / self.batch_size) for n in self.sizes)

    def next(self) -> list[torch.Tensor]:
        """One batch of sample indices per task."""
        out = []
        for i, n in enumerate(self.sizes):
            take = min(self.batch_size, n)
            if len(self.queues[i]) < take:
                self.queues[i] += torch.randperm(n, generator=self.gens[i]).tolist()
            out.append(torch.tensor(self.queues[i][:take]))
            self.queues[i] = self.queues[i][take:]
        return out


def _stack(parts: list[torch.Tensor | None], what: str) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError(f"every task needs {what} prompts, or none does")
    return torch.stack(parts)


@dataclass
class StepOutput:
    """Per-task losses (with graph) and correct counts of one multi-task step."""

    losses: list[torch.Tensor]
    correct: list[int]
    counts: list[int]


def multitask_step(towers: Towers, tasks: list[TaskData], prompts: list[TowerPrompts], batches: list[torch.Tensor],
                   template: str) -> StepOutput:
    """Forward every task's batch with its own prompts in one pass; return each task's loss."""
    device = towers.device
    vision = _stack([p.vision for p in prompts], "visual")
    if vision is None:
        img = torch.cat([t.frozen_image_features(towers)[idx.to(device)]
                         for t, idx in zip(tasks, batches, strict=True)])
    else:
        images = torch.cat([t.train.images[idx] for t, idx in zip(tasks, batches, strict=True)]).to(device)
        sample_task = torch.cat([torch.full((len(idx),), i, dtype=torch.long) for i, idx in enumerate(batches)])
        img = towers.image(images, vision[sample_task.to(device)])
    text = _stack([p.text for p in prompts], "text")
    if text is None:
        txt = torch.cat([t.frozen_text_features(towers, template) for t in tasks])
    else:
        tokens = torch.cat([t.class_tokens(towers, template, text.shape[-2]) for t in tasks])
        row_task = torch.cat([torch.full((len(t.classes),), i, dtype=torch.long) for i, t in enumerate(tasks)])
        txt = towers.text(tokens, text[row_task.to(device)])
    scale = towers.backbone.logit_scale
    out = StepOutput([], [], [])
    img_start = txt_start = 0
    for t, idx in zip(tasks, batches, strict=True):
        img_t = img[img_start:img_start + len(idx)]
        txt_t = txt[txt_start:txt_start + len(t.classes)]
        img_start, txt_start = img_start + len(idx), txt_start + len(t.classes)
        logits = scale * img_t @ txt_t.T
        target = t.train.targets[idx].to(device)
        out.losses.append(F.cross_entropy(logits, target))
        out.correct.append(int((logits.argmax(dim=-1) == target).sum()))
        out.counts.append(len(idx))
    return out


def evaluate_task(towers: Towers, task: TaskData, prompts: TowerPrompts | None, template: str
                  ) -> tuple[float, list[int]]:
    """Test accuracy of one task with its prompts, and the predicted class indices in test order."""
    pred = predict(towers, task.test.images, task.class_names, template, prompts)
    return accuracy(pred, task.test.targets), pred.tolist()
