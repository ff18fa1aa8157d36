"""Multi-task prompt training: group-shared + task-specific MmAP (eq. 9-12) and its ablations.

Each task's prompts are concat(group-shared, task-specific) per layer (builders.ClassifyPrompts). One step
sums every task's cross-entropy: a group-shared prompt thus gets the sum of its tasks' gradients (eq. 11),
a task-specific prompt only its own task's (eq. 12); groups are disjoint, so one optimiser serves them all.

Ablations (PromptSpec):
- kind 'text': CoOp/MaPLe-style deep text prompts only (DeepPromptConfig(tower='text'));
- kind 'vision': VPT-deep visual prompts only (DeepPromptConfig(tower='vision')).
  Budget match: the same number of prompt tokens per layer (n_tokens) at the same depth and in the same
  group/task positions as the MmAP they replace. The parameter counts then differ (MmAP factorises its tokens
  through Kronecker products: K*(m*n + (b/m)*(d_l/n + d_v/n)) versus K*b*d for one tower), so every run reports
  its trainable parameters (per task, per group, and in total) next to its accuracy.
- sharing 'task': task-specific prompts only, every task alone (no grouping);
- sharing 'group': group-shared prompts only; each task entry then stores its group's prompt as its own
  (the registry has no prompt-free task entry), and `shared_with` in its metrics names the group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmserve.backbone import Backbone
from mmserve.builders import ClassifyPrompts
from mmserve.prompts import build_prompt, config_for_choice, count_params, prompt_choices
from mmserve.registry import DEFAULT_TEMPLATE, GroupEntry, Manifest, TaskEntry, save_registry
from training.classify import Towers
from training.config import RUN, BackboneConfig, OptimConfig, SplitConfig
from training.data import BadFiles, discover_image_tasks
from training.distributed import World, join_world
from training.grouping import (
    RECORD_BATCHES,
    Affinity,
    GroupingConfig,
    GroupingRecord,
    choose_groups,
    task_affinity,
    task_gradients,
)
from training.loop import Checkpoint, Epoch, EpochLoop
from training.multitask import TaskData, evaluate_task, multitask_step
from training.options import comma_list, option
from training.progress import log
from training.runs import RunResult, backbone_ref, load_checkpoint, start_run, write_json
from training.splits import Split, classify_split, reuse_or_draw
from training.tensors import part_tensors
from training.zeroshot import zero_shot_metrics

SHARING = ("group+task", "task", "group")


@dataclass
class PromptSpec:
    """Prompt kind (a registered --prompt choice: mmap, text, vision, ...), sharing and the size of each prompt."""

    kind: str = option("mmap", flag="--prompt", choices=prompt_choices,
                       help="a registered prompt method: mmap, or the text-only (CoOp/MaPLe) / visual-only "
                            "(VPT-deep) ablation, or any method registered with mmserve.prompts.register_method")
    sharing: str = option("group+task", choices=SHARING,
                          help="group-shared + task-specific prompts, task-specific only, or group-shared only")
    # b, group-shared and task-specific alike
    n_tokens: int = option(4, help="prompt tokens per layer of each prompt (b)")
    source_rows: int = option(2, help="MmAP m")
    source_cols: int = option(8, help="MmAP n")
    depth: int | None = option(None, help="prompted layers (default all)")
    init_std: float = 0.02

    def module_config(self):
        """The config of every prompt module of the run: the registered method `kind` names, its fields filled
        from this spec's fields of the same name (mmserve.prompts.table.config_for_choice)."""
        if self.kind not in prompt_choices():
            raise ValueError(f"prompt kind must be one of {tuple(prompt_choices())}, got {self.kind!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        return config_for_choice(self.kind, asdict(self))


@dataclass
class MultiTaskConfig:
    """Everything a multi-task classification run needs; saved as config.json in the run dir."""

    # ROOT/<task>/<class>/<image>
    root: str | None = option(None, help="image-folder root (optional when --split exists)")
    run_dir: str = option("runs/classify", RUN["run_dir"])
    tasks: list[str] | None = option(None, type=comma_list, help="comma-separated subset of tasks")  # None = all
    # reused when it exists, else the drawn split is also written there
    split_file: str | None = option(None, RUN["split_file"])
    class_names_file: str | None = option(None, flag="--class-names", help="JSON mapping class folder -> prompt name")
    # text after the prompt placeholders, with the class name
    template: str = option(DEFAULT_TEMPLATE, help="class prompt after the prompt tokens")
    zero_shot_template: str = option(DEFAULT_TEMPLATE)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    on_bad_file: str = option("skip", RUN["on_bad_file"])
    seed: int = option(0, RUN["seed"])
    cache_dir: str | None = option(None, RUN["cache_dir"])
    progress: bool = option(True, RUN["progress"])
    resume: bool = option(False, RUN["resume"])  # from run_dir/checkpoint.pt when it is there
    stop_after_epoch: int | None = option(None, RUN["stop_after_epoch"])  # with a checkpoint (time-boxed jobs)
    eval_each_epoch: bool = option(True, RUN["eval_each_epoch"])


class PromptBank(nn.Module):
    """The trainable prompts of a run: one module per group and/or per task, as `sharing` says."""

    def __init__(self, names: list[str], groups: list[list[str]] | None, spec: PromptSpec, backbone):
        super().__init__()
        config = spec.module_config()
        self.config = config
        self.names = list(names)
        self.sharing = spec.sharing

        def build() -> nn.Module:
            return build_prompt(config, backbone.text_width, backbone.vision_width, backbone.text_layers,
                                backbone.vision_layers)

        use_groups = spec.sharing in ("group+task", "group")
        self.groups = [list(g) for g in groups] if use_groups and groups else []
        if use_groups and not self.groups:
            raise ValueError(f"sharing '{spec.sharing}' needs task groups")
        self.group_names = [f"group{i}" for i in range(len(self.groups))]
        self.group_index = {t: i for i, g in enumerate(self.groups) for t in g}
        self.group_modules = nn.ModuleList([build() for _ in self.groups])
        self.task_modules = nn.ModuleList([build() for _ in names] if spec.sharing != "group" else [])

    def composed(self, i: int) -> ClassifyPrompts:
        """Task i's prompts as the registry will rebuild them (group then task, per layer)."""
        group = self.group_modules[self.group_index[self.names[i]]] if self.group_modules else None
        if not self.task_modules:
            return ClassifyPrompts(group)  # group-only: the group's prompt is the task's
        return ClassifyPrompts(self.task_modules[i], group)

    def all_prompts(self) -> list:
        """TowerPrompts of every task, in task order."""
        return [self.composed(i)() for i in range(len(self.names))]

    def params_used(self, i: int) -> int:
        """Trainable parameters that shape task i's prompts (its own plus its group's)."""
        return count_params(self.composed(i))


def load_or_draw_split(cfg: MultiTaskConfig, bad: BadFiles) -> tuple[Split, str]:
    """Reuse cfg.split_file when it exists; otherwise discover the tasks and draw (and save) a split."""
    def draw() -> Split:
        if not cfg.root:
            raise ValueError("a data root is needed to draw a split (or pass an existing split file)")
        return classify_split(cfg.root, discover_image_tasks(cfg.root, bad, cfg.tasks, cfg.class_names_file),
                              cfg.split)

    split = reuse_or_draw(cfg.split_file, cfg.run_dir, cfg.resume, draw)
    if split.kind != "classify":
        path = Path(cfg.split_file) if cfg.split_file else None
        raise ValueError(f"split {path} is a '{split.kind}' split; classification needs a 'classify' split")
    if cfg.tasks:
        missing = [t for t in cfg.tasks if t not in split.tasks]
        if missing:
            raise ValueError(f"task(s) {missing} not in the split (it has {sorted(split.tasks)})")
        split.tasks = {t: split.tasks[t] for t in cfg.tasks}
    return split, cfg.root or split.root


def task_data(towers: Towers, split: Split, root: str, bad: BadFiles, cache_dir: str | None) -> list[TaskData]:
    """Tensors of every task's train and test parts."""
    out = []
    for name, t in split.tasks.items():
        pre = towers.backbone.preprocess
        train = part_tensors(root, t.train, t.classes, pre, bad, cache_dir=cache_dir)
        test = part_tensors(root, t.test, t.classes, pre, bad, cache_dir=cache_dir)
        out.append(TaskData(name, t.classes, t.class_names, train, test))
    return out


def _groups(cfg: MultiTaskConfig, towers: Towers, tasks: list[TaskData], world: World | None = None
            ) -> tuple[list[list[str]] | None, dict, GroupingRecord | None]:
    """The run's groups, how they were chosen, and (grouping 'auto') the grouping record kept in the registry."""
    if cfg.prompt.sharing == "task":
        return None, {}, None
    names = [t.name for t in tasks]
    affinity = None
    if cfg.grouping.mode == "auto" and len(tasks) > 1:
        affinity = task_affinity(towers, tasks, cfg.prompt.module_config(), cfg.grouping,
                                 cfg.grouping.lr or cfg.optim.lr, cfg.grouping.batch_size or cfg.optim.batch_size,
                                 cfg.template, cfg.seed, cfg.progress and (world or World()).is_main, world)
    if cfg.grouping.mode == "auto" and len(tasks) == 1:
        return [names], {"mode": "auto", "groups": [names], "note": "one task"}, None
    groups, info = choose_groups(cfg.grouping, names, affinity, cfg.seed)
    log(f"groups: {groups}")
    return groups, info, None if affinity is None else grouping_record(cfg, towers, tasks, affinity, world)


def grouping_record(cfg: MultiTaskConfig, towers: Towers, tasks: list[TaskData], affinity: Affinity,
                    world: World | None = None) -> GroupingRecord:
    """The grouping record of an 'auto' grouping: its global shared prompt and every task's averaged gradient."""
    config = cfg.prompt.module_config().to_dict()
    batch_size = cfg.grouping.batch_size or cfg.optim.batch_size
    assert affinity.prompt is not None
    grads = task_gradients(towers, tasks, config, affinity.prompt, RECORD_BATCHES, batch_size, cfg.template, cfg.seed,
                           world)
    return GroupingRecord(config, affinity.prompt, grads, cfg.grouping.similarity, cfg.grouping.center, batch_size,
                          RECORD_BATCHES, cfg.template, cfg.seed)


def _evaluate(towers: Towers, bank: PromptBank, tasks: list[TaskData], template: str
              ) -> tuple[dict[str, float], dict[str, list[int]]]:
    bank.eval()
    accs, preds = {}, {}
    with torch.no_grad():
        for i, t in enumerate(tasks):
            accs[t.name], preds[t.name] = evaluate_task(towers, t, bank.composed(i)(), template)
    bank.train()
    return accs, preds


def _save_registry(run_dir: Path, towers: Towers, bank: PromptBank, tasks: list[TaskData], final: dict,
                   record: GroupingRecord | None = None):
    cfg_dict = bank.config.to_dict()
    keep = record is not None and bool(bank.task_modules)  # a group-only registry stores no groups
    groups = [GroupEntry(name, list(members), cfg_dict, count_params(module),
                         grouping=record.ref() if keep and record is not None else None)
              for name, members, module in zip(bank.group_names, bank.groups, bank.group_modules, strict=True)]
    records = {e.name: record.tensors(e.tasks) for e in groups} if keep and record is not None else None
    group_weights = {}
    if bank.task_modules:
        group_weights = {e.name: m.state_dict() for e, m in zip(groups, bank.group_modules, strict=True)}
    entries, weights = [], {}
    for i, t in enumerate(tasks):
        composed = bank.composed(i)
        own = composed.task
        group = bank.group_names[bank.group_index[t.name]] if bank.group_modules else None
        metrics = dict(final[t.name])
        if not bank.task_modules:
            metrics["shared_with"] = bank.groups[bank.group_index[t.name]]
        entries.append(TaskEntry(t.name, "classify", list(t.class_names), cfg_dict, count_params(own),
                                 template=final["template"], group=group if bank.task_modules else None,
                                 metrics=metrics))
        weights[t.name] = own.state_dict()
    manifest = Manifest(backbone_ref(towers.backbone), groups if bank.task_modules else [], entries)
    return save_registry(run_dir / "registry", manifest, group_weights, weights, records)


def train_multitask(cfg: MultiTaskConfig, backbone: Backbone | None = None) -> RunResult:
    """Train (or resume) a multi-task classification run; write config, metrics, split, grouping and registry.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its shard of each batch (training.distributed) and
    only rank 0 writes."""
    world, cfg = join_world(cfg)
    run = start_run(cfg, backbone, load_or_draw_split, write=world.is_main)
    if world.is_main:
        run.write_config(data_root=run.root, **({"world_size": world.size} if world.size > 1 else {}))
    run_dir, config, bad, backbone, towers = run.run_dir, run.config, run.bad, run.backbone, run.towers
    tasks = task_data(towers, run.split, run.root, bad, cfg.cache_dir)
    world.check_run(run.split.tasks, config)
    world.check_batch(min([cfg.optim.batch_size, cfg.grouping.batch_size or cfg.optim.batch_size]
                          + [len(t.train) for t in tasks]))
    zero = {t.name: zero_shot_metrics(towers, t.test, t.class_names, "multiclass", cfg.zero_shot_template)["accuracy"]
            for t in tasks}
    state = load_checkpoint(run_dir, config) if cfg.resume else None
    if state is not None:
        groups, grouping = state["groups"], state["grouping"]
        record = state.get("record")  # checkpoints before the grouping record have none
    else:
        groups, grouping, record = _groups(cfg, towers, tasks, world)
    if grouping and world.is_main:
        write_json(run_dir / "grouping.json", grouping)
    torch.manual_seed(cfg.seed)
    bank = PromptBank([t.name for t in tasks], groups, cfg.prompt, backbone).to(backbone.device)
    loop = EpochLoop([p for p in bank.parameters() if p.requires_grad], cfg.optim, [len(t.train) for t in tasks],
                     cfg.seed, checkpoint=Checkpoint(run_dir, config, {"bank": bank},
                                                     {"groups": groups, "grouping": grouping,
                                                      "record": record}),
                     stop_after_epoch=cfg.stop_after_epoch, eval_each_epoch=cfg.eval_each_epoch,
                     progress=cfg.progress and world.is_main, world=world)
    if state is not None:
        loop.resume(state)

    def train_epoch(epoch: Epoch) -> dict:
        loss_sum = [0.0] * len(tasks)
        correct = [0] * len(tasks)
        seen = [0] * len(tasks)
        for batch in epoch.batches():
            local = [world.shard(b) for b in batch]
            out = multitask_step(towers, tasks, bank.all_prompts(), local, cfg.template)
            loss = torch.stack([world.share(x, len(lo), len(b))
                                for x, lo, b in zip(out.losses, local, batch, strict=True)]).sum()
            epoch.optimise(loss)
            for i in range(len(tasks)):
                loss_sum[i] += float(out.losses[i].detach()) * out.counts[i]
                correct[i] += out.correct[i]
                seen[i] += out.counts[i]
            epoch.show(float(loss.detach()) / len(tasks), sum(out.correct) / sum(out.counts), sum(out.counts))
        if world.size > 1:  # the whole batches' statistics, every rank's shard counted
            n = len(tasks)
            summed = world.sum(loss_sum + correct + seen)
            loss_sum, correct, seen = summed[:n], summed[n:2 * n], summed[2 * n:]
        return {"epoch": epoch.number, "lr": epoch.lr, "train_loss": sum(loss_sum) / sum(seen),
                "train_accuracy": sum(correct) / sum(seen),
                "tasks": {t.name: {"train_loss": loss_sum[i] / seen[i], "train_accuracy": correct[i] / seen[i]}
                          for i, t in enumerate(tasks)}}

    def add_test_accuracy(record: dict) -> None:
        accs, _ = _evaluate(towers, bank, tasks, cfg.template)
        for name, acc in accs.items():
            record["tasks"][name]["test_accuracy"] = acc
        record["test_accuracy_mean"] = sum(accs.values()) / len(accs)

    def describe(record: dict) -> str:
        return (f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f}"
                + (f", test acc {record['test_accuracy_mean']:.3f}" if "test_accuracy_mean" in record else ""))

    stopped = loop.run(train_epoch, add_test_accuracy, describe)
    history = loop.history
    if stopped is not None:
        return RunResult.stopped(run_dir, stopped, history, count_params(bank), groups, bad.seen)
    return _finish(cfg, run_dir, towers, bank, tasks, zero, history, groups, bad, run.split.config, record,
                   world.is_main)


