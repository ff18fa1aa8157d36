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
the joint run of five. Resumable: a run whose result.json exists is skipped, and `--budget-minutes` stops starting
new runs (what is missing is listed; the targets read what has run); the page is rewritten after each joint run
and each style's (four-style run, add-task) pair. Restorable: `--restore docs/leave-one-out.json`
seeds a fresh runs dir with the published page's finished runs (same settings and splits, or refused).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
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
from training.splits import Split, split_digest, write_split
from training.studies import (
    Recipe,
    StudyOptions,
    header,
    missing_line,
    read_published,
    recipe_of,
    resumed,
    seed_runs,
    study_parser,
    sweep_and_publish,
    write_outputs,
)

ACCURACY_POINTS = 2.0  # target: the added style within this many points of the joint run
AGREE_AT_LEAST = 4  # target: styles (of 5) whose group agrees
SPEEDUP = 10.0  # target: add-task this many times faster than the joint run of all five


@dataclass
class StudyConfig(StudyOptions):
    """What one invocation measures and where it writes."""

    out: str = "docs/leave-one-out"
    shots: int = 16
    recipe: Recipe = field(default_factory=Recipe)
    budget_minutes: float | None = None
    restore: str | None = None  # a published page (docs/leave-one-out.json): its finished runs seed the runs dir


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
        if not (joint4 / "registry").is_dir():
            raise ValueError(f"{joint4}: its result is here but not its registry, which add-task needs; remove "
                             f"{joint4 / 'result.json'} to train it again")
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


def restore_study(path: Path, runs: Path, settings: dict, data: dict) -> int:
    """Seed `runs` with a published page's finished runs: refused unless its settings are these and each seed's
    split it ran has this cache's digest (items and image bytes). A four-style run comes only with its add-task
    run (add-task needs the four-style registry, which a page does not hold). Runs already here win."""
    published = read_published(path, settings, "leave-one-out")
    finished = published.get("runs")
    if not isinstance(finished, dict):
        raise ValueError(f"{path}: keeps no finished runs (published before --restore); nothing restored")
    for seed, digest in (published.get("data") or {}).get("splits", {}).items():
        if seed in data["splits"] and data["splits"][seed] != digest:
            raise ValueError(f"{path}: this cache's split of seed {seed} differs from the published one (digest "
                             f"{data['splits'][seed][:12]} here, {digest[:12]} there); nothing restored")
    n = seed_runs(path, [(runs / name, r) for name, r in finished.items()])
    log(f"leave-one-out: restored {n} run(s) from {path}")
    return n


def run_study(cfg: StudyConfig) -> dict:
    """Every (seed, style): the joint run of five, the joint run of the other four, add-task; <out>.json/.md."""
    t_start = time.time()
    backbone = load_backbone(BackboneConfig(cfg.model, cfg.pretrained, cfg.device).spec())
    styles = list(read_tasks(cfg.cache)["tasks"])
    settings = {"model": cfg.model, "backbone_fingerprint": backbone.fingerprint, "shots": cfg.shots,
                "template": cfg.template, "recipe": asdict(cfg.recipe), "styles": styles}
    runs = resolve_runs_dir(cfg.runs_dir, cfg.cache, settings, root="leave-one-out")
    splits = {seed: emoji_split(cfg.cache, cfg.shots, seed, styles) for seed in cfg.seeds}
    data = {"splits": {str(seed): split_digest(split) for seed, split in splits.items()}}
    if cfg.restore:
        restore_study(Path(cfg.restore), runs, settings, data)
    files: dict[int, dict[str, Path]] = {}
    for seed, split in splits.items():
        for name, tasks in [("all", styles), *[(f"without-{s}", [t for t in styles if t != s]) for s in styles],
                            *[(f"only-{s}", [s]) for s in styles]]:
            files.setdefault(seed, {})[name] = runs / "splits" / f"{name}-k{cfg.shots}-s{seed}.json"
            if not files[seed][name].is_file():
                write_split(files[seed][name], subset(split, tasks))
    machine = describe_machine(machine_info(cfg.device))

    def sweep(may_start: Callable[[], bool], after_run: Callable[[], None]) -> dict:
        seeds, missing = _sweep(cfg, backbone, runs, files, styles, may_start, after_run)
        return {"command": cfg.command, "settings": settings, "data": data, "runs_dir": str(runs),
                "seeds": seeds, "missing": missing, "runs": _finished(runs, seeds), "machine": machine,
                "targets": targets(seeds)}

    return sweep_and_publish(sweep, lambda r: write_outputs(cfg.out, r, to_markdown), cfg.budget_minutes, t_start)


