"""The accuracy table of issue 5: every method on the five emoji styles and the fusion task, built resumably.

    mmserve-train results --cache ~/.cache/mmserve --pretrained CKPT --out docs/results \\
        --seeds 0 1 2 --shots 4 16 [--device cuda] [--methods ...] [--epochs N]

writes `<out>.md` (Markdown tables: the command, machine, wall time, and every cell still missing),
`<out>.json` (every number behind them) and `<out>.png` (accuracy vs shots per method).

Resumable: every (method, shots, seed) is one run directory under the runs dir, and a run whose `result.json`
exists is skipped, so the table can be built across sessions (`--budget-minutes` stops starting new runs);
an interrupted trainer run resumes from its last epoch checkpoint. The runs dir defaults to
`<cache>/results/<model>-<backbone fingerprint>-<settings hash>`: other weights or other settings (epochs,
grouping steps, ...) start a fresh table instead of mixing numbers.

Splits (identical for every method; the test part never trains or tunes anything):
- classification: test = the held-out emoji identities of `tasks/heldout_emoji.json` (the same identities in
  every style); train = `shots` identities per class and style drawn with the seed from the train identities.
- fusion (image + CLDR name -> subgroup, all five styles in one task): test = `fusion/test.jsonl` (the same
  held-out identities); train = `shots` lines per class drawn with the seed from `fusion/train.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from mmserve.backbone import EMBEDDED_MODEL, Backbone, load_backbone
from mmserve.complementary import build_complementary
from mmserve.prompts import count_params
from mmserve.prompts.mope import MoPEConfig
from training.classify import Towers, class_scores, image_features
from training.config import BackboneConfig, OptimConfig, SplitConfig, mope_optim
from training.data import BadFiles, Item, read_fusion_jsonl
from training.grouping import GroupingConfig, choose_groups, task_affinity
from training.mmap_trainer import MultiTaskConfig, PromptSpec, load_or_draw_split, task_data, train_multitask
from training.mope_trainer import FuseConfig, complementary_spec, encode_texts, train_mope
from training.multitask import Batcher
from training.optim import make_optimizer, make_scheduler
from training.progress import log
from training.runs import epoch_seed, to_jsonable, write_json
from training.splits import Split, SplitTask, fusion_split, read_split, write_split
from training.templates import AUTO, choose_template
from training.tensors import part_tensors

COLOUR_STYLES = ("noto", "twemoji", "fluent_flat")
MONO_STYLES = ("openmoji_line", "fluent_mono")
FUSION_TASK = "emoji_subgroup"
RESULT = "result.json"


@dataclass(frozen=True)
class Method:
    """One row of the table: its key (for --methods), family, label and what exactly it trains."""

    key: str
    family: str  # "classify" or "fusion"
    label: str
    definition: str


CLASSIFY_METHODS = (
    Method("zero-shot", "classify", "zero-shot",
           '"a photo of a {class}." with the frozen backbone; nothing trained (the reference)'),
    Method("text-only", "classify", "text-only prompts (CoOp-style)",
           "deep text prompts only (b = 4 tokens per layer, every text layer), one per task, no sharing"),
    Method("visual-only", "classify", "visual-only prompts (VPT-style)",
           "deep visual prompts only (b = 4 tokens per layer, every image layer), one per task, no sharing"),
    Method("mmap-task", "classify", "MmAP task-specific only",
           "one MmAP per task (both towers), no group-shared prompt"),
    Method("mmap-group", "classify", "MmAP group-shared only",
           "one MmAP per computed group (the full method's groups), no task-specific prompt"),
    Method("mmap-full", "classify", "MmAP full (computed grouping)",
           "group-shared + task-specific MmAP, groups from gradient similarity (eq. 8), eq. 11/12 updates"),
    Method("mmap-random", "classify", "MmAP, random grouping",
           "as the full method, but a seeded random partition with as many groups as the computed one "
           "(2 when it found 1 or T)"),
    Method("mmap-all", "classify", "MmAP, all tasks in one group",
           "as the full method, one group holding every task"),
)
FUSION_METHODS = (
    Method("fusion-zero-shot", "fusion", "zero-shot (image vs class names)",
           "the image alone against \"a photo of a {class}.\"; nothing trained"),
    Method("image-only", "fusion", "image-only (linear head on the image feature)",
           "a linear softmax head on the frozen CLIP image feature: MoPE's head without psi and without prompts"),
    Method("text-only-clip", "fusion", "text-only (linear head on psi, CLIP text)",
           "a linear softmax head on psi = the frozen CLIP text tower's feature of the CLDR name"),
    Method("text-only-minilm", "fusion", "text-only (linear head on psi, MiniLM)",
           "a linear softmax head on psi = all-MiniLM-L6-v2's feature of the CLDR name"),
    Method("mope-k4-clip", "fusion", "MoPE k=4, CLIP text", "MoPE (l = 6, 4 experts) + head, psi from CLIP text"),
    Method("mope-k16-clip", "fusion", "MoPE k=16, CLIP text", "MoPE (l = 6, 16 experts) + head, psi from CLIP text"),
    Method("mope-k4-minilm", "fusion", "MoPE k=4, MiniLM", "MoPE (l = 6, 4 experts) + head, psi from MiniLM"),
    Method("mope-k16-minilm", "fusion", "MoPE k=16, MiniLM", "MoPE (l = 6, 16 experts) + head, psi from MiniLM"),
)
METHODS = {m.key: m for m in CLASSIFY_METHODS + FUSION_METHODS}
ZERO_SHOT = ("zero-shot", "fusion-zero-shot")
GROUPED = ("mmap-full", "mmap-group", "mmap-random")  # need the computed grouping of their (shots, seed)


@dataclass
class ResultsConfig:
    """What `mmserve-train results` builds; everything but shots, seeds, methods and budget keys the runs dir."""

    cache: str
    pretrained: str | None = None  # checkpoint path or open_clip tag; "none" = random init (tests)
    model: str = EMBEDDED_MODEL
    device: str = "cpu"
    out: str = "docs/results"  # stem: <out>.md, <out>.json, <out>.png
    runs_dir: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: list[int] = field(default_factory=lambda: [4, 16])
    methods: list[str] | None = None  # None = every method
    tasks: list[str] | None = None  # styles (None = classes.json's tasks)
    epochs: int = 5  # classification (MmAP's 5)
    lr: float = 0.0035  # classification SGD lr (MmAP's 0.0035)
    fuse_epochs: int = 10  # fusion (MoPE trainer's default)
    group_steps: int = 50
    group_every: int = 5
    mope: dict = field(default_factory=dict)  # MoPEConfig overrides besides n_experts (tests: smaller)
    template: str = AUTO  # or a fixed class-prompt template; auto = training.templates.choose_template
    budget_minutes: float | None = None  # start no new run after this
    shipped: str | None = None  # a ship.json: its (shots, seed) cell, shipped recipe, added as reference rows
    restore: str | None = None  # a published <out>.json: its finished runs seed the runs dir (restore_published)
    stop_on_error: bool = False
    progress: bool = True
    command: str = ""


# ---- data ----------------------------------------------------------------------------------------------------


def read_tasks(cache: str | Path) -> dict:
    """classes.json of the prepared tasks: {"tasks": [style, ...], "classes": [{"id", "name", ...}, ...]}."""
    path = Path(cache) / "tasks" / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prepared tasks; run `mmserve-train prepare --cache {cache}` first")
    return json.loads(path.read_text())


def emoji_split(cache: str | Path, shots: int | None, seed: int, tasks: list[str] | None = None) -> Split:
    """Classification split of the emoji styles: held-out identities as test, `shots` seeded train picks.

    Test = every held-out identity (heldout_emoji.json) that has an image in the style; train = `shots`
    identities per class drawn with random.Random("<seed>:<style>:<class>") from the class's train identities.
    """
    cache = Path(cache)
    meta = read_tasks(cache)
    held_path = cache / "tasks" / "heldout_emoji.json"
    held = json.loads(held_path.read_text())["classes"]
    root = cache / "tasks" / "images"
    styles = list(tasks or meta["tasks"])
    unknown = [s for s in styles if s not in meta["tasks"]]
    if unknown:
        raise ValueError(f"style(s) {unknown} not among the prepared tasks {meta['tasks']}")
    ids = [str(c["id"]) for c in meta["classes"]]
    names = [str(c["name"]) for c in meta["classes"]]
    split = Split("classify", str(root.resolve()), SplitConfig(shots, 0.5, None, "stem", seed))
    for style in styles:
        train, test = [], []
        for cid in ids:
            folder = root / style / cid
            files = {p.stem: p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
            parts = held.get(cid, {"train": [], "test": []})
            test += [Item(f"{style}/{cid}/{files[h]}", cid) for h in sorted(parts["test"]) if h in files]
            pool = [h for h in sorted(parts["train"]) if h in files]
            random.Random(f"{seed}:{style}:{cid}").shuffle(pool)
            picked = pool if shots is None else pool[:shots]
            train += [Item(f"{style}/{cid}/{files[h]}", cid) for h in sorted(picked)]
        if not train or not test:
            raise ValueError(f"style {style}: no train or no test images under {root / style} ({held_path})")
        split.tasks[style] = SplitTask(ids, names, train, test)
    return split


def fusion_task_split(cache: str | Path, shots: int | None, seed: int, name: str = FUSION_TASK,
                      tags: bool = False, styles: list[str] | None = None) -> Split:
    """The fusion split: `fusion/test.jsonl` as test, `shots` seeded lines per class of `fusion/train.jsonl`.

    With `styles`, only those styles' lines (before the k-shot draw). With `tags`, the multi-label variant
    (`tags_{train,test}.jsonl`; every train line, `shots` is ignored).
    """
    folder = Path(cache) / "fusion"
    prefix = "tags_" if tags else ""
    bad = BadFiles("skip")
    train = read_fusion_jsonl(folder / f"{prefix}train.jsonl", bad)
    test = read_fusion_jsonl(folder / f"{prefix}test.jsonl", bad)
    if styles is not None:
        train = [it for it in train if style_of(it.image) in styles]
        test = [it for it in test if style_of(it.image) in styles]
    cfg = SplitConfig(None if tags else shots, 0.0, None, "file", seed)
    return fusion_split(name, train, cfg, test, head="multilabel" if tags else "multiclass")


def style_of(image: str) -> str:
    """The style of a prepared emoji image path (tasks/images/<style>/<class>/<hex>.png)."""
    parts = Path(image).parts
    return parts[-3] if len(parts) >= 3 else "?"


def per_style_accuracy(rows: list[dict]) -> dict[str, float]:
    """Accuracy per style from prediction rows {"image", "label", "predicted"}."""
    hits: dict[str, list[bool]] = {}
    for r in rows:
        hits.setdefault(style_of(r["image"]), []).append(r["predicted"] == r["label"])
    return {s: sum(v) / len(v) for s, v in sorted(hits.items())}


def grouping_verdict(groups: list[list[str]] | None, styles: list[str]) -> str:
    """Whether `groups` is exactly {colour styles} + {monochrome styles} (of those present)."""
    if not groups:
        return "n/a"
    colour = frozenset(s for s in styles if s in COLOUR_STYLES)
    mono = frozenset(s for s in styles if s in MONO_STYLES)
    if not colour or not mono:
        return "n/a (needs colour and monochrome styles)"
    found = {frozenset(g) for g in groups}
    if found == {colour, mono}:
        return "yes: colour vs monochrome"
    mixed = [sorted(g) for g in groups if set(g) & colour and set(g) & mono]
    if mixed:
        return f"no: {' + '.join('/'.join(g) for g in mixed)} mix colour and monochrome"
    together = [name for name, kind in (("colour", colour), ("monochrome", mono)) if kind in found]
    apart = [name for name, kind in (("colour", colour), ("monochrome", mono)) if kind not in found]
    if together:
        return f"partly: no group mixes them; the {' and '.join(together)} styles share one group, the " \
               f"{' and '.join(apart)} ones are split"
    return "partly: no group mixes colour and monochrome, but both are split further"


# ---- machine, settings, runs dir -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Where a run ran: host, CPU, cores, torch threads, GPU (when on CUDA), torch version."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(m: dict) -> str:
    """One line: the GPU, or the CPU with its core and thread counts."""
    if m.get("described"):  # a run restored from a published table that kept only this line
        return m["described"]
    if m.get("gpu"):
        return f"{m['gpu']} ({m.get('host', '?')})"
    return f"CPU {m.get('cpu', '?')}, {m.get('cpus', '?')} cores, {m.get('threads', '?')} torch threads " \
           f"({m.get('host', '?')})"


def settings_of(rc: ResultsConfig, backbone: Backbone, styles: list[str]) -> dict:
    """The settings that make two runs comparable (and key the default runs dir)."""
    return {"model": rc.model, "backbone_fingerprint": backbone.fingerprint, "epochs": rc.epochs, "lr": rc.lr,
            "fuse_epochs": rc.fuse_epochs, "group_steps": rc.group_steps, "group_every": rc.group_every,
            "mope": dict(sorted(rc.mope.items())), "template": rc.template, "styles": styles}


def resolve_runs_dir(runs_dir: str | None, cache: str, settings: dict, root: str = "results") -> Path:
    """The runs dir (default <cache>/<root>/<model>-<fingerprint>-<settings hash>); refuse one holding runs
    made with other settings."""
    if runs_dir:
        runs = Path(runs_dir)
    else:
        digest = hashlib.sha256(json.dumps(to_jsonable(settings), sort_keys=True).encode()).hexdigest()[:8]
        runs = Path(cache) / root / f"{settings['model']}-{settings['backbone_fingerprint'][:10]}-{digest}"
    path = runs / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != to_jsonable(settings):
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != to_jsonable(settings).get(k))
            raise ValueError(f"{runs}: holds runs made with other settings (differs in {changed}); pass another "
                             f"--runs-dir or leave it out for a fresh table")
    else:
        write_json(path, settings)
    return runs


def selected_methods(names: list[str] | None) -> list[str]:
    """The method keys to run, in table order; unknown names are refused."""
    if not names:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [k for k in METHODS if k in names]


def cell_dir(runs: Path, method: str, shots: int | None = None, seed: int | None = None) -> Path:
    """Run dir of one cell (zero-shot rows have one per family, independent of shots and seed)."""
    m = METHODS[method]
    if method in ZERO_SHOT:
        return runs / m.family / method
    return runs / m.family / method / f"k{shots}-s{seed}"


def read_result(path: Path) -> dict | None:
    """A finished cell's result.json, or None."""
    f = path / RESULT
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


