"""Leave one out: each emoji style added alone (add-task) to the joint registry of the other four, against the
joint run of all five.

    mmserve-train leave-one-out --cache ~/.cache/mmserve --pretrained CKPT --out docs/leave-one-out --seeds 0 1 2

Per seed, on the results table's split (the same k-shot train draw and held-out test identities):
- the joint run of all five styles (auto grouping, the recipe below): each style's accuracy and group;
- for each style S, the joint run of the other four, then `add_task` of S into (a copy of) its registry with
  `--group auto` and the same recipe: S's accuracy, the group it joins and the add-task wall time.
A style *agrees* when the tasks it shares a group with after add-task are the ones it shares a group with in the
joint run of five (a new group agrees with being alone). Targets (issue 20): accuracy within 2 points of the
joint run (mean over styles and seeds), agreement for at least 4 of 5 styles, add-task at least 10x faster than
the joint run of five. Resumable: a run whose result.json exists is skipped.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmserve.backbone import Backbone, load_backbone
from training.add_task import AddTaskConfig, add_task
from training.config import BackboneConfig
from training.grouping import GroupingConfig
from training.mmap_trainer import train_multitask
from training.progress import log
from training.results.rundir import describe_machine, machine_info, resolve_runs_dir
from training.results.tasks import emoji_split, read_tasks
from training.splits import Split, write_split
from training.studies import Recipe, StudyOptions, header, recipe_of, resumed, study_parser, write_outputs

ACCURACY_POINTS = 2.0  # target: the added style within this many points of the joint run
AGREE_AT_LEAST = 4  # target: styles (of 5) whose group agrees
SPEEDUP = 10.0  # target: add-task this many times faster than the joint run of all five


@dataclass
class StudyConfig(StudyOptions):
    """What one invocation measures and where it writes."""

    out: str = "docs/leave-one-out"
    shots: int = 16
    recipe: Recipe = field(default_factory=Recipe)


def subset(split: Split, tasks: list[str]) -> Split:
    """The split with only `tasks`, in that order."""
    return Split(split.kind, split.root, split.config, {t: split.tasks[t] for t in tasks})


def mates(groups: list[list[str]], task: str) -> list[str]:
    """The tasks `task` shares a group with in `groups` (sorted)."""
    return sorted(t for g in groups if task in g for t in g if t != task)


def without(groups: list[list[str]], task: str) -> list[list[str]]:
    """`groups` with `task` taken out (and a group it leaves empty dropped), as a sorted partition."""
    return sorted(sorted(t for t in g if t != task) for g in groups if any(t != task for t in g))


def _joint(cfg: StudyConfig, backbone: Backbone, split_file: Path, run_dir: Path, seed: int) -> dict:
    """A joint auto-grouped MmAP run on `split_file` (resumed from its result when finished)."""
    def run() -> dict:
        t0 = time.time()
        result = train_multitask(cfg.run_config(split_file, run_dir, cfg.shots, seed, cfg.recipe.optim(),
                                                cfg.recipe.prompt(), GroupingConfig("auto"),
                                                run_dir.parent / "tensors"), backbone)
        return {"wall_s": round(time.time() - t0, 3), "groups": result.groups,
                "accuracy": {s: v["accuracy"] for s, v in result.final["tasks"].items()}}

    return resumed(run_dir, run)


def _added(cfg: StudyConfig, backbone: Backbone, joint4: Path, split_file: Path, run_dir: Path, style: str,
           seed: int) -> dict:
    """add-task of `style` into a copy of the four-style registry `joint4`/registry, with the joint runs' recipe."""
    def run() -> dict:
        target = run_dir / "target-registry"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(joint4 / "registry", target)
        like = cfg.run_config(split_file, run_dir / "run", cfg.shots, seed, cfg.recipe.optim(), cfg.recipe.prompt(),
                              GroupingConfig("auto"), run_dir.parent / "tensors")
        at = AddTaskConfig(registry=str(target), root="", task=style, run_dir=like.run_dir,
                           split_file=like.split_file, template=None, zero_shot_template=like.zero_shot_template,
                           backbone=like.backbone, split=like.split, optim=like.optim, seed=seed,
                           cache_dir=like.cache_dir, progress=like.progress, eval_each_epoch=False)
        t0 = time.time()
        result = add_task(at, backbone)
        return {"wall_s": max(round(time.time() - t0, 3), 0.001), "accuracy": result.metrics["accuracy"],
                "group": result.group, "new_group": result.new_group,
                "group_tasks": sorted(result.metrics["joined"]["group_tasks"]), "gains": result.gains}

    return resumed(run_dir, run)