def _finish(cfg: MultiTaskConfig, run_dir: Path, towers: Towers, bank: PromptBank, tasks: list[TaskData],
            zero: dict[str, float], history: list[dict], groups, bad: BadFiles, drawn: SplitConfig,
            record: GroupingRecord | None = None, write: bool = True) -> RunResult:
    accs, preds = _evaluate(towers, bank, tasks, cfg.template)
    final: dict = {"template": cfg.template}
    for i, t in enumerate(tasks):
        final[t.name] = {"accuracy": accs[t.name], "zero_shot_accuracy": zero[t.name], "n_train": len(t.train),
                         "n_test": len(t.test), "shots": drawn.shots, "split_seed": drawn.seed,
                         "prompt": cfg.prompt.kind, "sharing": cfg.prompt.sharing,
                         "params_used": bank.params_used(i)}
    total = count_params(bank)
    summary = {"accuracy_mean": sum(accs.values()) / len(accs),
               "zero_shot_accuracy_mean": sum(zero.values()) / len(zero), "trainable_params": total, "groups": groups}
    names = {t.name: [t.class_names[k] for k in preds[t.name]] for t in tasks}
    tasks_final = {k: v for k, v in final.items() if k != "template"}
    if not write:  # another rank than 0 of a torchrun world: rank 0 writes the run
        return RunResult(run_dir, run_dir / "registry", {"tasks": tasks_final, **summary}, history, total, groups,
                         names, bad.seen)
    _save_registry(run_dir, towers, bank, tasks, final, record)
    write_json(run_dir / "predictions.json", {
        t.name: [{"image": it.image, "label": it.label, "label_name": t.class_names[t.classes.index(it.label)],
                  "predicted": p} for it, p in zip(t.test.items, names[t.name], strict=True)]
        for t in tasks})
    write_json(run_dir / "metrics.json", {"epochs": history, "final": {"tasks": tasks_final, **summary},
                                          "skipped_files": bad.seen})
    log(f"done: mean test accuracy {summary['accuracy_mean']:.4f} (zero-shot {summary['zero_shot_accuracy_mean']:.4f}),"
        f" {total} trainable parameters; registry {run_dir / 'registry'}")
    return RunResult(run_dir, run_dir / "registry", {"tasks": tasks_final, **summary}, history, total, groups,
                     names, bad.seen)
