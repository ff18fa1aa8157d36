"""Downstream emoji tasks: the image-folder tree, class list, held-out identities and fusion JSON lines."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from mmserve.fileio import atomic_write_bytes, atomic_write_json

from .emoji import EmojiInfo, class_name
from .splits import heldout_identities


def _link(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (copy when linking is impossible), replacing a different file."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically with a stable layout."""
    atomic_write_json(path, obj, ensure_ascii=False)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write JSON lines atomically."""
    atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


def build_task_tree(tasks_dir: Path, emoji: dict[str, EmojiInfo], renders: dict[str, dict[str, Path]],
                    styles: tuple[str, ...]) -> dict[str, int]:
    """Link renders into `tasks_dir/images/<task>/<class_id>/<hexcode>.png`, removing stale files; count per task."""
    images = tasks_dir / "images"
    expected: dict[Path, Path] = {}
    for style in styles:
        for h, info in emoji.items():
            expected[images / style / info.subgroup / f"{h}.png"] = renders[style][h]
    if images.exists():
        for path in images.rglob("*"):
            if path.is_file() and path not in expected:
                path.unlink()
        for path in sorted(images.rglob("*"), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for dst, src in expected.items():
        _link(src, dst)
    return {style: len(emoji) for style in styles}


def class_table(emoji: dict[str, EmojiInfo]) -> list[dict]:
    """Sorted class records: index, subgroup id, readable name, emojibase group and emoji count."""
    counts = Counter(e.subgroup for e in emoji.values())
    groups = {e.subgroup: e.group for e in emoji.values()}
    return [{"index": i, "id": sub, "name": class_name(sub), "group": groups[sub], "n_emoji": counts[sub]}
            for i, sub in enumerate(sorted(counts))]


def write_tasks(tasks_dir: Path, emoji: dict[str, EmojiInfo], renders: dict[str, dict[str, Path]],
                styles: tuple[str, ...], size: int, seed: int = 0, test_fraction: float = 0.5,
                min_test: int = 5) -> dict:
    """Write the task tree, `classes.json`, `emoji.json` and `heldout_emoji.json`; return the split."""
    per_task = build_task_tree(tasks_dir, emoji, renders, styles)
    classes = class_table(emoji)
    write_json(tasks_dir / "classes.json", {
        "tasks": list(styles), "image_size": size, "label_field": "emojibase subgroup",
        "image_tree": "images/<task>/<class id>/<hexcode>.png", "classes": classes})
    write_json(tasks_dir / "emoji.json", {
        h: {"char": e.char, "name": e.name, "subgroup": e.subgroup, "group": e.group, "tags": e.tags}
        for h, e in sorted(emoji.items())})
    members: dict[str, list[str]] = {}
    for h, e in emoji.items():
        members.setdefault(e.subgroup, []).append(h)
    split = heldout_identities(members, seed=seed, test_fraction=test_fraction, min_test=min_test)
    write_json(tasks_dir / "heldout_emoji.json", {
        "seed": seed, "test_fraction": test_fraction, "min_test": min_test,
        "note": "emoji identities held out for test in every task (same hexcodes in all styles)",
        "classes": split})
    return {"per_task": per_task, "classes": len(classes), "split": split}


def write_fusion(fusion_dir: Path, tasks_dir: Path, emoji: dict[str, EmojiInfo], styles: tuple[str, ...],
                 split: dict[str, dict[str, list[str]]], n_tags: int = 50) -> dict[str, int]:
    """Write image+name JSON lines (single label = subgroup) and a multi-label variant over the top tags."""
    test_ids = {h for parts in split.values() for h in parts["test"]}
    train_ids = set(emoji) - test_ids
    tag_counts = Counter(t for h in train_ids for t in set(emoji[h].tags) if not any(c.isdigit() for c in t))
    vocab = [t for t, _ in sorted(tag_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_tags]]
    vocab_set = set(vocab)
    write_json(fusion_dir / "tags.json", {"tags": vocab, "counts": {t: tag_counts[t] for t in vocab}})
    counts: dict[str, int] = {}
    for part, ids in (("train", train_ids), ("test", test_ids)):
        rows, tag_rows = [], []
        for style in styles:
            for h in sorted(ids):
                e = emoji[h]
                image = str((tasks_dir / "images" / style / e.subgroup / f"{h}.png").resolve())
                base = {"image": image, "text": e.name, "task": style, "hexcode": h}
                rows.append({**base, "label": e.subgroup})
                tags = [t for t in vocab if t in vocab_set and t in e.tags]
                if tags:
                    tag_rows.append({**base, "label": tags})
        write_jsonl(fusion_dir / f"{part}.jsonl", rows)
        write_jsonl(fusion_dir / f"tags_{part}.jsonl", tag_rows)
        counts[part] = len(rows)
        counts[f"tags_{part}"] = len(tag_rows)
    counts["tag_vocab"] = len(vocab)
    return counts
