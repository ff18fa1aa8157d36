"""`mmserve-train add-task`: one new classification task joins a trained registry without retraining the others.

1. The newcomer's gradient on the grouping run's global shared prompt (the registry's grouping record), averaged
   as the record's tasks' were (training.grouping.task_gradients).
2. Its gain for every group under the score the joint grouping maximises (training.grouping.join_gains: the
   centred partition score over every task, the newcomer included); it joins the group with the largest gain, or a
   group of its own when none gains (`--group auto`); `--group NAME` / `--group new` force the choice.
3. Only its task-specific prompt trains, its group's shared prompt frozen (a new group trains its own group prompt),
   through the one training loop; it is evaluated on its split's test part.
4. The run dir gets config, split, metrics, predictions and a registry of the task and its group; the registry R
   gets a new version with the task (a directory: save_registry; a store: mmserve.versions.add_tasks), every other
   task's and group's weights unchanged. The chosen group and every gain are printed and kept in the task's metrics.

Every input is checked before anything trains or is written: the backbone's fingerprint, the task name, the class
folders, and (auto) the grouping record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from mmserve.backbone import Backbone
from mmserve.builders import ClassifyPrompts, classify_prompt_module
from mmserve.errors import RegistryError
from mmserve.prompts import count_params
from mmserve.registry import (
    DEFAULT_TEMPLATE,
    GroupEntry,
    Manifest,
    TaskEntry,
    grouping_ref,
    read_registry,
    save_registry,
)
from mmserve.store import Store
from mmserve.versions import add_tasks, current
from training.classify import Towers
from training.config import RUN, BackboneConfig, OptimConfig, SplitConfig, reuse_or_load
from training.data import BadFiles, discover_image_tasks
from training.distributed import World, join_world
from training.grouping import GroupingRecord, join_gains, task_gradients
from training.loop import Epoch, EpochLoop
from training.mmap_trainer import task_data
from training.multitask import TaskData, evaluate_task, multitask_step
from training.options import option
from training.progress import log
from training.runs import backbone_ref, to_jsonable, write_json
from training.splits import classify_split, reuse_or_draw, write_split
from training.zeroshot import zero_shot_metrics

AUTO, NEW = "auto", "new"


@dataclass
class AddTaskConfig:
    """One task added to a trained registry (a directory or a store); saved as config.json in the run dir."""

    registry: str = option(help="the registry directory or store (path or s3://) the task joins")
    root: str = option(help="image-folder root ROOT/<task>/<class>/<image>")
    task: str = option(help="the task folder under --root: the new task's name")
    group: str = option(AUTO, help="auto (the group its gradients agree with, or a new one), new, or a group name")
    replace: bool = option(False, help="replace a task of the same name")
    run_dir: str = option("runs/add-task", RUN["run_dir"])
    split_file: str | None = option(None, RUN["split_file"])
    class_names_file: str | None = option(None, flag="--class-names", help="JSON mapping class folder -> prompt name")
    template: str | None = option(None, help="class prompt (default: its group's tasks' template)")
    zero_shot_template: str = option(DEFAULT_TEMPLATE)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(""))  # model "": the registry's
    split: SplitConfig = field(default_factory=SplitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    on_bad_file: str = option("skip", RUN["on_bad_file"])
    seed: int = option(0, RUN["seed"])
    cache_dir: str | None = option(None, RUN["cache_dir"])
    progress: bool = option(True, RUN["progress"])
    eval_each_epoch: bool = option(True, RUN["eval_each_epoch"])


@dataclass
class AddTaskResult:
    """What add-task did: the group joined, every gain, the task's final metrics, the new version of R."""

    run_dir: Path
    group: str
    new_group: bool
    gains: dict[str, float] | None
    metrics: dict
    version: str  # R's new version (a torchrun rank other than 0: the version it started from)
    history: list[dict] = field(default_factory=list)
    written: bool = True  # False on a torchrun rank other than 0, which writes nothing