def _sweep(cfg: StudyConfig, backbone: Backbone, runs: Path, files: dict[int, dict[str, Path]], styles: list[str],
           may_start: Callable[[], bool], after_run: Callable[[], None]) -> tuple[dict[str, dict], list[str]]:
    """One pass over (seed, style): finished runs are read; missing ones train when `may_start()` (then
    `after_run()` is called, so the page follows every finished step), else are listed. Returns (seeds, missing)."""
    missing: list[str] = []

    def trains(*run_dirs: Path) -> bool:
        return not all((d / "result.json").is_file() for d in run_dirs)

    def may_run(*run_dirs: Path) -> bool:
        """True when every run is finished or may start now; else False, and the unfinished ones are listed."""
        if not trains(*run_dirs) or may_start():
            return True
        missing.extend(d.name for d in run_dirs if trains(d))
        return False

    seeds: dict[str, dict] = {}
    for seed, f in files.items():
        all_dir = runs / f"joint-all-s{seed}"
        if not may_run(all_dir):
            missing.extend(f"{kind}-{s}-s{seed}" for s in styles for kind in ("joint-without", "add"))
            continue
        fresh = trains(all_dir)
        if fresh:
            log(f"leave-one-out: seed {seed}, joint run of all {len(styles)}")
        joint = _joint(cfg, backbone, f["all"], all_dir, seed)
        if fresh:
            after_run()
        per_style = {}
        for s in styles:
            four_dir, add_dir = runs / f"joint-without-{s}-s{seed}", runs / f"add-{s}-s{seed}"
            if not may_run(four_dir, add_dir):
                continue
            fresh = trains(four_dir, add_dir)
            if fresh:
                log(f"leave-one-out: seed {seed}, {s}: joint run of the other {len(styles) - 1}, then add-task")
            four = _joint(cfg, backbone, f[f"without-{s}"], four_dir, seed)
            added = _added(cfg, backbone, four_dir, f[f"only-{s}"], add_dir, s, seed)
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
            if fresh:
                after_run()  # the page now holds this style: a published four-style run comes with its add run
        seeds[str(seed)] = {"joint_wall_s": joint["wall_s"], "joint_groups": joint["groups"], "styles": per_style}
    return seeds, missing


def _finished(runs: Path, seeds: dict[str, dict]) -> dict[str, dict]:
    """{run dir name: result} of the runs the page reports (each four-style run beside its add-task run), kept so
    that `--restore` can seed a fresh runs dir."""
    names = [f"joint-all-s{seed}" for seed in seeds]
    names += [f"{kind}-{s}-s{seed}" for seed, sd in seeds.items() for s in sd["styles"]
              for kind in ("joint-without", "add")]
    return {n: json.loads((runs / n / "result.json").read_text()) for n in names}


def targets(seeds: dict[str, dict]) -> dict:
    """The three targets of issue 20, each with its value and MET / missed (agreement: in every seed); empty before
    any style has run."""
    cells = [c for s in seeds.values() for c in s["styles"].values()]
    if not cells:
        return {}
    delta = sum(c["delta_points"] for c in cells) / len(cells)
    begun = [s["styles"] for s in seeds.values() if s["styles"]]  # a seed with no style yet agreed for none
    agree = [sum(c["agrees"] for c in styles.values()) for styles in begun]
    speed = sum(c["speedup"] for c in cells) / len(cells)
    return {"accuracy": {"value": delta, "met": abs(delta) <= ACCURACY_POINTS,
                         "target": f"|mean (added - joint)| <= {ACCURACY_POINTS} points"},
            "agreement": {"value": agree, "of": [len(styles) for styles in begun],
                          "met": all(a >= AGREE_AT_LEAST for a in agree),
                          "target": f">= {AGREE_AT_LEAST} of 5 styles per seed"},
            "speedup": {"value": speed, "met": speed >= SPEEDUP, "target": f"add-task >= {SPEEDUP:g}x faster"}}


def _per_seed(agreement: dict) -> str:
    """ "4 of 5, 0 of 2 (per seed)": styles that agree of those run, each seed begun."""
    pairs = zip(agreement["value"], agreement["of"], strict=True)
    return ", ".join(f"{a} of {n}" for a, n in pairs) + " (per seed)"


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
             missing_line(report.get("missing", [])),
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
    if not t:
        return "\n".join(lines + ["| (no style has run yet) | | |"]) + "\n"
    lines += [f"| {t['accuracy']['target']} | {t['accuracy']['value']:+.2f} points (mean added − joint) | "
              f"{_verdict(t['accuracy'])} |",
              f"| {t['agreement']['target']} | {_per_seed(t['agreement'])} | "
              f"{_verdict(t['agreement'])} |",
              f"| {t['speedup']['target']} | {t['speedup']['value']:.1f}x (mean) | {_verdict(t['speedup'])} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`mmserve-train leave-one-out`."""
    p = study_parser("leave-one-out", __doc__, StudyConfig.out, Recipe())
    p.add_argument("--shots", type=int, default=StudyConfig.shots)
    p.add_argument("--budget-minutes", type=float, default=None, help="stop starting runs after this long")
    p.add_argument("--restore", default=None, help="a published page (docs/leave-one-out.json): seed its runs")
    a = p.parse_args(argv)
    cfg = StudyConfig.from_args(a, "leave-one-out", argv, shots=a.shots, recipe=recipe_of(a),
                                budget_minutes=a.budget_minutes, restore=a.restore)
    try:
        report = run_study(cfg)
    except ValueError as exc:
        p.error(str(exc))
    print(to_markdown(report))
    return 0