def run_study(cfg: StudyConfig) -> dict:
    """Every (seed, style): the joint run of five, the joint run of the other four, add-task; <out>.json/.md."""
    backbone = load_backbone(BackboneConfig(cfg.model, cfg.pretrained, cfg.device).spec())
    styles = list(read_tasks(cfg.cache)["tasks"])
    settings = {"model": cfg.model, "backbone_fingerprint": backbone.fingerprint, "shots": cfg.shots,
                "template": cfg.template, "recipe": asdict(cfg.recipe), "styles": styles}
    runs = resolve_runs_dir(cfg.runs_dir, cfg.cache, settings, root="leave-one-out")
    seeds: dict[str, dict] = {}
    for seed in cfg.seeds:
        split = emoji_split(cfg.cache, cfg.shots, seed, styles)
        files = {}
        for name, tasks in [("all", styles), *[(f"without-{s}", [t for t in styles if t != s]) for s in styles],
                            *[(f"only-{s}", [s]) for s in styles]]:
            files[name] = runs / "splits" / f"{name}-k{cfg.shots}-s{seed}.json"
            if not files[name].is_file():
                write_split(files[name], subset(split, tasks))
        log(f"leave-one-out: seed {seed}, joint run of all {len(styles)}")
        joint = _joint(cfg, backbone, files["all"], runs / f"joint-all-s{seed}", seed)
        per_style = {}
        for s in styles:
            log(f"leave-one-out: seed {seed}, {s}: joint run of the other {len(styles) - 1}, then add-task")
            four_dir = runs / f"joint-without-{s}-s{seed}"
            four = _joint(cfg, backbone, files[f"without-{s}"], four_dir, seed)
            added = _added(cfg, backbone, four_dir, files[f"only-{s}"], runs / f"add-{s}-s{seed}", s, seed)
            want = mates(joint["groups"], s)
            per_style[s] = {"joint_accuracy": joint["accuracy"][s], "added_accuracy": added["accuracy"],
                            "delta_points": 100 * (added["accuracy"] - joint["accuracy"][s]),
                            "joint_mates": want, "added_mates": added["group_tasks"],
                            "agrees": added["group_tasks"] == want, "new_group": added["new_group"],
                            "gains": added["gains"], "groups_of_four": four["groups"],
                            # why a style can disagree: the other four grouped otherwise without it
                            "four_as_in_joint": without(four["groups"], s) == without(joint["groups"], s),
                            "add_wall_s": added["wall_s"], "four_wall_s": four["wall_s"],
                            "speedup": joint["wall_s"] / added["wall_s"]}
        seeds[str(seed)] = {"joint_wall_s": joint["wall_s"], "joint_groups": joint["groups"], "styles": per_style}
    report = {"command": cfg.command, "settings": settings, "runs_dir": str(runs), "seeds": seeds,
              "machine": describe_machine(machine_info(cfg.device)), "targets": targets(seeds)}
    write_outputs(cfg.out, report, to_markdown)
    return report


