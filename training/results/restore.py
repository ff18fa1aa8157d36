"""Seeding a fresh runs dir from a published table, so the table survives losing its cache."""

from __future__ import annotations

import json
from pathlib import Path

from training.progress import log
from training.runs import to_jsonable, write_json

from .cells import Context, run_classify_zero_shot
from .methods import METHODS, RESULT, ZERO_SHOT
from .rundir import cell_dir, read_result


def restore_published(ctx: Context, path: Path, settings: dict) -> tuple[list[str], bool]:
    """Seed the runs dir with the finished runs and groupings of a published table (`<out>.json`).

    The published JSON holds every number of every run, so a table survives losing its cache (a fresh machine):
    a rerun with `--restore docs/results.json` runs only what the table still misses. Refused unless the
    settings are the same (weights fingerprint, epochs, template, styles, ...) and the prepared data are: the
    zero-shot row is measured again on this cache and must give the published per-style accuracy (within one
    test image) on as many test images. Runs already in the runs dir win over published ones. Returns the
    labels of the runs restored and whether zero-shot was measured for the check.
    """
    try:
        published = json.loads(path.read_text())
        pub_settings, cells, groupings = published["settings"], published["cells"], published["groupings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a results table ({exc.__class__.__name__}: {exc})") from exc
    want = to_jsonable(settings)
    if pub_settings != want:
        changed = sorted(k for k in set(pub_settings) | set(want) if pub_settings.get(k) != want.get(k))
        raise ValueError(f"{path}: made with other settings (differs in {changed}); nothing restored")
    zero = next((r for c in cells if c["method"] == "zero-shot" for r in (c.get("runs") or {}).values()), None)
    if zero is None:
        raise ValueError(f"{path}: has no zero-shot run to check this cache's data against; nothing restored")
    here = read_result(cell_dir(ctx.runs, "zero-shot"))
    measured = here is None
    if measured:
        here = run_classify_zero_shot(ctx)
    for style, score in zero["scores"].items():
        n = zero["n_test"].get(style)
        if here["n_test"].get(style) != n or abs(here["scores"].get(style, -1.0) - score) > 1.0 / n + 1e-9:
            raise ValueError(f"{path}: this cache's data differ from the published table's: zero-shot on "
                             f"{style!r} is {here['scores'].get(style)} on {here['n_test'].get(style)} test images "
                             f"here, {score} on {n} there; nothing restored")
    machine = {"described": "; ".join(published.get("machines") or []) or "unknown (restored)"}
    for g in groupings:
        target = ctx.runs / "grouping" / f"k{g['shots']}-s{g['seed']}.json"
        if not target.is_file():
            write_json(target, {**g, "restored_from": str(path)})
    restored = []
    for cell in cells:
        if cell["method"] not in METHODS or cell["method"] in ZERO_SHOT:
            continue
        for run in (cell.get("runs") or {}).values():
            where = cell_dir(ctx.runs, cell["method"], run["shots"], run["seed"])
            if read_result(where) is None:
                write_json(where / RESULT, {"machine": machine, **run, "run_dir": str(where),
                                            "restored_from": str(path)})
                restored.append(f"{cell['method']} k={run['shots']} seed={run['seed']}")
    log(f"results: restored {len(restored)} run(s) and {len(groupings)} grouping(s) from {path}")
    return restored, measured