@dataclass
class _Target:
    """The registry R as read: where it is, its manifest, and whether it is a store (else a directory)."""

    store: Store
    manifest: Manifest
    where: str

    @property
    def is_store(self) -> bool:
        return not self.store.legacy

    def tensors(self, rel: str, sha: str, what: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.store.weights_bytes(rel, sha, what))


def open_target(path: str) -> _Target:
    """R: a registry directory (manifest.json) or a store (HEAD.json); RegistryError naming it otherwise."""
    store = Store.open(path)
    if not store.legacy and store.head() is None:
        raise RegistryError(f"{path}: not a registry (no manifest.json) nor a store (no HEAD.json)")
    manifest = current(store)
    return _Target(store, manifest, store.manifest_where(manifest.version))


def _check_backbone(target: _Target, backbone: Backbone) -> None:
    ref = target.manifest.backbone
    if backbone.fingerprint != ref.fingerprint:
        raise RegistryError(f"{target.where}: backbone.fingerprint: the registry was trained on {ref.model} "
                            f"({ref.fingerprint}), this backbone is {backbone.spec.model} ({backbone.fingerprint}); "
                            f"pass the registry's --model / --pretrained")


def _backbone_config(cfg: AddTaskConfig, target: _Target) -> BackboneConfig:
    """The registry's backbone unless the options name one (model None = the registry's)."""
    ref = target.manifest.backbone
    if cfg.backbone.model:
        return cfg.backbone
    pretrained = cfg.backbone.pretrained if cfg.backbone.pretrained is not None else (ref.pretrained or "none")
    return replace(cfg.backbone, model=ref.model, pretrained=pretrained)


class _NoEmptyClass(BadFiles):
    """BadFiles that refuses a class folder without a readable image: the task's classes would silently shrink."""

    def report(self, path: str | Path, reason: str) -> None:
        """Refuse an empty class folder; anything else as the policy says."""
        if reason.startswith("empty class"):
            raise ValueError(f"{path}: a class folder without a readable image (add images or remove the folder)")
        super().report(path, reason)


def _discover(cfg: AddTaskConfig, bad: BadFiles):
    """The newcomer's classes and images; a class folder without a readable image is refused."""
    checked = _NoEmptyClass(bad.policy, bad.seen)
    return discover_image_tasks(cfg.root, checked, [cfg.task], cfg.class_names_file)


def _records(target: _Target) -> dict[str, GroupingRecord | None]:
    """Every group's grouping record (None for a group without one)."""
    out: dict[str, GroupingRecord | None] = {}
    for g in target.manifest.groups:
        ref = grouping_ref(g, target.where)
        out[g.name] = None if ref is None else GroupingRecord.from_tensors(
            ref, target.tensors(ref.weights, ref.sha256, f"groups[{g.name}].grouping"))
    return out


def _candidates(target: _Target, name: str) -> dict[str, list[str]]:
    """Each group's tasks other than `name` (a task being replaced); groups it alone made go."""
    out = {g.name: [t for t in g.tasks if t != name] for g in target.manifest.groups}
    return {g: members for g, members in out.items() if members}


def _common_record(target: _Target, records: dict[str, GroupingRecord | None], groups: dict[str, list[str]]
                   ) -> tuple[GroupingRecord | None, str]:
    """One record holding every candidate group's tasks' gradients on one global prompt, or None and why not."""
    how = (f"train the registry with --grouping auto (rerun the grouping), or pass --group NAME "
           f"(one of {sorted(groups)}) or --group new")
    if not groups:
        return None, f"{target.where}: groups: the registry has no task groups; pass --group new"
    missing = [g for g in groups if records.get(g) is None]
    if missing:
        return None, f"{target.where}: groups{missing}.grouping: no grouping record; {how}"
    first = records[next(iter(groups))]
    assert first is not None
    merged = replace(first, gradients={})
    for g, members in groups.items():
        rec = records[g]
        assert rec is not None
        if not rec.same_prompt(first) or (rec.similarity, rec.center) != (first.similarity, first.center):
            return None, (f"{target.where}: groups[{g}].grouping: a record of another grouping run than "
                          f"groups[{next(iter(groups))}]'s; {how}")
        lacking = [t for t in members if t not in rec.gradients]
        if lacking:
            return None, f"{target.where}: groups[{g}].grouping: no gradient of task(s) {lacking}; {how}"
        merged.gradients |= {t: rec.gradients[t] for t in members}
    return merged, ""


