"""Evaluate any registry on any split: per-task accuracy (or F1), the zero-shot reference, trainable parameters.

Classification entries predict through exactly what a server loads (load_registry + builders), so these
numbers are the served model's. The zero-shot reference is recomputed on the same test items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmserve.backbone import Backbone, BackboneSpec, load_backbone
from mmserve.builders import load_classify_prompts, load_fusion, load_registry
from mmserve.complementary import build_complementary
from mmserve.fileio import atomic_write_bytes
from mmserve.registry import DEFAULT_TEMPLATE, read_manifest
from training.classify import Towers, predict
from training.data import BadFiles, Item
from training.metrics import accuracy, primary_metric
from training.mope_trainer import encode_texts, evaluate_fusion
from training.runs import write_json
from training.splits import read_split
from training.tensors import part_tensors
from training.zeroshot import zero_shot_metrics


@dataclass
class EvalReport:
    """Per-task results of one registry on one split, plus the predictions behind them."""

    registry: str
    split: str
    backbone: dict
    tasks: dict[str, dict]
    predictions: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """The JSON written by `mmserve-train eval` (without the predictions)."""
        return {"registry": self.registry, "split": self.split, "backbone": self.backbone, "tasks": self.tasks,
                "notes": self.notes, "skipped_files": self.skipped_files}

    def to_markdown(self) -> str:
        """A Markdown table: one row per task and a mean row."""
        lines = ["| task | kind | metric | score | zero-shot | delta | params (task) | params (with group) | test n |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in self.tasks.items():
            lines.append(f"| {name} | {r['kind']} | {r['metric']} | {r['score']:.4f} | {r['zero_shot']:.4f} | "
                         f"{r['score'] - r['zero_shot']:+.4f} | {r['trainable_params']} | {r['params_used']} | "
                         f"{r['n_test']} |")
        if self.tasks:
            n = len(self.tasks)
            mean = sum(r["score"] for r in self.tasks.values()) / n
            zs = sum(r["zero_shot"] for r in self.tasks.values()) / n
            lines.append(f"| **mean** | | | {mean:.4f} | {zs:.4f} | {mean - zs:+.4f} | | | |")
        return "\n".join(lines) + "\n"


def evaluate_registry(registry_dir: str | Path, split_file: str | Path, root: str | Path | None = None,
                      backbone: Backbone | BackboneSpec | None = None, on_bad_file: str = "skip",
                      zero_shot_template: str = DEFAULT_TEMPLATE, cache_dir: str | Path | None = None,
                      tasks: list[str] | None = None) -> EvalReport:
    """Score every task that the registry and the split share (or `tasks`) on the split's test part."""
    manifest = read_manifest(registry_dir)
    if backbone is None:
        backbone = BackboneSpec(manifest.backbone.model, manifest.backbone.pretrained)
    if isinstance(backbone, BackboneSpec):
        backbone = load_backbone(backbone)
    registry = load_registry(registry_dir, backbone)
    split = read_split(split_file)
    root = root or split.root
    towers = Towers.of(backbone)
    bad = BadFiles(on_bad_file)
    report = EvalReport(str(registry_dir), str(split_file), {"model": backbone.spec.model,
                                                             "fingerprint": backbone.fingerprint}, {})
    names = tasks or [t.name for t in registry.manifest.tasks if t.name in split.tasks]
    for t in registry.manifest.tasks:
        if t.name not in split.tasks:
            report.notes.append(f"task {t.name}: not in the split, not evaluated")
    for name in names:
        if name not in split.tasks:
            raise ValueError(f"task {name} is not in split {split_file}")
        entry = registry.manifest.task(name)
        st = split.tasks[name]
        if entry.kind == "classify":
            to_name = st.name_of()
            items = [Item(it.image, to_name.get(it.label, it.label), it.text) for it in st.test]
            part = part_tensors(root, items, entry.classes, backbone.preprocess, bad, cache_dir=cache_dir)
            prompts = load_classify_prompts(registry, name, backbone)()
            pred = predict(towers, part.images, entry.classes, entry.template, prompts)
            metrics = {"accuracy": accuracy(pred, part.targets)}
            report.predictions[name] = [entry.classes[j] for j in pred.tolist()]
            zero = zero_shot_metrics(towers, part, entry.classes, "multiclass", zero_shot_template)
        else:
            multilabel = entry.head == "multilabel"
            part = part_tensors(root, st.test, entry.classes, backbone.preprocess, bad, multilabel, cache_dir)
            model = load_fusion(registry, name, backbone)
            psi = encode_texts(build_complementary(entry.complementary or {}, backbone), part.texts)
            ev = evaluate_fusion(model, towers, part, psi, entry.classes, entry.threshold)
            metrics = {k: v for k, v in ev.metrics.items() if k != "expert_importance"}
            report.predictions[name] = ev.predictions
            labels_per = None
            if multilabel and st.train:
                labels_per = sum(len(it.label) for it in st.train) / len(st.train)
            zero = zero_shot_metrics(towers, part, st.class_names, entry.head, zero_shot_template, labels_per)
        key, score = primary_metric(metrics)
        group = registry.manifest.group(entry.group) if entry.group else None
        report.tasks[name] = {"kind": entry.kind, "metric": key, "score": score, "zero_shot": zero[key],
                              **metrics, **{f"zero_shot_{k}": v for k, v in zero.items()},
                              "trainable_params": entry.trainable_params,
                              "params_used": entry.trainable_params + (group.trainable_params if group else 0),
                              "group": entry.group, "n_test": len(part)}
    report.skipped_files = bad.seen
    return report


def write_report(report: EvalReport, out_dir: str | Path, stem: str = "eval") -> tuple[Path, Path]:
    """Write <stem>.json and <stem>.md into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{stem}.json", report.to_json())
    md = out_dir / f"{stem}.md"
    atomic_write_bytes(md, report.to_markdown().encode())
    return out_dir / f"{stem}.json", md
