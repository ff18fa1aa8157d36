"""MoPE fusion training: per-sample image-tower prompts conditioned on the text, plus a linear head.

Loss: cross-entropy (multi-class) or binary cross-entropy (multi-label) + importance_weight x importance loss
(MoPEConfig; squared CV of per-expert routing mass, zero below gamma). The routing statistics and the importance
loss read the router's noise-free softmax in every routing mode (eq. 5-6); noise and the top-1 gate shape the
prompts only. The head reads the prompted image feature (`--head image`, the paper's) or it and psi
(`--head image+psi`, the default: what the shipped registry was trained with). Optimisation: a named recipe
(training.config.FUSE_RECIPES: `adamw-cosine-10` by default, `mope-paper` = 12 epochs, step decay after epochs 2
and 5, RandAug) or the optimiser options. Every epoch records train/test scores, the mean routing entropy and each
expert's share of the routing mass per layer (the paper's figures 5 and 6). The complementary encoder is frozen,
so psi is computed once per sample and cached for the run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmserve.backbone import Backbone
from mmserve.complementary import build_complementary
from mmserve.fusion import FusionModel
from mmserve.prompts import count_params
from mmserve.prompts.mope import HEAD_INPUTS, MoPEConfig, importance_loss, importance_of_mass
from mmserve.registry import DEFAULT_TEMPLATE, Manifest, TaskEntry, save_registry
from training.augment import TensorRandAugment
from training.classify import Towers
from training.config import (
    DEFAULT_FUSE_RECIPE,
    FUSE_RECIPES,
    RUN,
    BackboneConfig,
    OptimConfig,
    SplitConfig,
    fuse_recipe,
    recipe_optim,
)
from training.data import BadFiles, read_fusion_jsonl
from training.distributed import World, join_world
from training.loop import Checkpoint, Epoch, EpochLoop
from training.metrics import accuracy, f1_scores
from training.options import FieldValues, Opt, field_value, option
from training.progress import log
from training.runs import RunResult, backbone_ref, load_checkpoint, start_run, write_json
from training.splits import Split, SplitTask, fusion_split, reuse_or_draw
from training.tensors import PartTensors, part_tensors
from training.zeroshot import zero_shot_metrics

HEAD_KINDS = ("multiclass", "multilabel")


class HeadChoice(argparse.Action):
    """`--head` (repeatable): multiclass / multilabel set the head's kind, image / image+psi what it reads."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, "head_input" if values in HEAD_INPUTS else self.dest, values)