# ---- the runs ------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every run of one invocation shares."""

    rc: ResultsConfig
    backbone: Backbone
    towers: Towers
    runs: Path
    styles: list[str]
    machine: dict

    @property
    def tensor_cache(self) -> str:
        """Preprocessed image tensors, shared by every run of the runs dir."""
        return str(self.runs / "tensors")

    def backbone_cfg(self) -> BackboneConfig:
        """The backbone recorded in each trainer run's config (the loaded backbone itself is passed in).

        A file is recorded by its name only, so that the same weights reached by another path resume the same
        runs (the runs dir is keyed by the weights' fingerprint, which every run's config.json also holds).
        """
        pretrained = self.rc.pretrained or "none"
        if self.backbone.spec.is_local_checkpoint:
            pretrained = Path(pretrained).name
        return BackboneConfig(self.rc.model, pretrained, self.rc.device)

    def classify_split(self, shots: int, seed: int) -> Path:
        """The classification split file of (shots, seed), drawn once and reused by every method."""
        path = self.runs / "splits" / f"classify-k{shots}-s{seed}.json"
        if not path.is_file():
            write_split(path, emoji_split(self.rc.cache, shots, seed, self.styles))
        return path

    def fusion_split(self, shots: int, seed: int) -> Path:
        """The fusion split file of (shots, seed), drawn once and reused by every fusion method."""
        path = self.runs / "splits" / f"fusion-k{shots}-s{seed}.json"
        if not path.is_file():
            split = fusion_task_split(self.rc.cache, shots, seed, styles=self.styles)
            task = split.tasks[FUSION_TASK]
            names = {str(c["id"]): str(c["name"]) for c in read_tasks(self.rc.cache)["classes"]}
            task.class_names = [names.get(c, n) for c, n in zip(task.classes, task.class_names, strict=True)]
            write_split(path, split)
        return path


