"""`mmserve-train results`: run every missing cell within the budget, rewriting the report after each one."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mmserve.backbone import Backbone, load_backbone
from training.classify import Towers
from training.config import BackboneConfig
from training.progress import log
from training.studies import sweep_and_publish
from training.templates import AUTO, choose_template

from .cells import Context, run_cell, stale_cell
from .methods import ZERO_SHOT, ResultsConfig
from .report import collect, shipped_rows, write_outputs
from .restore import restore_published
from .rundir import cell_dir, machine_info, read_result, resolve_runs_dir, selected_methods, set_aside, settings_of
from .tasks import emoji_split, read_tasks


def plan_cells(rc: ResultsConfig, methods: list[str]) -> list[tuple[str, int | None, int | None]]:
    """Cells in run order: zero-shot first, then seed by seed (a partial table has whole seeds early)."""
    cells: list[tuple[str, int | None, int | None]] = [(m, None, None) for m in methods if m in ZERO_SHOT]
    for seed in rc.seeds:
        for shots in rc.shots:
            cells += [(m, shots, seed) for m in methods if m not in ZERO_SHOT]
    return cells


def build_results(rc: ResultsConfig, backbone: Backbone | None = None) -> dict:
    """Run every missing cell (within the budget); <out>.md, <out>.json and <out>.png are rewritten after each."""
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
    ran, failed, restored = [], [], []  # this command's, across passes
    if rc.restore:
        restored, measured = restore_published(ctx, Path(rc.restore), settings)
        ran += ["zero-shot"] if measured else []
    cells = plan_cells(rc, methods)
    for method, shots, seed in cells:  # once, before any pass: the passes below only read and train
        where = cell_dir(runs, method, shots, seed)
        rec = read_result(where)
        if rec is not None and (why := stale_cell(ctx, method, shots, seed, rec)) is not None:
            log(f"results: {method} k={shots} seed={seed} is stale ({why})")
            set_aside(runs, where)
    n_classes = len(read_tasks(rc.cache)["classes"])

    def sweep(may_start: Callable[[], bool], after_run: Callable[[], None]) -> dict:
        skipped, not_started = [], []
        for method, shots, seed in cells:
            label = f"{method} k={shots} seed={seed}" if shots is not None else method
            if read_result(cell_dir(runs, method, shots, seed)) is not None:
                if label not in ran:
                    skipped.append(label)
                continue
            if any(f["cell"] == label for f in failed):
                continue
            if not may_start():
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
            after_run()
        session = {"ran": list(ran), "skipped": skipped, "failed": list(failed), "not_started": not_started,
                   "restored": restored, "wall_s": round(time.time() - t_start, 1), "machine": ctx.machine,
                   "command": rc.command}
        report = collect(runs, rc, styles, settings, session)
        report["n_classes"] = n_classes
        report["template_choice"] = template_choice.as_dict() if template_choice else None
        report["shipped"] = shipped
        report["restored_from"] = rc.restore
        return report

    return sweep_and_publish(sweep, lambda r: write_outputs(r, Path(rc.out)), rc.budget_minutes, t_start)