@dataclass
class FuseConfig:
    """Everything a MoPE fusion run needs; saved as config.json in the run dir."""

    # JSON lines; split into train/test unless `test` is given
    train: str | None = option(None, help="fusion JSON lines (split unless --test is given)")
    # then only train is k-shot sampled
    test: str | None = option(None, help="fusion JSON lines of the test part")
    name: str | None = option(None, help="task name (default: the train file's stem)")
    select: dict[str, str] = option(default_factory=dict, type=field_value, action=FieldValues, metavar="FIELD=VALUE",
                                    help="keep only lines whose FIELD equals VALUE (repeatable), e.g. task=noto")
    # reused when it exists, else the drawn split is also written there
    split_file: str | None = option(None, RUN["split_file"])
    run_dir: str = option("runs/fuse", RUN["run_dir"])
    # None = multilabel iff any label is a list; --head image / image+psi set mope.head_input (the MoPE options)
    head: str | None = option(None, choices=HEAD_KINDS + HEAD_INPUTS, action=HeadChoice,
                              help="multiclass | multilabel (default: multilabel iff a label is a list); image "
                                   "(the paper's head: prompted image feature only) | image+psi (default: "
                                   "[image feature ; psi]); repeatable, e.g. --head multilabel --head image")
    classes: list[str] | None = None  # None = the labels found; set it to report unknown labels
    # "clip" (frozen CLIP text tower), "minilm", or a sentence-encoder folder
    complementary: str = option("clip", help="'clip' (text tower), 'minilm', or an encoder folder")
    mope: MoPEConfig = field(default_factory=MoPEConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    split: SplitConfig = field(default_factory=lambda: SplitConfig(shots=None, test_fraction=0.2))
    optim: OptimConfig = field(default_factory=lambda: recipe_optim(DEFAULT_FUSE_RECIPE))
    # a named recipe (training.config.FUSE_RECIPES) replaces `optim` with its own and turns on its RandAug
    recipe: str | None = option(None, choices=tuple(FUSE_RECIPES),
                                help="a named recipe: its optimiser and schedule, and RandAug if it has it "
                                     "(the optimisation options cannot be given with it)")
    randaug: bool = option(False, help="RandAugment on every training image, each epoch")
    head_lr: float | None = option(None)  # lr of the linear head (None = optim.lr)
    # on sigmoid probabilities
    threshold: float = option(0.5, help="multi-label decision threshold")
    zero_shot_template: str = DEFAULT_TEMPLATE
    on_bad_file: str = option("skip", RUN["on_bad_file"])
    seed: int = option(0, RUN["seed"])
    cache_dir: str | None = option(None, RUN["cache_dir"])
    progress: bool = option(True, RUN["progress"])
    resume: bool = option(False, RUN["resume"])
    stop_after_epoch: int | None = option(None, RUN["stop_after_epoch"])
    eval_each_epoch: bool = option(True, RUN["eval_each_epoch"])

    def __post_init__(self) -> None:
        """A named recipe sets the optimiser and RandAug (so config.json records what ran); an unknown or renamed
        one is refused here, before any work."""
        if self.head is not None and self.head not in HEAD_KINDS:
            raise ValueError(f"fusion head must be one of {HEAD_KINDS}, got {self.head!r} (what the head reads is "
                             f"mope.head_input: {HEAD_INPUTS})")
        if self.recipe is not None:
            self.randaug = self.randaug or fuse_recipe(self.recipe).randaug
            self.optim = recipe_optim(self.recipe)


# the options of the MoPE config (mmserve.prompts.mope, which knows nothing of command lines), in --help order
MOPE_OPTIONS = {"prompt_len": Opt(help="l"), "n_experts": Opt("--experts", help="k"), "mapped_len": Opt(),
                "mapper_hidden": Opt(), "temperature": Opt(), "routing": Opt(choices=("dense", "top1")),
                "router_uses_image": Opt(), "importance_weight": Opt(), "importance_threshold": Opt(), "depth": Opt(),
                # also `--head image|image+psi` (FuseConfig.head's action writes this field's attribute)
                "head_input": Opt(choices=HEAD_INPUTS, help="what the linear head reads (as --head image|image+psi)")}


def complementary_spec(name: str) -> dict:
    """The registry spec of a complementary encoder given on the command line."""
    if name in ("clip", "clip_text"):
        return {"kind": "clip_text"}
    return {"kind": "sentence", "model": name}


def load_fusion_split(cfg: FuseConfig, bad: BadFiles) -> tuple[Split, str]:
    """Reuse cfg.split_file when it exists, else read the JSON lines and draw (and save) the split."""
    def draw() -> Split:
        if not cfg.train:
            raise ValueError("fusion training needs --train JSONL (or an existing split file)")
        items = read_fusion_jsonl(cfg.train, bad, cfg.select, cfg.classes)
        test = read_fusion_jsonl(cfg.test, bad, cfg.select, cfg.classes) if cfg.test else None
        return fusion_split(cfg.name or Path(cfg.train).stem, items, cfg.split, test, cfg.classes, cfg.head)

    split = reuse_or_draw(cfg.split_file, cfg.run_dir, cfg.resume, draw)
    if split.kind != "fuse" or len(split.tasks) != 1:
        raise ValueError("a fusion split holds exactly one 'fuse' task")
    return split, split.root


@torch.no_grad()
def encode_texts(encoder, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """psi for every text, in batches (the encoder is frozen: computed once per run)."""
    return torch.cat([encoder.encode(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)])


@dataclass
class FusionEval:
    """Scores, routing statistics and predictions of a fusion model on one part."""

    metrics: dict
    predictions: list


class RoutingStats:
    """Accumulates the router's noise-free softmax (B, K, k; FusionOutput.probs, in every routing mode) into the
    mean entropy and per-layer expert shares."""

    def __init__(self) -> None:
        self.mass: torch.Tensor | None = None
        self.entropy = 0.0
        self.count = 0

    def add(self, routing: torch.Tensor) -> None:
        """Add one batch of routing scores."""
        routing = routing.detach().float().cpu()
        mass = routing.sum(dim=0)
        self.mass = mass if self.mass is None else self.mass + mass
        p = routing.clamp_min(1e-12)
        self.entropy += float(-(p * p.log()).sum(dim=-1).mean(dim=-1).sum())
        self.count += routing.shape[0]

    def merged(self, world: World) -> RoutingStats:
        """Every rank's statistics summed (torchrun)."""
        out = RoutingStats()
        flat = world.sum(self.mass.flatten().tolist() + [self.entropy, float(self.count)])
        out.mass = torch.tensor(flat[:-2]).view_as(self.mass)
        out.entropy, out.count = flat[-2], int(flat[-1])
        return out

    def summary(self) -> dict:
        """Mean routing entropy (nats; log k = uniform) and each expert's share of the mass per layer."""
        shares = self.mass / self.mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return {"routing_entropy": self.entropy / max(1, self.count), "expert_importance": shares.tolist()}


def scores(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, threshold: float) -> dict:
    """Accuracy (multi-class) or F1 micro/macro (multi-label) of logits against targets."""
    if multilabel:
        return f1_scores(logits.sigmoid() > threshold, targets.bool())
    return {"accuracy": accuracy(logits.argmax(dim=-1), targets)}


@torch.no_grad()
def evaluate_fusion(model: FusionModel, towers: Towers, part: PartTensors, psi: torch.Tensor, classes: list[str],
                    threshold: float, batch_size: int = 128) -> FusionEval:
    """Test scores, routing statistics and predicted labels (class names, or lists of them)."""
    was_training = model.training
    model.eval()
    logits, stats = [], RoutingStats()
    for i in range(0, len(part), batch_size):
        out = model(towers.image, part.images[i:i + batch_size].to(towers.device), psi[i:i + batch_size].to(
            towers.device))
        logits.append(out.logits.float().cpu())
        stats.add(out.probs)
    model.train(was_training)
    logits = torch.cat(logits)
    metrics = scores(logits, part.targets, model.multilabel, threshold) | stats.summary()
    if model.multilabel:
        preds = [[classes[j] for j in row.nonzero().flatten().tolist()] for row in logits.sigmoid() > threshold]
    else:
        preds = [classes[j] for j in logits.argmax(dim=-1).tolist()]
    return FusionEval(metrics, preds)


def _loss(model: FusionModel, out, target: torch.Tensor, mope: MoPEConfig, world: World
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The task loss of this rank's samples and the importance loss of the whole batch (eq. 5-6: noise-free,
    dense; across processes from the all-reduced expert mass, which carries the gradient back to every shard)."""
    task = (F.binary_cross_entropy_with_logits(out.logits, target) if model.multilabel
            else F.cross_entropy(out.logits, target))
    if world.size == 1:
        return task, importance_loss(out.probs, mope.importance_threshold)
    from torch.distributed.nn.functional import all_reduce

    return task, importance_of_mass(all_reduce(out.probs.sum(dim=0)), mope.importance_threshold)


def train_mope(cfg: FuseConfig, backbone: Backbone | None = None) -> RunResult:
    """Train (or resume) a MoPE fusion task; write config, metrics, split, predictions and a registry.

    Under torchrun every rank takes its shard of each batch: RandAug and the router noise are drawn for the whole
    batch on every rank (the same generator state) and each keeps its rows; the importance loss reads the
    all-reduced expert mass, weighted 1/N per rank so the summed gradients are one process's. Only rank 0 writes."""
    world, cfg = join_world(cfg)
    run = start_run(cfg, backbone, load_fusion_split, write=world.is_main)
    run_dir, config, bad, backbone, towers, root = run.run_dir, run.config, run.bad, run.backbone, run.towers, run.root
    name, task = next(iter(run.split.tasks.items()))
    multilabel = task.head == "multilabel"
    if world.is_main:
        run.write_config(task=name, head=task.head, **({"world_size": world.size} if world.size > 1 else {}))
    world.check_run(run.split.tasks, config)
    train = part_tensors(root, task.train, task.classes, backbone.preprocess, bad, multilabel, cfg.cache_dir)
    test = part_tensors(root, task.test, task.classes, backbone.preprocess, bad, multilabel, cfg.cache_dir)
    spec = complementary_spec(cfg.complementary)
    encoder = build_complementary(spec, backbone)
    psi_train, psi_test = encode_texts(encoder, train.texts), encode_texts(encoder, test.texts)
    labels_per = float(train.targets.sum(dim=1).mean()) if multilabel else None
    zero = zero_shot_metrics(towers, test, task.class_names, task.head, cfg.zero_shot_template, labels_per)
    torch.manual_seed(cfg.seed)
    model = FusionModel(cfg.mope, backbone.vision_width, backbone.vision_layers, backbone.embed_dim, encoder.dim,
                        len(task.classes), task.head).to(backbone.device)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("head.")]},
              {"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.optim.lr}]
    augment = TensorRandAugment(backbone.preprocess) if cfg.randaug else None
    world.check_batch(min(cfg.optim.batch_size, len(train)))
    loop = EpochLoop(groups, cfg.optim, [len(train)], cfg.seed,
                     checkpoint=Checkpoint(run_dir, config, {"model": model}), stop_after_epoch=cfg.stop_after_epoch,
                     eval_each_epoch=cfg.eval_each_epoch, progress=cfg.progress and world.is_main,
                     metric="f1" if multilabel else "acc", world=world)
    state = load_checkpoint(run_dir, config) if cfg.resume else None
    if state is not None:
        loop.resume(state)

    def train_epoch(epoch: Epoch) -> dict:
        model.train()
        sums = {"loss": 0.0, "task_loss": 0.0, "importance_loss": 0.0}
        seen, stats, logits_all, idx_all = 0, RoutingStats(), [], []
        for batch in epoch.batches():
            whole = batch[0]
            rows = world.rows(len(whole))
            idx = whole[rows]
            # the whole batch's RandAug draws on every rank (one generator state), this rank's rows kept
            images = train.images[idx] if augment is None else augment(train.images[whole])[rows]
            model.mope.noise_rows = None if world.size == 1 else (rows.start, rows.stop, len(whole))
            out = model(towers.image, images.to(backbone.device), psi_train[idx].to(backbone.device))
            target = train.targets[idx].to(backbone.device)
            task_loss, imp = _loss(model, out, target, cfg.mope, world)
            loss = world.share(task_loss, len(idx), len(whole)) + cfg.mope.importance_weight * imp / world.size
            epoch.optimise(loss)
            n = len(idx)
            for key, value in (("task_loss", task_loss), ("importance_loss", imp)):
                sums[key] += float(value.detach()) * n
            seen += n
            stats.add(out.probs)
            logits_all.append(out.logits.detach().float().cpu())
            idx_all.append(idx)
            step_score = scores(logits_all[-1], train.targets[idx], multilabel, cfg.threshold)
            epoch.show(float(loss.detach()), next(iter(step_score.values())), n)
        model.mope.noise_rows = None
        if world.size > 1:  # every rank's shard counted
            sums["task_loss"], sums["importance_loss"], seen = world.sum([sums["task_loss"],
                                                                          sums["importance_loss"], seen])
            stats = stats.merged(world)
            gathered = world.gather((torch.cat(logits_all), torch.cat(idx_all)))
            logits_all, idx_all = [g[0] for g in gathered], [g[1] for g in gathered]
        sums["loss"] = sums["task_loss"] + cfg.mope.importance_weight * sums["importance_loss"]
        train_scores = scores(torch.cat(logits_all), train.targets[torch.cat(idx_all)], multilabel, cfg.threshold)
        return {"epoch": epoch.number, "lr": epoch.lr, **{f"train_{k}": v / seen for k, v in sums.items()},
                **{f"train_{k}": v for k, v in train_scores.items()},
                **{f"train_{k}": v for k, v in stats.summary().items()}}

    def add_test_scores(record: dict) -> None:
        ev = evaluate_fusion(model, towers, test, psi_test, task.classes, cfg.threshold)
        record.update({f"test_{k}": v for k, v in ev.metrics.items()})

    def describe(record: dict) -> str:
        return str({k: round(v, 4) for k, v in record.items() if isinstance(v, float) and not k.endswith("importance")})

    stopped = loop.run(train_epoch, add_test_scores, describe)
    history = loop.history
    if stopped is not None:
        return RunResult.stopped(run_dir, stopped, history, count_params(model), None, bad.seen)
    ev = evaluate_fusion(model, towers, test, psi_test, task.classes, cfg.threshold)
    if not world.is_main:  # rank 0 writes the run
        return RunResult(run_dir, run_dir / "registry", {}, history, count_params(model), None, {}, bad.seen)
    return _finish(cfg, run_dir, towers, model, name, task, spec, encoder.dim, ev, zero, history, train, test, bad)


def _finish(cfg: FuseConfig, run_dir: Path, towers: Towers, model: FusionModel, name: str, task: SplitTask,
            spec: dict, psi_dim: int, ev: FusionEval, zero: dict, history: list[dict], train: PartTensors,
            test: PartTensors, bad: BadFiles) -> RunResult:
    params = count_params(model)
    metrics = {k: v for k, v in ev.metrics.items() if k != "expert_importance"}
    metrics |= {f"zero_shot_{k}": v for k, v in zero.items()}
    metrics |= {"n_train": len(train), "n_test": len(test), "complementary": spec.get("model", spec["kind"])}
    entry = TaskEntry(name, "fuse", list(task.classes), cfg.mope.to_dict(), params, head=task.head,
                      complementary=spec, psi_dim=psi_dim, threshold=cfg.threshold, metrics=metrics)
    save_registry(run_dir / "registry", Manifest(backbone_ref(towers.backbone), [], [entry]), {},
                  {name: model.state_dict()})
    write_json(run_dir / "predictions.json", {name: [{"image": it.image, "text": it.text, "label": it.label,
                                                      "predicted": p}
                                                     for it, p in zip(test.items, ev.predictions, strict=True)]})
    final = {"tasks": {name: metrics | {"expert_importance": ev.metrics["expert_importance"]}},
             "trainable_params": params}
    write_json(run_dir / "metrics.json", {"epochs": history, "final": final, "skipped_files": bad.seen})
    log(f"done: {name} {({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})}, {params} trainable "
        f"parameters; registry {run_dir / 'registry'}")
    return RunResult(run_dir, run_dir / "registry", final, history, params, None, {name: ev.predictions}, bad.seen)
