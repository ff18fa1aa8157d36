"""CoCoOp's base-to-new protocol on the emoji styles: prompts trained on half the classes, asked about the other half.

    mmserve-train base-to-new --cache ~/.cache/mmserve --pretrained CKPT --out docs/base-to-new --seeds 0 1 2

Classes: the first ceil(C/2) of the prepared class list are *base*, the rest *new* (CoCoOp's rule, in the
prepared order). Each method trains on the base classes' k-shot images of every style (the results table's
split, restricted to base). Scores are answered by the served open-vocabulary path: an InferenceEngine over
the trained registry and `mmserve.vocab.rank_label_requests`, i.e. `/classify?task=<style>&labels=<names>`,
with the base names on base test images and the new names on new test images. Zero-shot ranks the same
names with the same class template and no prompts. H is the harmonic mean of base and new (CoCoOp's).
Resumable: a run whose result.json exists is skipped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from mmserve.backbone import Backbone, load_backbone
from mmserve.engine import InferenceEngine
from mmserve.vocab import LabelCache, LabelRequest, rank_label_requests
from training.classify import Towers, class_scores
from training.config import BackboneConfig
from training.data import BadFiles
from training.grouping import GroupingConfig
from training.mmap_trainer import train_multitask
from training.progress import log
from training.results.methods import METHODS
from training.results.rundir import describe_machine, machine_info, resolve_runs_dir
from training.results.tasks import emoji_split, read_tasks
from training.splits import Split, SplitTask, write_split
from training.studies import Recipe, StudyOptions, header, mean_std, recipe_of, resumed, study_parser, write_outputs
from training.tensors import part_tensors

STUDY_METHODS = ("text-only", "visual-only", "mmap-full")


@dataclass
class StudyConfig(StudyOptions):
    """What one invocation measures and where it writes."""

    out: str = "docs/base-to-new"
    shots: int = 16
    methods: list[str] = field(default_factory=lambda: list(STUDY_METHODS))
    recipe: Recipe = field(default_factory=lambda: Recipe(epochs=10))


def base_and_new(classes: list[str]) -> tuple[list[str], list[str]]:
    """CoCoOp's split of a class list: the first ceil(C/2) are base, the rest new."""
    half = math.ceil(len(classes) / 2)
    return classes[:half], classes[half:]


def restrict(split: Split, keep: list[str]) -> Split:
    """The split with only the classes `keep` (ids), in their order, and only their train and test items."""
    out = Split(split.kind, split.root, split.config)
    for name, t in split.tasks.items():
        names = t.name_of()
        out.tasks[name] = SplitTask(list(keep), [names[c] for c in keep], [it for it in t.train if it.label in keep],
                                    [it for it in t.test if it.label in keep], t.head)
    return out


def _train(cfg: StudyConfig, backbone: Backbone, method: str, split_file: Path, run_dir: Path, seed: int) -> dict:
    row = METHODS[method]
    grouping = GroupingConfig("auto") if method == "mmap-full" else GroupingConfig("all")
    result = train_multitask(cfg.run_config(split_file, run_dir, cfg.shots, seed, cfg.recipe.optim(),
                                            cfg.recipe.prompt(row.prompt, row.sharing), grouping,
                                            run_dir.parent / "tensors"), backbone)
    return {"trainable_params": result.trainable_params, "groups": result.groups}


def _served_accuracy(engine: InferenceEngine, task: str | None, images: torch.Tensor, targets: torch.Tensor,
                     labels: list[str], chunk: int = 128) -> float:
    """Top-1 accuracy of /classify?task=T&labels=... on `images` (through the served label path)."""
    cache, hits = LabelCache(), 0
    for lo in range(0, len(images), chunk):
        reqs = [LabelRequest(img, tuple(labels), task, 1) for img in images[lo:lo + chunk]]
        for outcome, want in zip(rank_label_requests(engine, cache, reqs), targets[lo:lo + chunk].tolist(),
                                 strict=True):
            if not outcome.ok:
                raise RuntimeError(f"task {task}: {outcome.error}")
            hits += outcome.result["label"] == labels[want]
    return hits / len(images)


def _run_method(cfg: StudyConfig, backbone: Backbone, method: str, seed: int, split_file: Path, run_dir: Path,
                base: tuple[dict, list[str]], new: tuple[dict, list[str]]) -> dict:
    """Train `method` on the base split, then score base and new test images (parts, names) as served."""
    log(f"base-to-new: {method}, seed {seed}")
    t0 = time.time()
    trained = _train(cfg, backbone, method, split_file, run_dir, seed)
    train_s = time.time() - t0
    engine = InferenceEngine(backbone, run_dir / "registry")
    scored = [{s: _served_accuracy(engine, s, p.images, p.targets, names) for s, p in parts.items()}
              for parts, names in (base, new)]
    rec = {"method": method, "seed": seed, **_scores(*scored), **trained, "train_s": round(train_s, 1),
           "machine": machine_info(cfg.device)}
    log(f"base-to-new: {method} seed {seed}: base {rec['base_mean']:.3f} new {rec['new_mean']:.3f} "
        f"H {rec['h']:.3f} ({train_s:.0f} s)")
    return rec


def _parts(split: Split, backbone: Backbone, cache_dir: Path) -> dict:
    return {s: part_tensors(split.root, t.test, t.classes, backbone.preprocess, BadFiles(), cache_dir=str(cache_dir))
            for s, t in split.tasks.items()}


def _scores(base: dict, new: dict) -> dict:
    b, n = sum(base.values()) / len(base), sum(new.values()) / len(new)
    return {"base": base, "new": new, "base_mean": b, "new_mean": n, "h": 2 * b * n / (b + n) if b + n else 0.0}