def _free_group_name(manifest: Manifest) -> str:
    taken = {g.name for g in manifest.groups}
    return next(f"group{i}" for i in range(len(taken) + 1) if f"group{i}" not in taken)


def _task_config(target: _Target, group: GroupEntry | None, record: GroupingRecord | None) -> dict:
    """The newcomer's prompt config: its group's, else the record's, else another classify task's."""
    if group is not None:
        return dict(group.prompt_config)
    if record is not None:
        return dict(record.prompt_config)
    for t in target.manifest.tasks:
        if t.kind == "classify":
            return dict(t.prompt_config)
    raise RegistryError(f"{target.where}: tasks: no classification task to take a prompt config from")


def _template(cfg: AddTaskConfig, target: _Target, group: GroupEntry | None, record: GroupingRecord | None) -> str:
    if cfg.template is not None:
        return cfg.template
    if group is not None:
        return target.manifest.task(group.tasks[0]).template
    if record is not None and record.template:
        return record.template
    return next((t.template for t in target.manifest.tasks if t.kind == "classify"), DEFAULT_TEMPLATE)


def _choose(cfg: AddTaskConfig, gains: dict[str, float] | None, target: _Target) -> tuple[str | None, str]:
    """(the group joined, None for a new one; how it was chosen)."""
    if cfg.group == NEW:
        return None, "forced new"
    if cfg.group != AUTO:
        return cfg.group, "forced"
    assert gains is not None
    best = max(gains, key=lambda g: (gains[g], g), default=None)
    if best is None or gains[best] <= 1e-12:
        return None, "auto: no group gains"
    return best, "auto"


def _train(cfg: AddTaskConfig, towers: Towers, data: TaskData, prompts: ClassifyPrompts, template: str,
           world: World) -> list[dict]:
    """The newcomer's epochs: only its own prompt (and a new group's) trains; under torchrun each rank takes its
    shard of every batch and the gradients are summed (training.distributed)."""
    params = [p for p in prompts.parameters() if p.requires_grad]
    loop = EpochLoop(params, cfg.optim, [len(data.train)], cfg.seed, eval_each_epoch=cfg.eval_each_epoch,
                     progress=cfg.progress and world.is_main, world=world)

    def train_epoch(epoch: Epoch) -> dict:
        loss_sum = correct = seen = 0.0
        for batch in epoch.batches():
            local = world.shard(batch[0])
            out = multitask_step(towers, [data], [prompts()], [local], template)
            epoch.optimise(world.share(out.losses[0], len(local), len(batch[0])))
            loss_sum += float(out.losses[0].detach()) * out.counts[0]
            correct, seen = correct + out.correct[0], seen + out.counts[0]
            epoch.show(float(out.losses[0].detach()), out.correct[0] / out.counts[0], out.counts[0])
        loss_sum, correct, seen = world.sum([loss_sum, correct, seen])  # every rank's shard counted
        return {"epoch": epoch.number, "lr": epoch.lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}

    def evaluate(record: dict) -> None:
        prompts.eval()
        with torch.no_grad():
            record["test_accuracy"], _ = evaluate_task(towers, data, prompts(), template)
        prompts.train()

    loop.run(train_epoch, evaluate, lambda r: f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.3f}"
             + (f", test acc {r['test_accuracy']:.3f}" if "test_accuracy" in r else ""))
    return loop.history