def _record(ctx: Context, method: str, shots: int | None, seed: int | None, run_dir: Path, wall: float,
            **values) -> dict:
    rec = {"method": method, "family": METHODS[method].family, "shots": shots, "seed": seed, **values,
           "run_dir": str(run_dir), "wall_s": round(wall, 2), "machine": ctx.machine,
           "finished": datetime.now(UTC).replace(microsecond=0).isoformat()}
    write_json(run_dir / RESULT, rec)
    return rec


def run_classify_zero_shot(ctx: Context) -> dict:
    """Zero-shot accuracy of every style on its held-out test part (the same for every seed and shots)."""
    t0 = time.time()
    run_dir = cell_dir(ctx.runs, "zero-shot")
    split = read_split(ctx.classify_split(ctx.rc.shots[0], ctx.rc.seeds[0]))
    scores, n_test = {}, {}
    for style, task in split.tasks.items():
        part = part_tensors(split.root, task.test, task.classes, ctx.backbone.preprocess, BadFiles(),
                            cache_dir=ctx.tensor_cache)
        pred = class_scores(ctx.towers, part.images, task.class_names, ctx.rc.template).argmax(dim=-1).cpu()
        scores[style] = float((pred == part.targets).float().mean())
        n_test[style] = len(part)
    return _record(ctx, "zero-shot", None, None, run_dir, time.time() - t0, scores=scores,
                   mean=sum(scores.values()) / len(scores), trainable_params=0, n_test=n_test)


def run_fusion_zero_shot(ctx: Context) -> dict:
    """Zero-shot accuracy of the fusion test images against the class names, overall and per style."""
    t0 = time.time()
    run_dir = cell_dir(ctx.runs, "fusion-zero-shot")
    split = read_split(ctx.fusion_split(ctx.rc.shots[0], ctx.rc.seeds[0]))
    task = split.tasks[FUSION_TASK]
    part = part_tensors(split.root, task.test, task.classes, ctx.backbone.preprocess, BadFiles(),
                        cache_dir=ctx.tensor_cache)
    pred = class_scores(ctx.towers, part.images, task.class_names, ctx.rc.template).argmax(dim=-1).cpu()
    rows = [{"image": it.image, "label": it.label, "predicted": task.classes[p]}
            for it, p in zip(part.items, pred.tolist(), strict=True)]
    acc = float((pred == part.targets).float().mean())
    return _record(ctx, "fusion-zero-shot", None, None, run_dir, time.time() - t0, accuracy=acc,
                   scores=per_style_accuracy(rows), mean=acc, trainable_params=0, n_test=len(part))


def grouping_file(ctx: Context, shots: int, seed: int) -> Path:
    """The computed grouping of (shots, seed): gradient similarity of a global MmAP, best partition (eq. 8).

    Computed once and passed to the full and the group-shared-only runs (as --grouping file), so both use
    exactly the same groups; the same code and defaults as the trainer's `--grouping auto`.
    """
    path = ctx.runs / "grouping" / f"k{shots}-s{seed}.json"
    if path.is_file() and current_grouping(path):
        return path
    if path.is_file():  # computed with another scoring (before centring): keep it aside, compute it again
        set_aside(ctx.runs, path)
    t0 = time.time()
    cfg = MultiTaskConfig(split_file=str(ctx.classify_split(shots, seed)), run_dir=str(path.parent),
                          template=ctx.rc.template, backbone=ctx.backbone_cfg(),
                          grouping=GroupingConfig(steps=ctx.rc.group_steps, every=ctx.rc.group_every), seed=seed,
                          optim=OptimConfig(lr=ctx.rc.lr, epochs=ctx.rc.epochs), cache_dir=ctx.tensor_cache,
                          progress=ctx.rc.progress)
    bad = BadFiles()
    split, root = load_or_draw_split(cfg, bad)
    tasks = task_data(ctx.towers, split, root, bad, cfg.cache_dir)
    names = [t.name for t in tasks]
    if len(tasks) > 1:
        affinity = task_affinity(ctx.towers, tasks, cfg.prompt.module_config(), cfg.grouping, cfg.optim.lr,
                                 cfg.optim.batch_size, cfg.template, seed, cfg.progress)
        groups, info = choose_groups(cfg.grouping, names, affinity, seed)
    else:
        groups, info = [names], {"mode": "auto", "groups": [names], "note": "one task"}
    info |= {"shots": shots, "seed": seed, "wall_s": round(time.time() - t0, 2), "machine": ctx.machine,
             "verdict": grouping_verdict(groups, names)}
    log(f"computed groups (k={shots}, seed {seed}): {groups} -> {info['verdict']}")
    write_json(path, info)
    return path