def run_study(cfg: StudyConfig) -> dict:
    """Train every (method, seed) on the base classes, score base and new; write <out>.json and <out>.md."""
    backbone = load_backbone(BackboneConfig(cfg.model, cfg.pretrained, cfg.device).spec())
    towers = Towers.of(backbone)
    meta = read_tasks(cfg.cache)
    ids = [str(c["id"]) for c in meta["classes"]]
    base_ids, new_ids = base_and_new(ids)
    settings = {"model": cfg.model, "backbone_fingerprint": backbone.fingerprint, "shots": cfg.shots,
                "template": cfg.template, "recipe": asdict(cfg.recipe), "base": base_ids}
    runs = resolve_runs_dir(cfg.runs_dir, cfg.cache, settings, root="base-to-new")
    tensors = runs / "tensors"
    rows: dict[str, dict[int | None, dict]] = {}
    for seed in cfg.seeds:
        split = emoji_split(cfg.cache, cfg.shots, seed)
        base_split, new_split = restrict(split, base_ids), restrict(split, new_ids)
        split_file = runs / "splits" / f"base-k{cfg.shots}-s{seed}.json"
        if not split_file.is_file():
            write_split(split_file, base_split)
        base_parts, new_parts = _parts(base_split, backbone, tensors), _parts(new_split, backbone, tensors)
        base_names, new_names = base_split.tasks[next(iter(base_split.tasks))].class_names, \
            new_split.tasks[next(iter(new_split.tasks))].class_names
        if None not in rows.get("zero-shot", {}):
            zs = {w: {s: float((class_scores(towers, p.images, names, cfg.template).argmax(-1).cpu() == p.targets)
                                .float().mean()) for s, p in parts.items()}
                  for w, parts, names in (("base", base_parts, base_names), ("new", new_parts, new_names))}
            rows.setdefault("zero-shot", {})[None] = {**_scores(zs["base"], zs["new"]), "trainable_params": 0}
        for method in cfg.methods:
            run_dir = runs / f"{method}-k{cfg.shots}-s{seed}"

            rows.setdefault(method, {})[seed] = resumed(run_dir, partial(
                _run_method, cfg, backbone, method, seed, split_file, run_dir, (base_parts, base_names),
                (new_parts, new_names)))
    report = {"command": cfg.command, "settings": settings, "new": new_ids, "runs_dir": str(runs),
              "styles": list(meta["tasks"]), "rows": {m: {str(k): v for k, v in r.items()} for m, r in rows.items()},
              "machine": describe_machine(machine_info(cfg.device))}
    write_outputs(cfg.out, report, to_markdown)
    return report


def to_markdown(report: dict) -> str:
    """The study's table: base, new and H per method (mean ± std over seeds), then new per style."""
    styles, rows, s = report["styles"], report["rows"], report["settings"]
    r = s["recipe"]
    lines = [*header("Base-to-new: prompts trained on half the classes, asked about the other half (issue 21)",
                     "base-to-new", report),
             f"- {s['shots']} shots per base class and style."
             f" Recipe, every method: {r['optimizer']} lr {r['lr']}, weight decay {r['weight_decay']}, "
             f"{r['epochs']} epochs, b = {r['n_tokens']} tokens per layer, MmAP source {r['source_rows']} x "
             f"{r['source_cols']}",
             f"- Base ({len(s['base'])}): {', '.join(s['base'])}",
             f"- New ({len(report['new'])}): {', '.join(report['new'])}",
             "- Scores: top-1 accuracy (%) of `/classify?task=<style>&labels=<the base or new class names>` on "
             "held-out test images of those classes, mean over the five styles, then mean ± std over seeds.", "",
             "| method | base | new | H | new − zero-shot | seeds | train s (mean) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    zs_new = next(iter(rows["zero-shot"].values()))["new_mean"]
    for method, by_seed in rows.items():
        recs = list(by_seed.values())
        label = "zero-shot" if method == "zero-shot" else METHODS[method].label
        seeds = "—" if method == "zero-shot" else ", ".join(sorted(by_seed))
        delta = sum(x["new_mean"] for x in recs) / len(recs) - zs_new
        train = "—" if method == "zero-shot" else f"{sum(x['train_s'] for x in recs) / len(recs):.0f}"
        lines.append(f"| {label} | {mean_std([x['base_mean'] for x in recs])} | "
                     f"{mean_std([x['new_mean'] for x in recs])} | {mean_std([x['h'] for x in recs])} | "
                     f"{100 * delta:+.1f} | {seeds} | {train} |")
    lines += ["", "New classes per style:", "", "| method | " + " | ".join(styles) + " |",
              "| --- |" + " ---: |" * len(styles)]
    for method, by_seed in rows.items():
        recs = list(by_seed.values())
        label = "zero-shot" if method == "zero-shot" else METHODS[method].label
        lines.append(f"| {label} | " + " | ".join(mean_std([x["new"][st] for x in recs]) for st in styles) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`mmserve-train base-to-new`."""
    p = study_parser("base-to-new", __doc__, StudyConfig.out, Recipe(epochs=10))
    p.add_argument("--shots", type=int, default=StudyConfig.shots)
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), choices=STUDY_METHODS)
    a = p.parse_args(argv)
    cfg = StudyConfig.from_args(a, "base-to-new", argv, shots=a.shots, methods=a.methods, recipe=recipe_of(a))
    report = run_study(cfg)
    print(to_markdown(report))
    return 0