def add_task(cfg: AddTaskConfig, backbone: Backbone | None = None) -> AddTaskResult:
    """Add one task to registry `cfg.registry` as a new version; see the module docstring."""
    if cfg.group in ("", None):
        raise ValueError("--group: give auto, new or a group name")
    target = open_target(cfg.registry)
    manifest = target.manifest
    names = [t.name for t in manifest.tasks]
    if cfg.task in names and not cfg.replace:
        raise RegistryError(f"{target.where}: tasks[{cfg.task}]: a task of this name exists; pass --replace to "
                            f"replace it")
    groups = _candidates(target, cfg.task)
    if cfg.group not in (AUTO, NEW) and cfg.group not in groups:
        raise RegistryError(f"{target.where}: groups: no group '{cfg.group}' to join; it has {sorted(groups)} "
                            f"(or pass --group new / auto)")
    records = _records(target)
    common, why = _common_record(target, records, groups)
    if cfg.group == AUTO and common is None:
        raise RegistryError(why)
    # the newcomer's gradient is taken on the common record's prompt; forced into a group without one, on that
    # group's record when it has one (so its record gains the newcomer's gradient)
    forced = records.get(cfg.group) if cfg.group not in (AUTO, NEW) else None
    probe = common if common is not None else forced

    world, cfg = join_world(cfg)
    bb_cfg = _backbone_config(cfg, target)
    backbone = reuse_or_load(backbone, bb_cfg)
    _check_backbone(target, backbone)
    bad = BadFiles(cfg.on_bad_file)
    run_dir = Path(cfg.run_dir)

    def draw():
        return classify_split(cfg.root, _discover(cfg, bad), cfg.split)

    split = reuse_or_draw(cfg.split_file, run_dir, False, draw)
    if list(split.tasks) != [cfg.task]:
        raise ValueError(f"{cfg.split_file}: the split must hold exactly task {cfg.task!r}, it has "
                         f"{sorted(split.tasks)}")
    towers = Towers.of(backbone)
    (data,) = task_data(towers, split, cfg.root or split.root, bad, cfg.cache_dir)
    world.check_run(split.tasks, to_jsonable(cfg), registry=manifest.version)
    world.check_batch(min(cfg.optim.batch_size, len(data.train)))

    gradient, gains = None, None
    if probe is not None:
        gradient = task_gradients(towers, [data], probe.prompt_config, probe.prompt, probe.batches,
                                  probe.batch_size, probe.template, probe.seed, world)[data.name]
    if common is not None and gradient is not None:
        gains = join_gains(common, groups, data.name, gradient)
        for g, gain in gains.items():
            if world.is_main:
                log(f"gain of joining {g} ({', '.join(groups[g])}): {gain:+.6g}")
    chosen, how = _choose(cfg, gains, target)
    new_group = chosen is None
    group_entry = None if new_group else manifest.group(chosen)
    group_name = _free_group_name(manifest) if new_group else chosen
    if world.is_main:
        log(f"{cfg.task} joins {'a new group ' if new_group else ''}{group_name} ({how})")

    config = _task_config(target, group_entry, probe)
    template = _template(cfg, target, group_entry, probe)
    torch.manual_seed(cfg.seed)
    group_module = classify_prompt_module(config, backbone)
    if group_entry is not None:
        group_module.load_state_dict(target.tensors(group_entry.weights, group_entry.sha256,
                                                    f"groups[{group_name}]"))
        group_module.requires_grad_(False)
    prompts = ClassifyPrompts(classify_prompt_module(config, backbone), group_module).to(backbone.device)
    zero = zero_shot_metrics(towers, data.test, data.class_names, "multiclass", cfg.zero_shot_template)["accuracy"]
    history = _train(cfg, towers, data, prompts, template, world)
    prompts.eval()
    with torch.no_grad():
        accuracy, preds = evaluate_task(towers, data, prompts(), template)

    joined = {"group": group_name, "new_group": new_group, "choice": how, "gains": gains,
              "group_tasks": [] if new_group else groups.get(group_name, [])}
    metrics = {"accuracy": accuracy, "zero_shot_accuracy": zero, "n_train": len(data.train),
               "n_test": len(data.test), "shots": split.config.shots, "split_seed": split.config.seed,
               "prompt": config.get("type"), "sharing": "group+task", "params_used": count_params(prompts),
               "added_to": manifest.version, "joined": joined}
    if not world.is_main:  # under torchrun rank 0 writes the run and R's new version
        return AddTaskResult(run_dir, group_name, new_group, gains, metrics, manifest.version, history, False)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_split(run_dir / "split.json", split)
    record = None
    if gradient is not None:  # the joined group's record gains the newcomer's gradient
        base = probe if new_group else (records.get(group_name) or probe)
        assert base is not None
        members = [] if new_group else groups[group_name]
        kept = {t: base.gradients[t] for t in members if t in base.gradients}
        record = replace(base, gradients={**kept, data.name: gradient})
    entry = TaskEntry(cfg.task, "classify", list(data.class_names), dict(config), count_params(prompts.task),
                      template=template, group=group_name, metrics=metrics)
    group_weights = {k: v.detach().cpu() for k, v in group_module.state_dict().items()}
    run_group = GroupEntry(group_name, [cfg.task], dict(config), count_params(group_module),
                           grouping=record.ref() if record is not None else None)
    run_manifest = Manifest(backbone_ref(backbone), [run_group], [entry])
    task_weights = {k: v.detach().cpu() for k, v in prompts.task.state_dict().items()}
    records_out = {group_name: record.tensors()} if record is not None else None
    save_registry(run_dir / "registry", run_manifest, {group_name: group_weights}, {cfg.task: task_weights},
                  records_out)
    write_json(run_dir / "config.json", to_jsonable(cfg) | {"backbone_fingerprint": backbone.fingerprint,
                                                            "split": to_jsonable(split.config)})
    write_json(run_dir / "metrics.json", {"epochs": history, "final": {"tasks": {cfg.task: metrics}},
                                          "skipped_files": bad.seen})
    write_json(run_dir / "predictions.json", {cfg.task: [
        {"image": it.image, "label": it.label, "label_name": data.class_names[data.classes.index(it.label)],
         "predicted": data.class_names[p]} for it, p in zip(data.test.items, preds, strict=True)]})
    version = _commit(cfg, target, run_dir / "registry", entry, run_group, group_weights, task_weights, record)
    log(f"done: {cfg.task} test accuracy {accuracy:.4f} (zero-shot {zero:.4f}) in group {group_name}; "
        f"{cfg.registry} is at version {version}")
    return AddTaskResult(run_dir, group_name, new_group, gains, metrics, version, history)


