"""Test accuracy of the shipped backbone (zero-shot) and registry (MmAP, through the engine) with and without the
held-out test pictures that are byte-identical to a picture the shipped backbone was pretrained on.

    python docs/task_copies.py ~/.cache/mmserve ~/.cache/mmserve/ship/<run>/mmap/split.json

(the split is the one `mmserve-train ship` drew: models/ship.json's runs_dir + /mmap/split.json). Prints the
copies per style and both accuracies per style; see docs/backbone.md, "Task pictures in pretraining".
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from PIL import Image

from mmserve.backbone import EMBEDDED_MODEL, BackboneSpec, load_backbone
from mmserve.engine import ClassifyRequest, InferenceEngine
from mmserve.fileio import sha256_file
from training.splits import Split, SplitTask, read_split
from training.zeroshot import zero_shot

SHIPPED_STAGES = ("train.csv", "val.csv", "train_classwords.csv")  # the caption files the shipped stages read
PRETRAIN_EMOJI = ("openmoji", "fluent")  # every emoji these styles draw was in those files before prepare's fix


def pretraining_hashes(cache: Path, size: int = 96) -> set[str]:
    """SHA-256 of every picture the shipped stages' caption files held: the files' pictures now, and every render
    of the two pretraining emoji styles (a prepare run after 2026-11-30 leaves the task copies out of the files)."""
    renders = cache / "emoji" / f"{size}px"
    files: set[str] = {str(p) for style in PRETRAIN_EMOJI for p in (renders / style).glob("*.png")}
    for name in SHIPPED_STAGES:
        with open(cache / "pretrain" / name, encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t")
            next(rows)
            files.update(row[0] for row in rows)
    return {sha256_file(p) for p in files}


def served_accuracy(engine: InferenceEngine, preprocess, split: Split) -> dict[str, float]:
    """Top-1 of the served registry on each task's test part."""
    root, out = Path(split.root), {}
    for name, task in split.tasks.items():
        right = 0
        for i in range(0, len(task.test), 64):
            items = task.test[i:i + 64]
            requests = [ClassifyRequest(preprocess(Image.open(root / it.image).convert("RGB")), name, 1)
                        for it in items]
            for outcome, it in zip(engine.classify_requests(requests), items, strict=True):
                right += outcome.result["label"] == task.class_names[task.classes.index(it.label)]
        out[name] = right / len(task.test)
    return out


def main(cache: Path, split_path: Path) -> None:
    """Print the copies and the accuracies with and without them."""
    seen = pretraining_hashes(cache)
    split = read_split(split_path)
    root = Path(split.root)
    copies = {n: {it.image for it in t.test if sha256_file(root / it.image) in seen} for n, t in split.tasks.items()}
    clean = Split(split.kind, split.root, split.config, {
        n: SplitTask(t.classes, t.class_names, t.train, [it for it in t.test if it.image not in copies[n]], t.head)
        for n, t in split.tasks.items()})
    backbone = load_backbone(BackboneSpec(EMBEDDED_MODEL, pretrained=f"models/backbone/{EMBEDDED_MODEL}.safetensors"))
    with torch.inference_mode():
        zs = [zero_shot(backbone, s, template="{}") for s in (split, clean)]
        engine = InferenceEngine(backbone, "models/registry")
        mmap = [served_accuracy(engine, backbone.preprocess, s) for s in (split, clean)]
    for n, t in split.tasks.items():
        print(f"{n:14s} test {len(t.test)} -> {len(clean.tasks[n].test)}: zero-shot {100 * zs[0][n]['accuracy']:.1f}"
              f" -> {100 * zs[1][n]['accuracy']:.1f}, MmAP {100 * mmap[0][n]:.1f} -> {100 * mmap[1][n]:.1f}")
    for label, (a, b) in (("zero-shot", [[100 * z[n]["accuracy"] for n in split.tasks] for z in zs]),
                          ("MmAP", [[100 * m[n] for n in split.tasks] for m in mmap])):
        print(f"mean {label}: {sum(a) / len(a):.2f} -> {sum(b) / len(b):.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).expanduser(), Path(sys.argv[2]).expanduser())
