"""Studies beyond the accuracy table, each one command with resumable run dirs and a generated docs page:
base-to-new classes (issue 21), a task added alone (issue 20), every method at its validated recipe (issue 22)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.backbone import EMBEDDED_MODEL
from mmserve.fileio import atomic_write_bytes
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.grouping import GroupingConfig
from training.mmap_trainer import MultiTaskConfig, PromptSpec
from training.runs import to_jsonable, write_json


@dataclass
class Recipe:
    """One classification recipe for every run of a study: the shipped registry's optimiser and prompt sizes."""

    optimizer: str = "adamw"
    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: int = 20
    n_tokens: int = 4
    source_rows: int = 4
    source_cols: int = 256

    def optim(self) -> OptimConfig:
        """Its optimiser and schedule."""
        return OptimConfig(self.optimizer, lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs)

    def prompt(self, kind: str = "mmap", sharing: str = "group+task") -> PromptSpec:
        """Prompts of a registered kind at its sizes."""
        return PromptSpec(kind, sharing, n_tokens=self.n_tokens, source_rows=self.source_rows,
                          source_cols=self.source_cols)


@dataclass
class StudyOptions:
    """What every study takes: the data, the backbone, where it writes and runs, seeds, device."""

    cache: str
    pretrained: str
    model: str = EMBEDDED_MODEL
    out: str = ""
    runs_dir: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    template: str = "{}"
    device: str = "cpu"
    progress: bool = True
    command: str = ""

    @classmethod
    def from_args(cls, a: argparse.Namespace, name: str, argv: list[str] | None, **more):
        """The study's config from its parsed options (study_parser's, plus `more`)."""
        return cls(cache=a.cache, pretrained=a.pretrained, model=a.model, out=a.out, runs_dir=a.runs_dir,
                   seeds=list(a.seeds), device=a.device, progress=not a.no_progress,
                   command=f"mmserve-train {name} " + " ".join(argv or []), **more)

    def run_config(self, split_file: Path, run_dir: Path, shots: int, seed: int, optim: OptimConfig,
                   prompt: PromptSpec, grouping: GroupingConfig, tensors: Path) -> MultiTaskConfig:
        """One classification run of the study: resumable, evaluated once at the end, images cached in
        `tensors`; the backbone recorded by its file name (the runs dir is keyed by its fingerprint)."""
        return MultiTaskConfig(split_file=str(split_file), run_dir=str(run_dir), template=self.template,
                               zero_shot_template=self.template,
                               backbone=BackboneConfig(self.model, Path(self.pretrained).name, self.device),
                               split=SplitConfig(shots, 0.5, None, "stem", seed), optim=optim, prompt=prompt,
                               grouping=grouping, seed=seed, cache_dir=str(tensors), progress=self.progress,
                               resume=True, eval_each_epoch=False)


def resumed(run_dir: Path, make: Callable[[], dict]) -> dict:
    """A finished run's `run_dir`/result.json, else what `make` returns, written there."""
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    rec = make()
    write_json(done, rec)
    return rec


def read_published(path: Path, settings: dict, kind: str) -> dict:
    """A study's published page (`<out>.json`) made with `settings`, else a ValueError naming the file and the
    settings that differ (a page from other weights, styles or recipe must not seed these runs)."""
    try:
        published = json.loads(path.read_text())
        theirs = published["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a {kind} page ({exc.__class__.__name__}: {exc})") from exc
    want = to_jsonable(settings)
    if theirs != want:
        changed = sorted(k for k in set(theirs) | set(want) if theirs.get(k) != want.get(k))
        raise ValueError(f"{path}: made with other settings (differs in {changed}); nothing restored")
    return published


def seed_runs(path: Path, runs: list[tuple[Path, dict]]) -> int:
    """Write each (run dir, published result) as the run's result.json, marked restored from `path`, unless the
    run is finished here (its own result wins); the number written."""
    n = 0
    for run_dir, result in runs:
        if not (run_dir / "result.json").is_file():
            write_json(run_dir / "result.json", {**result, "restored_from": str(path)})
            n += 1
    return n


def study_parser(name: str, doc: str | None, out: str, recipe: Recipe | None = None) -> argparse.ArgumentParser:
    """The options every study takes (StudyOptions), and a Recipe's fields as options when given its defaults."""
    p = argparse.ArgumentParser(prog=f"mmserve-train {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="prepared data (mmserve-train prepare)")
    p.add_argument("--pretrained", required=True, help="backbone checkpoint")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--out", default=out, help="writes <out>.json and <out>.md")
    p.add_argument("--runs-dir", default=None, help="one dir per run; finished runs are skipped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    for key, default in (vars(recipe) if recipe is not None else {}).items():
        p.add_argument("--" + key.replace("_", "-"), type=type(default), default=default, help="recipe")
    return p


def recipe_of(a: argparse.Namespace) -> Recipe:
    """The Recipe study_parser's recipe options give."""
    return Recipe(**{k: getattr(a, k) for k in vars(Recipe())})


def mean_std(values: list[float]) -> str:
    """Percent mean, and ± the sample standard deviation when there is more than one value."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * m:.1f}"
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def header(title: str, name: str, report: dict) -> list[str]:
    """A study page's first lines: title, provenance, command, backbone, template and machine."""
    s = report["settings"]
    return [f"# {title}", "", f"Generated by `mmserve-train {name}`; do not edit by hand.", "",
            f"- Command: `{report['command']}`" if report["command"] else "- Command: (library call)",
            f"- Backbone `{s['model']}`, fingerprint `{s['backbone_fingerprint']}`; template `{s['template']}`; "
            f"machine: {report['machine']}"]


def missing_line(missing: list[str], show: int = 20) -> str:
    """A study page's "Missing" line: how many runs, then the first `show` of them by name."""
    named = "; ".join(missing[:show]) + (f"; ... ({len(missing) - show} more)" if len(missing) > show else "")
    return f"- Missing: {len(missing)} run(s)" + (f": {named}" if missing else "")


def write_outputs(out: str, report: dict, markdown: Callable[[dict], str]) -> None:
    """<out>.json (the report) and <out>.md (its page), each written whole."""
    path = Path(out)
    write_json(path.with_suffix(".json"), report)
    atomic_write_bytes(path.with_suffix(".md"), markdown(report).encode())


def sweep_and_publish(sweep: Callable[[Callable[[], bool], Callable[[], None]], dict],
                      write: Callable[[dict], None], budget_minutes: float | None, t_start: float) -> dict:
    """Run a study's `sweep(may_start, after_run)`, `write`-ing its report after every run that finishes; the report.

    `sweep` reads finished runs, trains a missing one while `may_start()` (then calls `after_run()`) and returns
    the report; with `may_start` always False it only reads. `budget_minutes`, counted from `t_start` (the
    command's start), stops starting runs, never one in flight. A machine lost mid-study so loses only the run in
    flight (`--restore <out>.json` picks up there).
    """
    def publish() -> dict:
        report = sweep(lambda: False, lambda: None)
        write(report)
        return report

    sweep(lambda: budget_minutes is None or time.time() - t_start <= budget_minutes * 60, publish)
    return publish()
