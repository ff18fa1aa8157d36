"""The report: every finished cell aggregated over seeds, the shipped reference rows, and the outputs."""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

from mmserve.fileio import atomic_write_bytes
from training.progress import log
from training.runs import write_json

from .markdown import markdown
from .methods import METHODS, ZERO_SHOT, ResultsConfig
from .plot import plot
from .rundir import cell_dir, describe_machine, read_result


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


def write_outputs(report: dict, out: Path) -> tuple[Path, Path, Path]:
    """<out>.png, <out>.json and <out>.md (the Markdown links the PNG by its file name)."""
    png, js, md = out.with_suffix(".png"), out.with_suffix(".json"), out.with_suffix(".md")
    report["plot"] = str(png)
    plot(report, png)
    write_json(js, report)
    atomic_write_bytes(md, markdown(report).encode())
    log(f"results: wrote {md}, {js}, {png}")
    return md, js, png
