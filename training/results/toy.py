"""A miniature prepared cache in `training.prepare`'s layout, for tests and smoke runs."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from training.runs import write_json

from .methods import MONO_STYLES


def write_toy_cache(cache: str | Path, styles: tuple[str, ...] = ("noto", "fluent_mono"),
                    classes: dict[str, str] | None = None, per_class: int = 6, size: int = 32, seed: int = 0
                    ) -> Path:
    """A tiny cache in `training.prepare`'s layout (tasks tree, classes.json, heldout_emoji.json, fusion JSONL).

    Class `c` is drawn as shapes of colour `classes[c]`; the fusion text names the class, so both modalities
    carry the label. Half of each class's identities are held out for test.
    """
    from training.synthetic import SHAPES, draw_shape

    cache = Path(cache)
    classes = classes or {"red-thing": "red", "blue-thing": "blue", "green-thing": "green"}
    rng = random.Random(seed)
    tasks_dir = cache / "tasks"
    held, rows = {}, {"train": [], "test": []}
    for cid, colour in classes.items():
        hexes = [f"1F{int(hashlib.md5(f'{cid}{i}'.encode()).hexdigest()[:3], 16):03X}" for i in range(per_class)]
        held[cid] = {"train": hexes[: per_class // 2], "test": hexes[per_class // 2:]}
        for style in styles:
            folder = tasks_dir / "images" / style / cid
            folder.mkdir(parents=True, exist_ok=True)
            for h in hexes:
                img = draw_shape(colour, rng.choice(SHAPES), size, rng)
                if style in MONO_STYLES:
                    img = img.convert("L").convert("RGB")
                img.save(folder / f"{h}.png")
                part = "test" if h in held[cid]["test"] else "train"
                rows[part].append({"image": str((folder / f"{h}.png").resolve()), "task": style, "hexcode": h,
                                   "text": f"a {cid.split('-')[0]} thing", "label": cid})
    write_json(tasks_dir / "classes.json", {"tasks": list(styles), "classes": [
        {"index": i, "id": cid, "name": cid.replace("-", " "), "n_emoji": per_class} for i, cid in enumerate(classes)]})
    write_json(tasks_dir / "heldout_emoji.json", {"seed": seed, "classes": held})
    fusion = cache / "fusion"
    fusion.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        (fusion / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[part]))
        tag_rows = [r | {"label": [r["label"], "colour" if r["task"] not in MONO_STYLES else "mono"]}
                    for r in rows[part]]
        (fusion / f"tags_{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tag_rows))
    return cache