def current_grouping(path: Path) -> bool:
    """Whether a stored grouping was scored as the trainer scores now (centred or raw, `GroupingConfig.center`)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("centered") == GroupingConfig().center


def set_aside(runs: Path, path: Path) -> Path:
    """Move a stale file or run dir under <runs>/stale/ (same relative path, a numbered suffix if taken)."""
    dest = runs / "stale" / path.relative_to(runs)
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{path.name}.{n}")
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    path.rename(dest)
    log(f"results: set aside stale {path} -> {dest}")
    return dest


def random_group_count(found: list[list[str]], n_tasks: int) -> int:
    """Groups of the random-grouping ablation: as many as the computed grouping, 2 when it found 1 or T."""
    return len(found) if 1 < len(found) < n_tasks else 2


def stale_cell(ctx: Context, method: str, shots: int | None, seed: int | None, rec: dict) -> str | None:
    """Why a finished grouped cell no longer matches its (shots, seed) grouping, or None when it does.

    A cell trained on groups from a grouping that was set aside (or recomputed since) is stale: the table
    would pair its numbers with groups it never used.
    """
    if method not in GROUPED or shots is None or seed is None:
        return None
    path = ctx.runs / "grouping" / f"k{shots}-s{seed}.json"
    if not (path.is_file() and current_grouping(path)):
        return "its grouping was computed with another scoring"
    found = json.loads(path.read_text())["groups"]
    used = rec.get("groups")
    if method == "mmap-random":
        want = random_group_count(found, len(ctx.styles))
        return None if used is not None and len(used) == want else f"random grouping of {want} groups wanted"
    same = used is not None and sorted(map(sorted, used)) == sorted(map(sorted, found))
    return None if same else "trained on other groups than the computed ones"


def _classify_config(ctx: Context, method: str, shots: int, seed: int, run_dir: Path) -> MultiTaskConfig:
    prompt = {"text-only": PromptSpec("text", "task"), "visual-only": PromptSpec("vision", "task"),
              "mmap-task": PromptSpec("mmap", "task"), "mmap-group": PromptSpec("mmap", "group")}.get(
        method, PromptSpec())
    grouping = GroupingConfig("all")
    if method in ("mmap-full", "mmap-group"):
        grouping = GroupingConfig("file", file=str(grouping_file(ctx, shots, seed)))
    elif method == "mmap-random":
        found = json.loads(grouping_file(ctx, shots, seed).read_text())["groups"]
        grouping = GroupingConfig("random", n_groups=random_group_count(found, len(ctx.styles)))
    return MultiTaskConfig(split_file=str(ctx.classify_split(shots, seed)), run_dir=str(run_dir),
                           template=ctx.rc.template, zero_shot_template=ctx.rc.template,
                           backbone=ctx.backbone_cfg(), split=SplitConfig(shots, 0.5, None, "stem", seed),
                           optim=OptimConfig(lr=ctx.rc.lr, epochs=ctx.rc.epochs), prompt=prompt, grouping=grouping,
                           seed=seed,
                           cache_dir=ctx.tensor_cache, progress=ctx.rc.progress, resume=True,
                           eval_each_epoch=False)


def run_classify(ctx: Context, method: str, shots: int, seed: int) -> dict:
    """One classification cell: train the method on the (shots, seed) split; test accuracy per style."""
    run_dir = cell_dir(ctx.runs, method, shots, seed)
    cfg = _classify_config(ctx, method, shots, seed, run_dir)
    t0 = time.time()
    result = train_multitask(cfg, ctx.backbone)
    if "tasks" not in result.final:
        raise RuntimeError(f"{run_dir}: the run stopped before its last epoch")
    tasks = result.final["tasks"]
    scores = {s: tasks[s]["accuracy"] for s in tasks}
    return _record(ctx, method, shots, seed, run_dir, time.time() - t0, scores=scores,
                   mean=result.final["accuracy_mean"], trainable_params=result.trainable_params,
                   params_used={s: tasks[s]["params_used"] for s in tasks}, groups=result.groups,
                   zero_shot=result.final["zero_shot_accuracy_mean"],
                   n_train={s: tasks[s]["n_train"] for s in tasks}, n_test={s: tasks[s]["n_test"] for s in tasks})


def run_mope(ctx: Context, method: str, shots: int, seed: int) -> dict:
    """One MoPE cell (k experts, CLIP-text or MiniLM psi): accuracy overall and per style, routing entropy."""
    _, k, encoder = method.split("-")
    run_dir = cell_dir(ctx.runs, method, shots, seed)
    mope = MoPEConfig(**(ctx.rc.mope | {"n_experts": int(k[1:])}))
    cfg = FuseConfig(split_file=str(ctx.fusion_split(shots, seed)), run_dir=str(run_dir), head="multiclass",
                     complementary=encoder, mope=mope, backbone=ctx.backbone_cfg(),
                     split=SplitConfig(shots, 0.0, None, "file", seed), optim=mope_optim(ctx.rc.fuse_epochs),
                     zero_shot_template=ctx.rc.template, seed=seed, cache_dir=ctx.tensor_cache,
                     progress=ctx.rc.progress, resume=True, eval_each_epoch=False)
    t0 = time.time()
    result = train_mope(cfg, ctx.backbone)
    if "tasks" not in result.final:
        raise RuntimeError(f"{run_dir}: the run stopped before its last epoch")
    final = result.final["tasks"][FUSION_TASK]
    rows = json.loads((run_dir / "predictions.json").read_text())[FUSION_TASK]
    return _record(ctx, method, shots, seed, run_dir, time.time() - t0, accuracy=final["accuracy"],
                   scores=per_style_accuracy(rows), mean=final["accuracy"], trainable_params=result.trainable_params,
                   routing_entropy=final["routing_entropy"], max_entropy=float(torch.log(torch.tensor(float(
                       mope.n_experts)))), expert_importance=final["expert_importance"], complementary=encoder,
                   n_train=final["n_train"], n_test=final["n_test"])


def run_linear(ctx: Context, method: str, shots: int, seed: int) -> dict:
    """Image-only or text-only fusion baseline: a linear softmax head on one frozen feature.

    image-only: the normalised CLIP image feature (MoPE's head input without psi, no prompts); text-only:
    psi (CLIP text tower or MiniLM). Same optimiser, lr, epochs, batch and seed as the MoPE runs.
    """
    run_dir = cell_dir(ctx.runs, method, shots, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    split = read_split(ctx.fusion_split(shots, seed))
    task = split.tasks[FUSION_TASK]
    bad = BadFiles()
    pre = ctx.backbone.preprocess
    train = part_tensors(split.root, task.train, task.classes, pre, bad, cache_dir=ctx.tensor_cache)
    test = part_tensors(split.root, task.test, task.classes, pre, bad, cache_dir=ctx.tensor_cache)
    if method == "image-only":
        feats = [image_features(ctx.towers, p.images, None).float().cpu() for p in (train, test)]
        source = "image"
    else:
        source = method.rsplit("-", 1)[1]
        encoder = build_complementary(complementary_spec(source), ctx.backbone)
        feats = [encode_texts(encoder, p.texts) for p in (train, test)]
    optim = mope_optim(ctx.rc.fuse_epochs)
    write_json(run_dir / "config.json", {"method": method, "feature": source, "optim": optim, "seed": seed,
                                         "split_file": str(ctx.fusion_split(shots, seed)),
                                         "backbone_fingerprint": ctx.backbone.fingerprint})
    device = ctx.backbone.device
    torch.manual_seed(seed)
    head = nn.Linear(feats[0].shape[1], len(task.classes)).to(device)
    opt = make_optimizer(list(head.parameters()), optim)
    steps = Batcher([len(train)], optim.batch_size, 0).steps_per_epoch
    sched = make_scheduler(opt, optim, steps)
    x_train, y_train = feats[0].to(device), train.targets.to(device)
    history = []
    for epoch in range(1, optim.epochs + 1):
        batcher = Batcher([len(train)], optim.batch_size, epoch_seed(seed, epoch))
        total, seen = 0.0, 0
        for _ in range(steps):
            idx = batcher.next()[0].to(device)
            loss = nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "train_loss": total / seen})
    with torch.no_grad():
        pred = head(feats[1].to(device)).argmax(dim=-1).cpu()
    acc = float((pred == test.targets).float().mean())
    rows = [{"image": it.image, "label": it.label, "predicted": task.classes[p]}
            for it, p in zip(test.items, pred.tolist(), strict=True)]
    write_json(run_dir / "predictions.json", {FUSION_TASK: rows})
    params = count_params(head)
    write_json(run_dir / "metrics.json", {"epochs": history, "final": {
        "tasks": {FUSION_TASK: {"accuracy": acc, "n_train": len(train), "n_test": len(test)}},
        "trainable_params": params}})
    return _record(ctx, method, shots, seed, run_dir, time.time() - t0, accuracy=acc,
                   scores=per_style_accuracy(rows), mean=acc, trainable_params=params, feature=source,
                   n_train=len(train), n_test=len(test))


def run_cell(ctx: Context, method: str, shots: int | None, seed: int | None) -> dict:
    """Run one cell of the table."""
    if method == "zero-shot":
        return run_classify_zero_shot(ctx)
    if method == "fusion-zero-shot":
        return run_fusion_zero_shot(ctx)
    if METHODS[method].family == "classify":
        return run_classify(ctx, method, shots, seed)
    if method.startswith("mope-"):
        return run_mope(ctx, method, shots, seed)
    return run_linear(ctx, method, shots, seed)


def plan_cells(rc: ResultsConfig, methods: list[str]) -> list[tuple[str, int | None, int | None]]:
    """Cells in run order: zero-shot first, then seed by seed (a partial table has whole seeds early)."""
    cells: list[tuple[str, int | None, int | None]] = [(m, None, None) for m in methods if m in ZERO_SHOT]
    for seed in rc.seeds:
        for shots in rc.shots:
            cells += [(m, shots, seed) for m in methods if m not in ZERO_SHOT]
    return cells


def build_results(rc: ResultsConfig, backbone: Backbone | None = None) -> dict:
    """Run every missing cell (within the budget), then write <out>.md, <out>.json and <out>.png."""
    t_start = time.time()
    methods = selected_methods(rc.methods)
    if backbone is None:
        backbone = load_backbone(BackboneConfig(rc.model, rc.pretrained, rc.device).spec())
    styles = list(rc.tasks or read_tasks(rc.cache)["tasks"])
    template_choice = None
    if rc.template == AUTO:  # the same choice as `ship`: k-shot train images of the largest shots, seed 0
        split = emoji_split(rc.cache, max(rc.shots), rc.seeds[0], styles)
        template_choice = choose_template(Towers.of(backbone), split, cache_dir=Path(rc.cache) / "tensors")
        rc = replace(rc, template=template_choice.template)
        log(f"results: template {rc.template!r} (train-part zero-shot {template_choice.scores})")
    settings = settings_of(rc, backbone, styles)
    shipped = shipped_rows(rc.shipped, settings) if rc.shipped else None  # refused before any run, not after
    runs = resolve_runs_dir(rc.runs_dir, rc.cache, settings)
    ctx = Context(rc, backbone, Towers.of(backbone), runs, styles, machine_info(rc.device))
    log(f"results: runs dir {runs}")
    ran, skipped, failed, not_started, restored = [], [], [], [], []
    if rc.restore:
        restored, measured = restore_published(ctx, Path(rc.restore), settings)
        ran += ["zero-shot"] if measured else []
    for method, shots, seed in plan_cells(rc, methods):
        where = cell_dir(runs, method, shots, seed)
        label = f"{method} k={shots} seed={seed}" if shots is not None else method
        rec = read_result(where)
        if rec is not None and (why := stale_cell(ctx, method, shots, seed, rec)) is not None:
            log(f"results: {label} is stale ({why})")
            set_aside(runs, where)
            rec = None
        if rec is not None:
            if label not in ran:
                skipped.append(label)
            continue
        if rc.budget_minutes is not None and time.time() - t_start > rc.budget_minutes * 60:
            not_started.append(label)
            continue
        log(f"results: running {label}")
        try:
            run_cell(ctx, method, shots, seed)
            ran.append(label)
        except Exception as exc:  # one failed cell must not lose the others; it is reported in the table
            if rc.stop_on_error:
                raise
            log(f"results: {label} failed: {exc.__class__.__name__}: {exc}")
            failed.append({"cell": label, "error": f"{exc.__class__.__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=4)})
    session = {"ran": ran, "skipped": skipped, "failed": failed, "not_started": not_started, "restored": restored,
               "wall_s": round(time.time() - t_start, 1), "machine": ctx.machine, "command": rc.command}
    report = collect(runs, rc, styles, settings, session)
    report["n_classes"] = len(read_tasks(rc.cache)["classes"])
    report["template_choice"] = template_choice.as_dict() if template_choice else None
    report["shipped"] = shipped
    report["restored_from"] = rc.restore
    write_outputs(report, Path(rc.out))
    return report


def restore_published(ctx: Context, path: Path, settings: dict) -> tuple[list[str], bool]:
    """Seed the runs dir with the finished runs and groupings of a published table (`<out>.json`).

    The published JSON holds every number of every run, so a table survives losing its cache (a fresh machine):
    a rerun with `--restore docs/results.json` runs only what the table still misses. Refused unless the
    settings are the same (weights fingerprint, epochs, template, styles, ...) and the prepared data are: the
    zero-shot row is measured again on this cache and must give the published per-style accuracy (within one
    test image) on as many test images. Runs already in the runs dir win over published ones. Returns the
    labels of the runs restored and whether zero-shot was measured for the check.
    """
    try:
        published = json.loads(path.read_text())
        pub_settings, cells, groupings = published["settings"], published["cells"], published["groupings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a results table ({exc.__class__.__name__}: {exc})") from exc
    want = to_jsonable(settings)
    if pub_settings != want:
        changed = sorted(k for k in set(pub_settings) | set(want) if pub_settings.get(k) != want.get(k))
        raise ValueError(f"{path}: made with other settings (differs in {changed}); nothing restored")
    zero = next((r for c in cells if c["method"] == "zero-shot" for r in (c.get("runs") or {}).values()), None)
    if zero is None:
        raise ValueError(f"{path}: has no zero-shot run to check this cache's data against; nothing restored")
    here = read_result(cell_dir(ctx.runs, "zero-shot"))
    measured = here is None
    if measured:
        here = run_classify_zero_shot(ctx)
    for style, score in zero["scores"].items():
        n = zero["n_test"].get(style)
        if here["n_test"].get(style) != n or abs(here["scores"].get(style, -1.0) - score) > 1.0 / n + 1e-9:
            raise ValueError(f"{path}: this cache's data differ from the published table's: zero-shot on "
                             f"{style!r} is {here['scores'].get(style)} on {here['n_test'].get(style)} test images "
                             f"here, {score} on {n} there; nothing restored")
    machine = {"described": "; ".join(published.get("machines") or []) or "unknown (restored)"}
    for g in groupings:
        target = ctx.runs / "grouping" / f"k{g['shots']}-s{g['seed']}.json"
        if not target.is_file():
            write_json(target, {**g, "restored_from": str(path)})
    restored = []
    for cell in cells:
        if cell["method"] not in METHODS or cell["method"] in ZERO_SHOT:
            continue
        for run in (cell.get("runs") or {}).values():
            where = cell_dir(ctx.runs, cell["method"], run["shots"], run["seed"])
            if read_result(where) is None:
                write_json(where / RESULT, {"machine": machine, **run, "run_dir": str(where),
                                            "restored_from": str(path)})
                restored.append(f"{cell['method']} k={run['shots']} seed={run['seed']}")
    log(f"results: restored {len(restored)} run(s) and {len(groupings)} grouping(s) from {path}")
    return restored, measured


# ---- the report ----------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(runs: Path, rc: ResultsConfig, styles: list[str], settings: dict, session: dict) -> dict:
    """Every finished cell of the requested shots and seeds, aggregated over seeds; missing cells listed."""
    cells, missing, machines, wall, counted = [], [], {}, 0.0, set()
    for method in METHODS.values():
        for shots in rc.shots:
            seeds = [None] if method.key in ZERO_SHOT else rc.seeds
            recs = {}
            for seed in seeds:
                rec = read_result(cell_dir(runs, method.key, shots, seed))
                if rec is None:
                    missing.append(f"{method.key} k={shots} seed={seed}" if seed is not None else method.key)
                else:
                    recs[seed] = rec
            cell: dict = {"method": method.key, "family": method.family, "label": method.label, "shots": shots,
                          "seeds_done": sorted(s for s in recs if s is not None), "seeds_wanted": rc.seeds,
                          "complete": len(recs) == len(seeds)}
            if recs:
                first = next(iter(recs.values()))
                keys = styles if method.family == "classify" else ["all", *styles]
                per_style = {}
                for key in keys:
                    vals = [r["accuracy"] if key == "all" else r["scores"].get(key) for r in recs.values()]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        mean, std = _mean_std(vals)
                        per_style[key] = {"mean": mean, "std": std, "values": vals}
                cell["scores"] = per_style
                cell["mean"] = dict(zip(("mean", "std"), _mean_std([r["mean"] for r in recs.values()]),
                                        strict=True))
                cell["trainable_params"] = first["trainable_params"]
                if "routing_entropy" in first:
                    ent = [r["routing_entropy"] for r in recs.values()]
                    cell["routing_entropy"] = {"mean": statistics.fmean(ent), "max": first["max_entropy"]}
                cell["runs"] = {str(s): {k: v for k, v in r.items() if k != "expert_importance"}
                                for s, r in recs.items()}
                for r in recs.values():
                    machines[describe_machine(r.get("machine", {}))] = True
                for seed, r in recs.items():
                    if (method.key, None if seed is None else shots, seed) not in counted:
                        counted.add((method.key, None if seed is None else shots, seed))
                        wall += r.get("wall_s", 0.0)
            cells.append(cell)
    groupings = []
    for shots in rc.shots:
        for seed in rc.seeds:
            path = runs / "grouping" / f"k{shots}-s{seed}.json"
            if path.is_file():
                g = json.loads(path.read_text())
                wall += g.get("wall_s", 0.0)
                groupings.append({"shots": shots, "seed": seed, "groups": g["groups"], "verdict": g.get("verdict"),
                                  "tasks": g.get("tasks"), "similarity": g.get("similarity"),
                                  "cosine": g.get("cosine"), "centered": bool(g.get("centered", False)),
                                  "wall_s": g.get("wall_s", 0.0)})
    missing = list(dict.fromkeys(missing))
    return {"title": "mmserve accuracy table (issue 5)", "command": rc.command, "settings": settings,
            "runs_dir": str(runs), "styles": styles, "shots": rc.shots, "seeds": rc.seeds,
            "methods": {m.key: {"family": m.family, "label": m.label, "definition": m.definition}
                        for m in METHODS.values()},
            "cells": cells, "groupings": groupings, "missing": missing, "machines": list(machines),
            "runs_wall_s": round(wall, 1), "session": session,
            "generated": datetime.now(UTC).replace(microsecond=0).isoformat()}


def shipped_rows(path: str | Path, settings: dict) -> dict:
    """The shipped registry's held-out scores (ship.json) as reference rows of the table's (shots, seed) cell.

    `ship` trains one cell, (shots, seed), with the validation-chosen recipe on the same seeded split draw as
    this table; it is comparable only on the same backbone weights, styles and template, else it is refused.
    """
    path = Path(path)
    try:
        ship = json.loads(path.read_text())
        st, reg = ship["settings"], ship["registry"]
        evals = reg["eval"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a ship report ({exc.__class__.__name__}: {exc})") from exc
    for key in ("backbone_fingerprint", "styles", "template"):
        if st.get(key) != settings.get(key):
            raise ValueError(f"{path}: settings.{key} is {st.get(key)!r}, the table's is {settings.get(key)!r}: "
                             "the shipped cell is not comparable")
    styles = [t for t in st["styles"] if t in evals]
    groups = reg.get("groups") or []
    group_params = sum(evals[g[0]]["params_used"] - evals[g[0]]["trainable_params"] for g in groups if g)
    fusion = [t for t, e in evals.items() if e.get("kind") == "fuse"]
    rows = {"source": str(path), "shots": st["shots"], "seed": st["seed"], "groups": groups,
            "grouping_verdict": reg.get("grouping_verdict"),
            "recipe": {k: st.get(k) for k in ("optimizer", "lr", "weight_decay", "epochs", "mmap_shape",
                                              "fuse_epochs", "fuse_head_lr", "complementary", "experts")},
            "classify": {"scores": {t: evals[t]["score"] for t in styles},
                         "mean": statistics.fmean(evals[t]["score"] for t in styles),
                         "trainable_params": sum(evals[t]["trainable_params"] for t in styles) + group_params}}
    if fusion:
        e = evals[fusion[0]]
        rows["fusion"] = {"task": fusion[0], "all": e["score"], "trainable_params": e["trainable_params"]}
    return rows


def _shipped_label(rows: dict, family: str) -> str:
    r = rows["recipe"]
    if family == "classify":
        b, m, n = r["mmap_shape"]
        return (f"**shipped registry**: MmAP full, validation-chosen recipe ({r['optimizer']} lr {r['lr']}, "
                f"{r['epochs']} epochs, b = {b}, {m} x {n} source)")
    return (f"**shipped registry**: MoPE k={r['experts']}, {r['complementary']}, head lr {r['fuse_head_lr']} "
            "(validation-chosen)")


def _template_note(report: dict) -> str:
    choice = report.get("template_choice")
    if not choice:
        return ""
    ranked = sorted(choice["scores"].items(), key=lambda kv: -kv[1])
    return (f", chosen on the {choice['n_images']} k-shot train images (no test image) by train-part zero-shot: "
            + ", ".join(f"`{t}` {100 * v:.1f}%" for t, v in ranked))


def _dur(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


def _pct(cell: dict, key: str) -> str:
    v = cell.get("mean") if key == "mean" else cell.get("scores", {}).get(key)
    if v is None:
        return "—"
    return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" if v["std"] else f"{100 * v['mean']:.1f}"


def _seeds(cell: dict) -> str:
    if cell["method"] in ZERO_SHOT:
        return "— (no seed)" if cell["complete"] else "missing"
    done = len(cell["seeds_done"])
    return f"{done}/{len(cell['seeds_wanted'])}" + ("" if cell["complete"] else " (missing)")


def markdown(report: dict) -> str:
    """docs/results.md: the tables, the groups found, definitions, and the cells still missing."""
    styles, cells = report["styles"], report["cells"]
    by = {(c["method"], c["shots"]): c for c in cells}
    s = report["settings"]
    sess = report["session"]
    lines = [f"# {report['title']}", "",
             "Generated by `mmserve-train results`; do not edit by hand (rerun the command: finished runs are "
             "skipped, missing ones run).", "",
             f"- Command: `{report['command'] or '(API call)'}`",
             f"- Backbone: `{s['model']}`, weights fingerprint `{s['backbone_fingerprint']}`",
             f"- Settings: classification {s['epochs']} epochs (SGD lr {s.get('lr', 0.0035)}, batch 16 per task), "
             "grouping "
             f"{s['group_steps']} steps (snapshot every {s['group_every']}); fusion {s['fuse_epochs']} epochs "
             "(AdamW lr 4e-4, batch 32); template `" + s["template"] + "`" + _template_note(report),
             f"- Machine(s): {'; '.join(report['machines']) or describe_machine(sess['machine'])}",
             f"- Wall time: {_dur(report['runs_wall_s'])} over all runs in this table; this invocation "
             f"{_dur(sess['wall_s'])} on {describe_machine(sess['machine'])} (ran {len(sess['ran'])}, "
             f"skipped {len(sess['skipped'])} finished"
             + (f" ({len(sess['restored'])} restored from `{report['restored_from']}`)" if sess.get("restored") else "")
             + f", failed {len(sess['failed'])}, not started "
             f"{len(sess['not_started'])}); a run resumed across sessions counts its last session only",
             f"- Runs: `{report['runs_dir']}`",
             f"- Cells measured: {sum(1 for c in cells if c['complete'])} of {len(cells)} complete; "
             f"{len(report['missing'])} run(s) missing (listed at the end).", "",
             "Scores are top-1 accuracy (%) on held-out emoji identities (never seen in training, never used for "
             "tuning), mean ± standard deviation over seeds; a seed draws the k-shot train set and initialises "
             "the prompts. `—` = not measured yet.", ""]
    lines += [f"## Classification: {len(styles)} emoji styles, {report['n_classes']} classes (emojibase subgroups)",
              ""]
    for shots in report["shots"]:
        lines += [f"### k = {shots} shots per class and style", "",
                  "| method | " + " | ".join(styles) + " | mean | seeds | trainable params |",
                  "| --- | " + " | ".join(["---:"] * len(styles)) + " | ---: | --- | ---: |"]
        for m in (x for x in report["methods"] if report["methods"][x]["family"] == "classify"):
            c = by[(m, shots)]
            params = f"{c['trainable_params']:,}" if "trainable_params" in c else "—"
            lines.append(f"| {c['label']} | " + " | ".join(_pct(c, st) for st in styles)
                         + f" | {_pct(c, 'mean')} | {_seeds(c)} | {params} |")
        shipped = report.get("shipped")
        if shipped and shipped["shots"] == shots:
            cl = shipped["classify"]
            lines.append(f"| {_shipped_label(shipped, 'classify')} | "
                         + " | ".join(f"{100 * cl['scores'][st]:.1f}" if st in cl["scores"] else "—" for st in styles)
                         + f" | {100 * cl['mean']:.1f} | seed {shipped['seed']} only | {cl['trainable_params']:,} |")
        lines.append("")
    lines += ["## Task groups found by the full method (gradient similarity, eq. 8)", "",
              "Groups maximise the within-group sum of similarities minus the mean pair similarity (centred; raw "
              "sums of all-positive similarities always give one group); the scores column says which.", ""]
    if report["groupings"]:
        lines += ["| shots | seed | scores | groups | colour vs monochrome? |", "| ---: | ---: | --- | --- | --- |"]
        for g in report["groupings"]:
            groups = " · ".join("{" + ", ".join(x) + "}" for x in g["groups"])
            scoring = "centred" if g.get("centered") else "raw"
            lines.append(f"| {g['shots']} | {g['seed']} | {scoring} | {groups} | {g['verdict']} |")
        g = report["groupings"][0]
        if g.get("similarity") and g.get("tasks"):
            lines += ["", f"Gradient dot-product similarity (k = {g['shots']}, seed {g['seed']}):", "",
                      "| | " + " | ".join(g["tasks"]) + " |",
                      "| --- | " + " | ".join(["---:"] * len(g["tasks"])) + " |"]
            for name, row in zip(g["tasks"], g["similarity"], strict=True):
                lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
    else:
        lines.append("No grouping computed yet.")
    lines += ["", "## Fusion: emoji image + CLDR name → subgroup (one task over all styles)", ""]
    for shots in report["shots"]:
        lines += [f"### k = {shots} shots per class", "",
                  "| method | all styles | " + " | ".join(styles)
                  + " | routing entropy (nats; max ln k) | seeds | trainable params |",
                  "| --- | ---: | " + " | ".join(["---:"] * len(styles)) + " | ---: | --- | ---: |"]
        for m in (x for x in report["methods"] if report["methods"][x]["family"] == "fusion"):
            c = by[(m, shots)]
            ent = c.get("routing_entropy")
            ent_s = f"{ent['mean']:.3f} / {ent['max']:.3f}" if ent else ("—" if m.startswith("mope") else "n/a")
            params = f"{c['trainable_params']:,}" if "trainable_params" in c else "—"
            lines.append(f"| {c['label']} | {_pct(c, 'all')} | " + " | ".join(_pct(c, st) for st in styles)
                         + f" | {ent_s} | {_seeds(c)} | {params} |")
        shipped = report.get("shipped")
        if shipped and shipped["shots"] == shots and "fusion" in shipped:
            fu = shipped["fusion"]
            lines.append(f"| {_shipped_label(shipped, 'fusion')} | {100 * fu['all']:.1f} | "
                         + " | ".join(["n/r"] * len(styles))
                         + f" | n/r | seed {shipped['seed']} only | {fu['trainable_params']:,} |")
        lines.append("")
    if report.get("shipped"):
        sh = report["shipped"]
        lines += ["## The shipped registry in this table", "",
                  f"The **shipped registry** rows are `{sh['source']}`: `mmserve-train ship` trains one cell, "
                  f"k = {sh['shots']}, seed {sh['seed']}, on the same seeded split draw as this table, with the recipe "
                  "chosen on a validation split carved from the train part (docs/recipe.md), not the paper's recipe "
                  "the other rows use. One seed only; its groups: "
                  + " · ".join("{" + ", ".join(g) + "}" for g in sh["groups"])
                  + f" ({sh['grouping_verdict']}). n/r = not recorded by `ship` (it scores the fusion task over all "
                  "styles).", ""]
    lines += ["## Definitions", ""]
    lines += [f"- **{v['label']}** (`{k}`): {v['definition']}." for k, v in report["methods"].items()]
    lines += ["- Classification split: test = the held-out emoji identities of `tasks/heldout_emoji.json` (the same "
              "identities in every style); train = k identities per class and style drawn with the seed from the "
              "train identities (fewer where a class has fewer).",
              "- Fusion split: test = `fusion/test.jsonl` (the held-out identities, every style); train = k lines "
              "per class drawn with the seed from `fusion/train.jsonl`.",
              "- Trainable parameters: everything the method trains, summed over the five tasks (classification) "
              "or for the fusion task.", ""]
    lines += ["## Missing cells", ""]
    lines += [f"- {m}" for m in report["missing"]] or ["None: every cell is measured."]
    if sess["failed"]:
        lines += ["", "Failed in the last invocation:", ""]
        lines += [f"- {f['cell']}: {f['error']}" for f in sess["failed"]]
    lines += ["", f"![accuracy vs shots]({Path(report.get('plot', 'results.png')).name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Accuracy vs shots per method (classification mean over styles; fusion over all styles), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, family, key, title in ((axes[0], "classify", "mean", "classification (mean over styles)"),
                                   (axes[1], "fusion", "all", "fusion (all styles)")):
        drawn = 0
        for m, meta in report["methods"].items():
            if meta["family"] != family:
                continue
            pts = [(c["shots"], c["mean"] if key == "mean" else c["scores"].get("all"))
                   for c in report["cells"] if c["method"] == m and "scores" in c]
            pts = [(x, v) for x, v in pts if v]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [100 * v["mean"] for _, v in pts]
            es = [100 * v["std"] for _, v in pts]
            if m in ZERO_SHOT:
                ax.axhline(ys[0], linestyle="--", color="grey", label=meta["label"])
            else:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=meta["label"])
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["shots"], [str(s) for s in report["shots"]])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict, out: Path) -> tuple[Path, Path, Path]:
    """<out>.png, <out>.json and <out>.md (the Markdown links the PNG by its file name)."""
    png, js, md = out.with_suffix(".png"), out.with_suffix(".json"), out.with_suffix(".md")
    report["plot"] = str(png)
    plot(report, png)
    write_json(js, report)
    md.write_text(markdown(report))
    log(f"results: wrote {md}, {js}, {png}")
    return md, js, png


# ---- a miniature prepared cache, for tests and smoke runs ----------------------------------------------------


def write_toy_cache(cache: str | Path, styles: tuple[str, ...] = ("noto", "fluent_mono"),
                    classes: dict[str, str] | None = None, per_class: int = 6, size: int = 32, seed: int = 0
                    ) -> Path:
    """A tiny cache in `training.prepare`'s layout (tasks tree, classes.json, heldout_emoji.json, fusion JSONL).

    Class `c` is drawn as shapes of colour `classes[c]`; the fusion text names the class, so both modalities
    carry the label. Half of each class's identities are held out for test.
    """
    from training.synthetic import SHAPES, draw_shape

    cache = Path(cache)
    classes = classes or {"red-thing": "red", "blue-thing": "blue", "green-thing": "green"}
    rng = random.Random(seed)
    tasks_dir = cache / "tasks"
    held, rows = {}, {"train": [], "test": []}
    for cid, colour in classes.items():
        hexes = [f"1F{int(hashlib.md5(f'{cid}{i}'.encode()).hexdigest()[:3], 16):03X}" for i in range(per_class)]
        held[cid] = {"train": hexes[: per_class // 2], "test": hexes[per_class // 2:]}
        for style in styles:
            folder = tasks_dir / "images" / style / cid
            folder.mkdir(parents=True, exist_ok=True)
            for h in hexes:
                img = draw_shape(colour, rng.choice(SHAPES), size, rng)
                if style in MONO_STYLES:
                    img = img.convert("L").convert("RGB")
                img.save(folder / f"{h}.png")
                part = "test" if h in held[cid]["test"] else "train"
                rows[part].append({"image": str((folder / f"{h}.png").resolve()), "task": style, "hexcode": h,
                                   "text": f"a {cid.split('-')[0]} thing", "label": cid})
    write_json(tasks_dir / "classes.json", {"tasks": list(styles), "classes": [
        {"index": i, "id": cid, "name": cid.replace("-", " "), "n_emoji": per_class} for i, cid in enumerate(classes)]})
    write_json(tasks_dir / "heldout_emoji.json", {"seed": seed, "classes": held})
    fusion = cache / "fusion"
    fusion.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        (fusion / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[part]))
        tag_rows = [r | {"label": [r["label"], "colour" if r["task"] not in MONO_STYLES else "mono"]}
                    for r in rows[part]]
        (fusion / f"tags_{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tag_rows))
    return cache
