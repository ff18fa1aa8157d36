"""Running one cell of the table: train the method on its (shots, seed) split, score it per style."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from mmserve.backbone import Backbone
from mmserve.complementary import build_complementary
from mmserve.prompts import count_params
from mmserve.prompts.mope import MoPEConfig
from training.classify import Towers, class_scores, image_features
from training.config import DEFAULT_FUSE_RECIPE, BackboneConfig, OptimConfig, SplitConfig, recipe_optim
from training.data import BadFiles
from training.grouping import GroupingConfig, choose_groups, task_affinity
from training.loop import Epoch, EpochLoop
from training.mmap_trainer import MultiTaskConfig, PromptSpec, load_or_draw_split, task_data, train_multitask
from training.mope_trainer import FuseConfig, complementary_spec, encode_texts, train_mope
from training.progress import log
from training.runs import write_json
from training.splits import read_split, write_split
from training.tensors import part_tensors

from .methods import FUSION_TASK, GROUPED, METHODS, RESULT, ResultsConfig
from .rundir import cell_dir, current_grouping, random_group_count, set_aside
from .tasks import emoji_split, fusion_task_split, grouping_verdict, per_style_accuracy, read_tasks


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
    row = METHODS[method]
    prompt = PromptSpec(row.prompt, row.sharing)
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


def _named_recipe(rc: ResultsConfig) -> str | None:
    """The recipe a MoPE cell names in its config: None for the default one (its runs predate recipe names)."""
    return None if rc.fuse_recipe == DEFAULT_FUSE_RECIPE else rc.fuse_recipe


def fusion_optim(rc: ResultsConfig) -> OptimConfig:
    """The optimiser of the fusion rows: the default recipe with --fuse-epochs, or another recipe as it is."""
    return recipe_optim(rc.fuse_recipe, rc.fuse_epochs if rc.fuse_recipe == DEFAULT_FUSE_RECIPE else None)


def run_mope(ctx: Context, method: str, shots: int, seed: int) -> dict:
    """One MoPE cell (k experts, CLIP-text or MiniLM psi, head on [image ; psi] or, `-image`, the image only):
    accuracy overall and per style, routing entropy (noise-free softmax)."""
    _, k, encoder, *head = method.split("-")  # mope-k16-minilm[-image]
    run_dir = cell_dir(ctx.runs, method, shots, seed)
    mope = MoPEConfig(**(ctx.rc.mope | {"n_experts": int(k[1:]), "head_input": head[0] if head else "image+psi"}))
    cfg = FuseConfig(split_file=str(ctx.fusion_split(shots, seed)), run_dir=str(run_dir), head="multiclass",
                     complementary=encoder, mope=mope, backbone=ctx.backbone_cfg(),
                     split=SplitConfig(shots, 0.0, None, "file", seed), optim=fusion_optim(ctx.rc),
                     recipe=_named_recipe(ctx.rc), zero_shot_template=ctx.rc.template, seed=seed,
                     cache_dir=ctx.tensor_cache, progress=ctx.rc.progress, resume=True, eval_each_epoch=False)
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
                   head_input=mope.head_input, recipe=ctx.rc.fuse_recipe,
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
    optim = fusion_optim(ctx.rc)
    write_json(run_dir / "config.json", {"method": method, "feature": source, "optim": optim, "seed": seed,
                                         "split_file": str(ctx.fusion_split(shots, seed)),
                                         "backbone_fingerprint": ctx.backbone.fingerprint})
    device = ctx.backbone.device
    torch.manual_seed(seed)
    head = nn.Linear(feats[0].shape[1], len(task.classes)).to(device)
    loop = EpochLoop(list(head.parameters()), optim, [len(train)], seed, progress=False)
    x_train, y_train = feats[0].to(device), train.targets.to(device)

    def train_epoch(epoch: Epoch) -> dict:
        total, seen = 0.0, 0
        for batch in epoch.batches():
            idx = batch[0].to(device)
            loss = nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            epoch.optimise(loss)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return {"epoch": epoch.number, "train_loss": total / seen}

    loop.run(train_epoch)
    history = loop.history
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