def _commit(cfg: AddTaskConfig, target: _Target, run_registry: Path, entry: TaskEntry, group: GroupEntry,
            group_weights: dict, task_weights: dict, record: GroupingRecord | None) -> str:
    """R's new version: a store through mmserve.versions.add_tasks; a directory rewritten by save_registry (every
    unchanged file the same bytes, the manifest replaced last)."""
    if target.is_store:
        return add_tasks(target.store, run_registry, [entry.name], expected=target.manifest.version).version
    reg = read_registry(target.store.url)  # every weights file checked against its sha256
    manifest = copy.deepcopy(reg.manifest)
    manifest.tasks = [t for t in manifest.tasks if t.name != entry.name]
    for g in manifest.groups:
        g.tasks = [t for t in g.tasks if t != entry.name]
    manifest.groups = [g for g in manifest.groups if g.tasks]
    groups_w = {g.name: reg.group_weights[g.name] for g in manifest.groups}
    records: dict[str, dict[str, torch.Tensor]] = {}
    for g in manifest.groups:
        ref = grouping_ref(g, target.where)
        if ref is not None:
            records[g.name] = target.tensors(ref.weights, ref.sha256, f"groups[{g.name}].grouping")
    joined = next((g for g in manifest.groups if g.name == group.name), None)
    if joined is None:
        joined = replace(group, tasks=[])
        manifest.groups.append(joined)
        groups_w[group.name] = group_weights
    joined.tasks.append(entry.name)
    if record is not None:
        joined.grouping = record.ref()
        records[group.name] = record.tensors()
    manifest.tasks.append(entry)
    tasks_w = {t.name: reg.task_weights[t.name] for t in manifest.tasks if t.name != entry.name}
    tasks_w[entry.name] = task_weights
    return save_registry(target.store.url, manifest, groups_w, tasks_w, records).version