def targets(seeds: dict[str, dict]) -> dict:
    """The three targets of issue 20, each with its value and MET / missed (agreement: in every seed)."""
    cells = [c for s in seeds.values() for c in s["styles"].values()]
    delta = sum(c["delta_points"] for c in cells) / len(cells)
    agree = [sum(c["agrees"] for c in s["styles"].values()) for s in seeds.values()]
    speed = sum(c["speedup"] for c in cells) / len(cells)
    return {"accuracy": {"value": delta, "met": abs(delta) <= ACCURACY_POINTS,
                         "target": f"mean |added - joint| <= {ACCURACY_POINTS} points"},
            "agreement": {"value": agree, "met": all(a >= AGREE_AT_LEAST for a in agree),
                          "target": f">= {AGREE_AT_LEAST} of 5 styles per seed"},
            "speedup": {"value": speed, "met": speed >= SPEEDUP, "target": f"add-task >= {SPEEDUP:g}x faster"}}


def _verdict(t: dict) -> str:
    return "MET" if t["met"] else "missed"


def to_markdown(report: dict) -> str:
    """Per (seed, style): joint vs added accuracy, groups, wall times; then the targets."""
    s, r = report["settings"], report["settings"]["recipe"]
    n = len(s["styles"])
    lines = [*header(f"Leave one out: a style added alone vs the joint run of all {n} (issue 20)", "leave-one-out",
                     report),
             f"- {s['shots']} shots. Recipe, joint runs and add-task alike: MmAP full, auto grouping; "
             f"{r['optimizer']} lr {r['lr']}, "
             f"weight decay {r['weight_decay']}, {r['epochs']} epochs, b = {r['n_tokens']}, source "
             f"{r['source_rows']} x {r['source_cols']}",
             "- Accuracy: top-1 (%) on the style's held-out test identities. Mates: the tasks it shares a group with.",
             "", f"| seed | style | joint of {n} | added alone | Δ points | mates, joint of {n} | mates, added | "
             f"agrees | others grouped as in the joint of {n} | add-task s | joint of {n} s | speed-up |",
             "| ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for seed, sd in report["seeds"].items():
        for style, c in sd["styles"].items():
            lines.append(f"| {seed} | {style} | {100 * c['joint_accuracy']:.1f} | {100 * c['added_accuracy']:.1f} | "
                         f"{c['delta_points']:+.1f} | {', '.join(c['joint_mates']) or '(alone)'} | "
                         f"{', '.join(c['added_mates']) or '(new group)'} | {'yes' if c['agrees'] else 'no'} | "
                         f"{'yes' if c.get('four_as_in_joint') else 'no'} | "
                         f"{c['add_wall_s']:.0f} | {sd['joint_wall_s']:.0f} | {c['speedup']:.1f}x |")
    lines += ["", f"Groups of the joint runs of {n}: " + "; ".join(
        f"seed {seed}: " + " · ".join("{" + ", ".join(g) + "}" for g in sd["joint_groups"])
        for seed, sd in report["seeds"].items()), "", "| target | value | verdict |", "| --- | --- | --- |"]
    t = report["targets"]
    lines += [f"| {t['accuracy']['target']} | {t['accuracy']['value']:+.2f} points (mean added − joint) | "
              f"{_verdict(t['accuracy'])} |",
              f"| {t['agreement']['target']} | {', '.join(map(str, t['agreement']['value']))} (per seed) | "
              f"{_verdict(t['agreement'])} |",
              f"| {t['speedup']['target']} | {t['speedup']['value']:.1f}x (mean) | {_verdict(t['speedup'])} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`mmserve-train leave-one-out`."""
    p = study_parser("leave-one-out", __doc__, StudyConfig.out, Recipe())
    p.add_argument("--shots", type=int, default=StudyConfig.shots)
    a = p.parse_args(argv)
    cfg = StudyConfig.from_args(a, "leave-one-out", argv, shots=a.shots, recipe=recipe_of(a))
    report = run_study(cfg)
    print(to_markdown(report))
    return 0
