"""The prepared emoji tasks as splits: held-out identities as test, seeded k-shot train draws."""

from __future__ import annotations

import json
import random
from pathlib import Path

from training.config import SplitConfig
from training.data import BadFiles, Item, read_fusion_jsonl
from training.splits import Split, SplitTask, fusion_split

from .methods import COLOUR_STYLES, FUSION_TASK, MONO_STYLES


def read_tasks(cache: str | Path) -> dict:
    """classes.json of the prepared tasks: {"tasks": [style, ...], "classes": [{"id", "name", ...}, ...]}."""
    path = Path(cache) / "tasks" / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prepared tasks; run `mmserve-train prepare --cache {cache}` first")
    return json.loads(path.read_text())


def emoji_split(cache: str | Path, shots: int | None, seed: int, tasks: list[str] | None = None) -> Split:
    """Classification split of the emoji styles: held-out identities as test, `shots` seeded train picks.

    Test = every held-out identity (heldout_emoji.json) that has an image in the style; train = `shots`
    identities per class drawn with random.Random("<seed>:<style>:<class>") from the class's train identities.
    """
    cache = Path(cache)
    meta = read_tasks(cache)
    held_path = cache / "tasks" / "heldout_emoji.json"
    held = json.loads(held_path.read_text())["classes"]
    root = cache / "tasks" / "images"
    styles = list(tasks or meta["tasks"])
    unknown = [s for s in styles if s not in meta["tasks"]]
    if unknown:
        raise ValueError(f"style(s) {unknown} not among the prepared tasks {meta['tasks']}")
    ids = [str(c["id"]) for c in meta["classes"]]
    names = [str(c["name"]) for c in meta["classes"]]
    split = Split("classify", str(root.resolve()), SplitConfig(shots, 0.5, None, "stem", seed))
    for style in styles:
        train, test = [], []
        for cid in ids:
            folder = root / style / cid
            files = {p.stem: p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
            parts = held.get(cid, {"train": [], "test": []})
            test += [Item(f"{style}/{cid}/{files[h]}", cid) for h in sorted(parts["test"]) if h in files]
            pool = [h for h in sorted(parts["train"]) if h in files]
            random.Random(f"{seed}:{style}:{cid}").shuffle(pool)
            picked = pool if shots is None else pool[:shots]
            train += [Item(f"{style}/{cid}/{files[h]}", cid) for h in sorted(picked)]
        if not train or not test:
            raise ValueError(f"style {style}: no train or no test images under {root / style} ({held_path})")
        split.tasks[style] = SplitTask(ids, names, train, test)
    return split


def fusion_task_split(cache: str | Path, shots: int | None, seed: int, name: str = FUSION_TASK,
                      tags: bool = False, styles: list[str] | None = None) -> Split:
    """The fusion split: `fusion/test.jsonl` as test, `shots` seeded lines per class of `fusion/train.jsonl`.

    With `styles`, only those styles' lines (before the k-shot draw). With `tags`, the multi-label variant
    (`tags_{train,test}.jsonl`; every train line, `shots` is ignored).
    """
    folder = Path(cache) / "fusion"
    prefix = "tags_" if tags else ""
    bad = BadFiles("skip")
    train = read_fusion_jsonl(folder / f"{prefix}train.jsonl", bad)
    test = read_fusion_jsonl(folder / f"{prefix}test.jsonl", bad)
    if styles is not None:
        train = [it for it in train if style_of(it.image) in styles]
        test = [it for it in test if style_of(it.image) in styles]
    cfg = SplitConfig(None if tags else shots, 0.0, None, "file", seed)
    return fusion_split(name, train, cfg, test, head="multilabel" if tags else "multiclass")


def style_of(image: str) -> str:
    """The style of a prepared emoji image path (tasks/images/<style>/<class>/<hex>.png)."""
    parts = Path(image).parts
    return parts[-3] if len(parts) >= 3 else "?"


def per_style_accuracy(rows: list[dict]) -> dict[str, float]:
    """Accuracy per style from prediction rows {"image", "label", "predicted"}."""
    hits: dict[str, list[bool]] = {}
    for r in rows:
        hits.setdefault(style_of(r["image"]), []).append(r["predicted"] == r["label"])
    return {s: sum(v) / len(v) for s, v in sorted(hits.items())}


def grouping_verdict(groups: list[list[str]] | None, styles: list[str]) -> str:
    """Whether `groups` is exactly {colour styles} + {monochrome styles} (of those present)."""
    if not groups:
        return "n/a"
    colour = frozenset(s for s in styles if s in COLOUR_STYLES)
    mono = frozenset(s for s in styles if s in MONO_STYLES)
    if not colour or not mono:
        return "n/a (needs colour and monochrome styles)"
    found = {frozenset(g) for g in groups}
    if found == {colour, mono}:
        return "yes: colour vs monochrome"
    mixed = [sorted(g) for g in groups if set(g) & colour and set(g) & mono]
    if mixed:
        return f"no: {' + '.join('/'.join(g) for g in mixed)} mix colour and monochrome"
    together = [name for name, kind in (("colour", colour), ("monochrome", mono)) if kind in found]
    apart = [name for name, kind in (("colour", colour), ("monochrome", mono)) if kind not in found]
    if together:
        return f"partly: no group mixes them; the {' and '.join(together)} styles share one group, the " \
               f"{' and '.join(apart)} ones are split"
    return "partly: no group mixes colour and monochrome, but both are split further"
