"""Held-out example images shipped beside the registry, with what the served registry answers for them.

One held-out emoji identity, drawn with a fixed seed among those present in every style (never picked by its
result), is copied once per style to `<out>/examples/<style>.png`; `expected.json` records the engine's answer for
each (and for the fusion entry with the emoji's CLDR name). README curls use them; a test checks that the shipped
files still give these answers.
"""

from __future__ import annotations

import random
from pathlib import Path

from mmserve.backbone import Backbone
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.fileio import atomic_write_bytes, atomic_write_json
from mmserve.images import ImageDecoder, preprocess_config, preprocess_from_config
from mmserve.serving.statuses import outcome_status
from training.data import BadFiles, read_fusion_jsonl
from training.results import style_of
from training.splits import Split

EXPECTED = "expected.json"


def pick_identity(split: Split, seed: int = 0) -> tuple[str, str]:
    """(hexcode, class id) of a held-out test identity present in every task of `split`, drawn with `seed`."""
    per_task = [{Path(it.image).stem: str(it.label) for it in task.test} for task in split.tasks.values()]
    common = sorted(set.intersection(*(set(m) for m in per_task)))
    if not common:
        raise ValueError("no held-out identity is in every style's test split")
    hexcode = random.Random(seed).choice(common)
    return hexcode, per_task[0][hexcode]


def write_examples(out: str | Path, backbone: Backbone, registry_dir: str | Path, split: Split,
                   fusion_test: str | Path | None, fusion_task: str | None, seed: int = 0, top_k: int = 3) -> dict:
    """Copy one held-out image per style into <out>/examples and record the served answers in expected.json."""
    folder = Path(out) / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    hexcode, label = pick_identity(split, seed)
    engine = InferenceEngine(backbone, registry_dir, "torch")
    decode = ImageDecoder(preprocess_from_config(preprocess_config(backbone)))  # exactly the service's decoding
    report: dict = {"hexcode": hexcode, "true_label": label, "seed": seed, "classify": {}, "fuse": {}}
    root = Path(split.root)
    for style, task in split.tasks.items():
        item = next(it for it in task.test if Path(it.image).stem == hexcode)
        data = (root / item.image).read_bytes()
        name = f"{style}.png"
        atomic_write_bytes(folder / name, data)
        outcome = engine.classify_requests([ClassifyRequest(decode(data), style, top_k)])[0]
        report["classify"][style] = {"file": name, "status": outcome_status(outcome),
                                     "answer": outcome.result or outcome.error}
    if fusion_test is not None and fusion_task is not None:
        lines = [it for it in read_fusion_jsonl(Path(fusion_test), BadFiles("skip")) if Path(it.image).stem == hexcode]
        if lines:
            item = lines[0]
            style = style_of(item.image)
            outcome = engine.fuse_requests([FuseRequest(decode(Path(item.image).read_bytes()), item.text or "",
                                                        fusion_task)])[0]
            report["fuse"] = {"task": fusion_task, "file": f"{style}.png", "text": item.text,
                              "status": outcome_status(outcome), "answer": outcome.result or outcome.error}
    atomic_write_json(folder / EXPECTED, report, sort_keys=True)
    return report
