"""Every classification method at its validated best recipe (issue 22): one small fixed grid, chosen on validation.

    mmserve-train method-grid --cache ~/.cache/mmserve --pretrained CKPT --out docs/methods \\
        [--methods ...] [--seeds 0 1 2] [--shots 4 16] [--budget-minutes N] [--paper docs/results.json]

1. Choose: every method a user picks between (CHOSEN: text-only, visual-only and MmAP full) trains at every grid
   point (GRID, the same points and so the same budget for each) on the validation split of (16 shots, seed 0):
   the results table's k-shot train draw with a quarter of its identities held out
   (training.splits.validation_split). No test image is read. MmAP's ablations (task-only, group-only, random
   and one group) take MmAP full's point, as in the paper's ablation table: one recipe, one part changed.
2. Test: each method's best point (mean validation accuracy over the styles) trains on the real split for every
   (shots, seed), scored on the held-out test identities, as in the results table.
3. `<out>.md` / `<out>.json`: per shots, each method's best-recipe row beside its paper-recipe row (read from
   `--paper`, the published results table), then every grid point's validation accuracy.
Resumable: one run dir per (phase, method, point[, shots, seed]); a run whose result.json exists is skipped, and
`--budget-minutes` stops starting new runs (what is missing is listed); the page is rewritten after every
finished run. Restorable: `--restore docs/methods.json`
seeds a fresh runs dir with the published page's finished runs (same settings and validation data, or refused).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mmserve.backbone import Backbone, load_backbone
from training.config import BackboneConfig
from training.grouping import GroupingConfig
from training.mmap_trainer import train_multitask
from training.progress import log
from training.results.methods import CLASSIFY_METHODS, METHODS
from training.results.rundir import describe_machine, machine_info, read_result, resolve_runs_dir
from training.results.tasks import emoji_split, read_tasks
from training.runs import write_json
from training.splits import read_split, split_digest, validation_split, write_split
from training.studies import (
    Recipe,
    StudyOptions,
    header,
    mean_std,
    missing_line,
    read_published,
    resumed,
    seed_runs,
    study_parser,
    sweep_and_publish,
    write_outputs,
)

CHOOSE_SHOTS, CHOOSE_SEED = 16, 0


@dataclass(frozen=True)
class Point:
    """One grid point: optimiser and lr, epochs, and the prompt size (small = the papers', large = the shipped)."""

    optimizer: str
    lr: float
    epochs: int
    size: str  # "small": MmAP source 2 x 8, deep prompts b = 4; "large": MmAP 4 x 256, deep prompts b = 16

    @property
    def key(self) -> str:
        """The point's run-dir name."""
        return f"{self.optimizer}-lr{self.lr:g}-e{self.epochs}-{self.size}"

    def recipe(self, method: str) -> Recipe:
        """This point as a recipe for `method`: its size is MmAP's source, or the deep prompts' tokens."""
        small = self.size == "small"
        if METHODS[method].prompt == "mmap":
            sizes = {"n_tokens": 4, "source_rows": 2 if small else 4, "source_cols": 8 if small else 256}
        else:
            sizes = {"n_tokens": 4 if small else 16}
        return Recipe(self.optimizer, self.lr, 0.0 if self.optimizer == "adamw" else 5e-4, self.epochs, **sizes)

    def label(self) -> str:
        """As the tables print it."""
        return f"{self.optimizer} lr {self.lr:g}, {self.epochs} epochs, {self.size} prompts"


# (optimiser, lr): the MmAP paper's SGD, and AdamW at two rates; 5 (the paper's) or 20 epochs; two prompt sizes
GRID = tuple(Point(o, lr, e, s) for (o, lr), e, s in itertools.product(
    (("sgd", 0.0035), ("adamw", 0.001), ("adamw", 0.01)), (5, 20), ("small", "large")))
GRID_METHODS = tuple(m.key for m in CLASSIFY_METHODS if m.key != "zero-shot")
CHOSEN = ("text-only", "visual-only", "mmap-full")  # chosen on the grid; MmAP's ablations take mmap-full's point


def chooser(method: str) -> str:
    """The method whose validated point `method` is tested at: its own, or MmAP full's for an ablation."""
    return method if method in CHOSEN else "mmap-full"


def _grouping(method: str) -> GroupingConfig:
    """Grouped methods compute their grouping on their own split (the random one draws 2 groups)."""
    if method in ("mmap-full", "mmap-group"):
        return GroupingConfig("auto")
    return GroupingConfig("random", n_groups=2) if method == "mmap-random" else GroupingConfig("all")


def train_point(cfg: GridConfig, backbone: Backbone, method: str, point: Point, split_file: Path, run_dir: Path,
                shots: int, seed: int, tensors: Path) -> dict:
    """One method at one grid point on one split (resumed from its result.json when finished)."""
    def run() -> dict:
        row, recipe = METHODS[method], point.recipe(method)
        t0 = time.time()
        result = train_multitask(cfg.run_config(split_file, run_dir, shots, seed, recipe.optim(),
                                                recipe.prompt(row.prompt, row.sharing), _grouping(method), tensors),
                                 backbone)
        return {"method": method, "point": asdict(point), "shots": shots, "seed": seed,
                "scores": {s: v["accuracy"] for s, v in result.final["tasks"].items()},
                "mean": result.final["accuracy_mean"], "trainable_params": result.trainable_params,
                "groups": result.groups, "wall_s": round(time.time() - t0, 1)}

    return resumed(run_dir, run)


@dataclass
class GridConfig(StudyOptions):
    """What one invocation of `mmserve-train method-grid` builds."""

    out: str = "docs/methods"
    methods: tuple[str, ...] = GRID_METHODS
    shots: tuple[int, ...] = (4, 16)
    grid: tuple[Point, ...] = GRID
    paper: str | None = None  # the published results table (docs/results.json): its paper-recipe rows
    budget_minutes: float | None = None
    restore: str | None = None  # a published grid (docs/methods.json): its finished runs seed the runs dir


def restore_grid(path: Path, runs: Path, settings: dict, data: dict) -> dict:
    """Seed `runs` with the finished runs of a published grid (`<out>.json`), so the grid survives losing its cache.

    Refused unless its settings (model, weights fingerprint, template, styles, grid) are these and, when it
    records one, its validation split's digest (items and image bytes) is this cache's. A page published before
    it recorded the digest restores on its settings alone, and the report says the data were not checked. A page
    that kept only a choice run's mean restores that (enough to choose). Runs already in `runs` win.
    """
    published = read_published(path, settings, "method-grid")
    try:
        chosen, tested = published["chosen"], published["tested"]
    except KeyError as exc:
        raise ValueError(f"{path}: not a method-grid page (KeyError: {exc})") from exc
    checked = published.get("data") is not None
    if checked and published["data"] != data:
        raise ValueError(f"{path}: this cache's validation split differs from the published grid's "
                         f"(digest {data['validation_digest'][:12]} here, "
                         f"{published['data'].get('validation_digest', '?')[:12]} there); nothing restored")
    points = {Point(**p).key: p for p in published["settings"]["grid"]}
    todo = []
    for method, c in chosen.items():
        for key, mean in c["validation"].items():
            run = (c.get("runs") or {}).get(key) or {"method": method, "point": points[key], "shots": CHOOSE_SHOTS,
                                                     "seed": CHOOSE_SEED, "mean": mean}
            todo.append((runs / "choose" / method / key / "run", run))
    for method, by_split in tested.items():
        for run in by_split.values():
            todo.append((runs / "test" / method / Point(**run["point"]).key / f"k{run['shots']}-s{run['seed']}", run))
    n = seed_runs(path, todo)
    log(f"method-grid: restored {n} run(s) from {path}" + ("" if checked else
        " (published before it recorded its data digest: restored on its settings alone, data not checked)"))
    record = {"from": str(path), "runs": n, "data_checked": checked}
    if n:  # kept beside the runs: a later rerun without --restore still reports where its runs came from
        write_json(runs / "restored.json", record)
    return record


def _sweep(cfg: GridConfig, backbone: Backbone, runs: Path, val: Path, styles: list[str], may_start: Callable[[], bool],
           after_run: Callable[[], None]) -> tuple[dict[str, dict], dict[str, dict[str, dict]], list[str]]:
    """One pass over the grid: a finished run is read; a missing one trains when `may_start()` (then `after_run()`
    is called), else it is listed missing. Returns (chosen, tested, missing)."""
    missing: list[str] = []

    def one(label: str, method: str, point: Point, split: Callable[[], Path], where: Path, shots: int,
            seed: int) -> dict | None:
        if (finished := read_result(where)) is not None:
            return finished
        if not may_start():
            missing.append(label)
            return None
        log(f"method-grid: {label}")
        result = train_point(cfg, backbone, method, point, split(), where, shots, seed, runs / "tensors")
        after_run()
        return result

    chosen: dict[str, dict] = {}
    for method in dict.fromkeys(chooser(m) for m in cfg.methods):
        done = {}
        for point in sorted(cfg.grid, key=lambda p: p.epochs):  # the short runs first: a budget stops on long ones
            r = one(f"choose {method} {point.key}", method, point, lambda: val,
                    runs / "choose" / method / point.key / "run", CHOOSE_SHOTS, CHOOSE_SEED)
            if r is not None:
                done[point.key] = r
        scores = {k: r["mean"] for k, r in done.items()}
        complete = len(scores) == len(cfg.grid)
        chosen[method] = {"validation": scores, "best": max(scores, key=scores.get) if complete else None,
                          "complete": complete, "runs": done}
    tested: dict[str, dict[str, dict]] = {}
    points = {p.key: p for p in cfg.grid}
    incomplete = [m for m in cfg.methods if chosen[chooser(m)]["best"] is None]
    missing += [f"test {m} ({chooser(m)}'s choice is incomplete)" for m in incomplete]
    # seed-major: every method's first seed (both shots) before any method's second, so that a budget that stops
    # part-way leaves a table where every chosen method has a comparable row
    for seed, method, shots in itertools.product(cfg.seeds, [m for m in cfg.methods if m not in incomplete],
                                                 cfg.shots):
        best = chosen[chooser(method)]["best"]

        def split(s: int = shots, d: int = seed) -> Path:
            path = runs / "splits" / f"classify-k{s}-s{d}.json"
            if not path.is_file():
                write_split(path, emoji_split(cfg.cache, s, d, styles))
            return path

        r = one(f"test {method} at {best}, k={shots} seed={seed}", method, points[best], split,
                runs / "test" / method / best / f"k{shots}-s{seed}", shots, seed)
        if r is not None:
            tested.setdefault(method, {})[f"{shots}/{seed}"] = r
    return chosen, tested, missing


def run_grid(cfg: GridConfig) -> dict:
    """Choose each method's point on validation, test it over shots and seeds; write <out>.json and <out>.md after
    every run that finishes (`sweep_and_publish`)."""
    t_start = time.time()
    backbone = load_backbone(BackboneConfig(cfg.model, cfg.pretrained, cfg.device).spec())
    styles = list(read_tasks(cfg.cache)["tasks"])
    settings = {"model": cfg.model, "backbone_fingerprint": backbone.fingerprint, "template": cfg.template,
                "styles": styles, "grid": [asdict(p) for p in cfg.grid]}
    runs = resolve_runs_dir(cfg.runs_dir, cfg.cache, settings, root="method-grid")
    val = runs / "splits" / "validation.json"
    if not val.is_file():
        write_split(val, validation_split(emoji_split(cfg.cache, CHOOSE_SHOTS, CHOOSE_SEED, styles)))
    data = {"validation_digest": split_digest(read_split(val))}
    if cfg.restore:
        restore_grid(Path(cfg.restore), runs, settings, data)
    restored = json.loads((runs / "restored.json").read_text()) if (runs / "restored.json").is_file() else None
    paper = _paper_rows(json.loads(Path(cfg.paper).read_text()) if cfg.paper else None)
    machine = describe_machine(machine_info(cfg.device))

    def sweep(may_start: Callable[[], bool], after_run: Callable[[], None]) -> dict:
        chosen, tested, missing = _sweep(cfg, backbone, runs, val, styles, may_start, after_run)
        return {"command": cfg.command, "settings": settings, "data": data, "restored": restored,
                "runs_dir": str(runs), "chosen": chosen, "methods": list(cfg.methods), "tested": tested,
                "missing": missing, "shots": list(cfg.shots), "seeds": list(cfg.seeds), "machine": machine,
                "paper": paper, "wall_s": round(time.time() - t_start, 1)}

    return sweep_and_publish(sweep, lambda r: write_outputs(cfg.out, r, to_markdown), cfg.budget_minutes, t_start)


def _paper_rows(published: dict | None) -> dict[str, dict[str, float]]:
    """{method: {shots: mean accuracy}} of the published table's complete classification cells (MmAP's paper
    recipe)."""
    rows: dict[str, dict[str, float]] = {}
    for c in (published or {}).get("cells", []):
        if c["family"] == "classify" and c.get("mean") and c.get("complete"):
            rows.setdefault(c["method"], {})[str(c["shots"])] = c["mean"]["mean"]
    return rows


def _provenance(report: dict) -> str:
    """Which validation data the grid chose on, and how many of its runs a restore brought in."""
    line = f"- Validation split digest `{(report.get('data') or {}).get('validation_digest', 'unknown')[:12]}`"
    r = report.get("restored")
    if r:
        n = sum("restored_from" in run for c in report["chosen"].values() for run in c["runs"].values())
        n += sum("restored_from" in run for t in report["tested"].values() for run in t.values())
        line += (f"; {n} run(s) restored from `{r['from']}`" + ("" if r["data_checked"] else
                 " on its settings alone (published before it recorded this digest, so its data were not checked)"))
    return line


def to_markdown(report: dict) -> str:
    """Per shots: best-recipe and paper-recipe rows of every method; then the validation grid."""
    s = report["settings"]
    lines = [*header("Every method at its validated best recipe (issue 22)", "method-grid", report),
             f"- Grid, the same {len(s['grid'])} points for every method, chosen on the validation split of "
             f"({CHOOSE_SHOTS} shots, seed {CHOOSE_SEED}): (sgd lr 0.0035 | adamw lr 0.001 | adamw lr 0.01) x "
             "(5 | 20 epochs) x (small | large prompts: MmAP source 2 x 8 | 4 x 256, deep prompts b = 4 | 16)",
             "- Chosen on the grid: " + ", ".join(CHOSEN) + "; MmAP's ablations are tested at MmAP full's point "
             "(the paper's ablation protocol: one recipe, one part changed)",
             _provenance(report),
             missing_line(report["missing"]), ""]
    points = {pt.key: pt for pt in (Point(**p) for p in s["grid"])}
    for shots in report["shots"]:
        lines += [f"## k = {shots} shots: mean top-1 (%) over the styles on held-out test identities", "",
                  "| method | best recipe (validation) | best recipe: test | seeds | paper recipe: test |",
                  "| --- | --- | ---: | --- | ---: |"]
        for method in sorted(report["methods"], key=GRID_METHODS.index):
            of = chooser(method)
            c = report["chosen"][of]
            runs = [r for k, r in report["tested"].get(method, {}).items() if k.startswith(f"{shots}/")]
            best = ("—" if c["best"] is None else Point(**runs[0]["point"]).label() if runs
                    else points[c["best"]].label())
            best += "" if of == method else f" ({of}'s)"
            paper = report["paper"].get(method, {}).get(str(shots))
            lines.append(f"| {METHODS[method].label} | {best} | "
                         f"{mean_std([r['mean'] for r in runs]) if runs else '—'} | {len(runs)} | "
                         f"{'—' if paper is None else f'{100 * paper:.1f}'} |")
        lines.append("")
    keys = list(points)
    lines += ["## Validation accuracy (%) of every grid point", "",
              "| method | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for method, c in report["chosen"].items():
        lines.append(f"| {METHODS[method].label} | " + " | ".join(
            "—" if k not in c["validation"] else (f"**{100 * c['validation'][k]:.1f}**" if k == c["best"]
                                                  else f"{100 * c['validation'][k]:.1f}") for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`mmserve-train method-grid`."""
    p = study_parser("method-grid", __doc__, GridConfig.out)
    p.add_argument("--methods", nargs="+", default=list(GRID_METHODS), choices=GRID_METHODS)
    p.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    p.add_argument("--paper", default=None, help="the published results table (docs/results.json)")
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument("--restore", default=None, help="a published grid (docs/methods.json): seed its finished runs")
    a = p.parse_args(argv)
    cfg = GridConfig.from_args(a, "method-grid", argv, methods=tuple(a.methods), shots=tuple(a.shots),
                               paper=a.paper, budget_minutes=a.budget_minutes, restore=a.restore)
    try:
        report = run_grid(cfg)
    except ValueError as exc:
        p.error(str(exc))
    print(to_markdown(report))
    return 0
