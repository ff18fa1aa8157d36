"""Split parts as tensors: preprocessed images (decoded once per run), targets, texts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.data import BadFiles, Item, image_tensors


@dataclass
class PartTensors:
    """One split part of one task: images (N, 3, H, W), targets (N,) long or (N, C) float, items, texts."""

    images: torch.Tensor
    targets: torch.Tensor
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        """The items' texts (fusion); '' where an item has none."""
        return [it.text or "" for it in self.items]


def known_labels(items: list[Item], classes: list[str], root: str | Path, bad: BadFiles) -> list[Item]:
    """Items whose label(s) are all in `classes`; the others are reported as bad files."""
    index = set(classes)
    kept = []
    for it in items:
        labels = it.label if isinstance(it.label, list) else [it.label]
        unknown = [x for x in labels if x not in index]
        if unknown:
            bad.report(Path(root) / it.image, f"unknown label(s) {unknown} (classes: {len(classes)})")
        else:
            kept.append(it)
    return kept


def targets_of(items: list[Item], classes: list[str], multilabel: bool) -> torch.Tensor:
    """Class indices (N,) for multi-class items or a multi-hot (N, C) float matrix for multi-label items."""
    index = {c: i for i, c in enumerate(classes)}
    if not multilabel:
        return torch.tensor([index[it.label] for it in items], dtype=torch.long)
    out = torch.zeros(len(items), len(classes))
    for row, it in enumerate(items):
        for x in it.label if isinstance(it.label, list) else [it.label]:
            out[row, index[x]] = 1.0
    return out


def part_tensors(root: str | Path, items: list[Item], classes: list[str], preprocess, bad: BadFiles,
                 multilabel: bool = False, cache_dir: str | Path | None = None) -> PartTensors:
    """Check labels, decode and preprocess images (bad ones reported), and build targets."""
    items = known_labels(items, classes, root, bad)
    if not items:
        raise ValueError(f"no items with known labels under {root}")
    images, kept = image_tensors(root, items, preprocess, bad, cache_dir)
    return PartTensors(images, targets_of(kept, classes, multilabel), kept)
