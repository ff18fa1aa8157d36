"""Seeded, disjoint train/test splits with k shots per class, saved to (and reused from) a split JSON file.

The file holds every item (image path relative to the data root, label, text) of every task, so evaluation
needs nothing but the file and the images. Drawing is deterministic: each class is shuffled by a
`random.Random` seeded with "<seed>:<task>:<class>" (string seeds do not depend on PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mmserve.fileio import atomic_write_json, sha256_file
from mmserve.strict import from_dict
from training.config import SplitConfig
from training.data import ClassTask, Item, default_class_name
from training.progress import log

SPLIT_FORMAT = "mmserve-split"
SPLIT_VERSION = 1


@dataclass
class SplitTask:
    """One task's classes (ids and prompt names), head kind and its disjoint train and test items."""

    classes: list[str]
    class_names: list[str]
    train: list[Item]
    test: list[Item]
    head: str = "multiclass"  # "multiclass" or "multilabel"

    def name_of(self) -> dict[str, str]:
        """Class id -> prompt name."""
        return dict(zip(self.classes, self.class_names, strict=True))


@dataclass
class Split:
    """A split file: kind ('classify' or 'fuse'), data root, how it was drawn, and its tasks."""

    kind: str
    root: str
    config: SplitConfig
    tasks: dict[str, SplitTask] = field(default_factory=dict)


def _n_test(n: int, cfg: SplitConfig) -> int:
    if n < 2 or cfg.test_fraction <= 0:
        return 0
    k = min(n - 1, max(1, round(n * cfg.test_fraction)))
    return k if cfg.max_test is None else min(k, cfg.max_test)


def _key(item: Item, cfg: SplitConfig) -> str:
    return Path(item.image).stem if cfg.split_by == "stem" else item.image


def split_per_class(tasks: dict[str, list[Item]], cfg: SplitConfig) -> dict[str, tuple[list[Item], list[Item]]]:
    """Per task and class: test = a seeded fraction of the keys, train = `shots` seeded picks from the rest.

    With split_by='stem' the test keys of a class are drawn once over all tasks, so an identity (file stem)
    is test in every task or in none: no task trains on what another is tested on.
    """
    if cfg.split_by not in ("file", "stem"):
        raise ValueError(f"split_by must be 'file' or 'stem', got {cfg.split_by!r}")
    pools: dict[tuple[str, str], set[str]] = {}
    for task, items in tasks.items():
        for it in items:
            scope = "*" if cfg.split_by == "stem" else task
            pools.setdefault((scope, str(it.label)), set()).add(_key(it, cfg))
    test_keys: dict[tuple[str, str], set[str]] = {}
    for (scope, label), keys in pools.items():
        ordered = sorted(keys)
        random.Random(f"{cfg.seed}:{scope}:{label}:test").shuffle(ordered)
        test_keys[(scope, label)] = set(ordered[:_n_test(len(ordered), cfg)])
    out = {}
    for task, items in tasks.items():
        by_class: dict[str, list[Item]] = {}
        for it in items:
            by_class.setdefault(str(it.label), []).append(it)
        train, test = [], []
        for label in sorted(by_class):
            scope = "*" if cfg.split_by == "stem" else task
            chosen = test_keys[(scope, label)]
            members = sorted(by_class[label], key=lambda it: it.image)
            test += [it for it in members if _key(it, cfg) in chosen]
            pool = [it for it in members if _key(it, cfg) not in chosen]
            random.Random(f"{cfg.seed}:{task}:{label}").shuffle(pool)
            train += sorted(pool[:cfg.shots] if cfg.shots is not None else pool, key=lambda it: it.image)
        out[task] = (train, test)
    return out


def split_samples(items: list[Item], cfg: SplitConfig, task: str) -> tuple[list[Item], list[Item]]:
    """Multi-label data has no single class per sample: a seeded test fraction of the samples, the rest train."""
    ordered = sorted(items, key=lambda it: (it.image, it.text or ""))
    random.Random(f"{cfg.seed}:{task}:samples").shuffle(ordered)
    n_test = _n_test(len(ordered), SplitConfig(test_fraction=cfg.test_fraction, max_test=None))
    return ordered[n_test:], ordered[:n_test]


def classify_split(root: str | Path, tasks: dict[str, ClassTask], cfg: SplitConfig) -> Split:
    """Draw the split of image-folder tasks."""
    parts = split_per_class({name: t.items for name, t in tasks.items()}, cfg)
    split = Split("classify", str(Path(root).resolve()), cfg)
    for name, t in tasks.items():
        train, test = parts[name]
        split.tasks[name] = SplitTask(t.classes, t.class_names, train, test)
    return split


def labels_of(items: list[Item]) -> list[str]:
    """Sorted distinct labels of single- or multi-label items."""
    return sorted({x for it in items for x in (it.label if isinstance(it.label, list) else [it.label])})


def fusion_split(name: str, items: list[Item], cfg: SplitConfig, test_items: list[Item] | None = None,
                 classes: list[str] | None = None, head: str | None = None) -> Split:
    """Split fusion items (or take `test_items` as the test part).

    Multi-class: train is k-shot sampled (`cfg.shots` per class). Multi-label: a sample has several labels, so
    "k per class" is ambiguous: `shots` is ignored, every non-test sample trains, and the split records shots None.
    """
    multilabel = any(isinstance(it.label, list) for it in items + (test_items or []))
    head = head or ("multilabel" if multilabel else "multiclass")
    if head == "multiclass" and multilabel:
        raise ValueError(f"task {name}: list labels need --head multilabel")
    if head == "multilabel":
        if cfg.shots is not None:
            log(f"task {name}: multi-label, so --shots {cfg.shots} is ignored (every non-test sample trains)")
            cfg = replace(cfg, shots=None)
        items = [it if isinstance(it.label, list) else Item(it.image, [it.label], it.text) for it in items]
        test_items = None if test_items is None else [
            it if isinstance(it.label, list) else Item(it.image, [it.label], it.text) for it in test_items]
    if test_items is None:
        if head == "multilabel":
            train, test = split_samples(items, cfg, name)
        else:
            train, test = split_per_class({name: items}, cfg)[name]
    else:
        test = list(test_items)
        if head == "multilabel":
            train = list(items)
        else:
            train, _ = split_per_class({name: items}, SplitConfig(cfg.shots, 0.0, None, "file", cfg.seed))[name]
    classes = classes or labels_of(train + test)
    split = Split("fuse", "", cfg)
    split.tasks[name] = SplitTask(classes, [default_class_name(c) for c in classes], train, test, head)
    return split


def write_split(path: str | Path, split: Split) -> None:
    """Write the split JSON (atomically)."""
    path = Path(path)
    data = {
        "format": SPLIT_FORMAT, "version": SPLIT_VERSION, "kind": split.kind, "root": split.root,
        "config": asdict(split.config),
        "tasks": {name: {"classes": t.classes, "class_names": t.class_names, "head": t.head,
                         "train": [it.to_dict() for it in t.train], "test": [it.to_dict() for it in t.test]}
                  for name, t in split.tasks.items()},
    }
    atomic_write_json(path, data)


def split_digest(split: Split) -> str:
    """SHA-256 of every task's classes and items and of each item's image bytes (not the root): same data, same
    digest, wherever the cache lives."""
    h = hashlib.sha256()
    for name in sorted(split.tasks):
        t = split.tasks[name]
        h.update(json.dumps([name, t.classes, t.class_names, t.head]).encode())
        for part, items in (("train", t.train), ("test", t.test)):
            for it in items:
                h.update(json.dumps([part, it.to_dict()]).encode())
                h.update(sha256_file(Path(split.root) / it.image).encode())
    return h.hexdigest()


def reuse_or_draw(split_file: str | None, run_dir: str | Path, resume: bool, draw: Callable[[], Split]) -> Split:
    """The split of `split_file` when it exists, else (resuming) the run dir's split.json, else `draw()`'s, which
    is then also written to `split_file` (when given)."""
    path = Path(split_file) if split_file else None
    run_split = Path(run_dir) / "split.json"
    if path is not None and path.is_file():
        split = read_split(path)
        log(f"reusing split {path}")
    elif resume and run_split.is_file():
        split = read_split(run_split)
        log(f"resuming with split {run_split}")
    else:
        split = draw()
        if path is not None:
            write_split(path, split)
    return split


def read_split(path: str | Path) -> Split:
    """Read a split JSON written by write_split; a clear error names the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable split file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT or data.get("version") != SPLIT_VERSION:
        raise ValueError(f"{path}: not a {SPLIT_FORMAT} v{SPLIT_VERSION} file")
    split = Split(_field(data, "kind", str, path), _field(data, "root", str, path), _split_config(data, path))
    for name, t in _field(data, "tasks", dict, path).items():
        split.tasks[name] = _split_task(path, split.kind, name, t)
    return split


def _field(data: dict, key: str, kind: type | tuple[type, ...], path: Path, where: str = ""):
    """data[key], or a ValueError naming the file and the field when it is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: field {where.rstrip('.')} must be a JSON object, got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{path}: field {where}{key} is missing")
    if not isinstance(data[key], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}: field {where}{key} must be a {expected}, got {type(data[key]).__name__}")
    return data[key]


def _split_config(data: dict, path: Path) -> SplitConfig:
    return from_dict(SplitConfig, _field(data, "config", dict, path), f"{path}: field config", ValueError)


def _split_task(path: Path, kind: str, name: str, t: dict) -> SplitTask:
    where = f"tasks.{name}."
    parts = {}
    for part in ("train", "test"):
        items = _field(t, part, list, path, where)
        for i, d in enumerate(items):
            _field(d, "image", str, path, f"{where}{part}[{i}].")
            _field(d, "label", (str, list), path, f"{where}{part}[{i}].")
        parts[part] = [Item.from_dict(d) for d in items]
    overlap = {it.image for it in parts["train"]} & {it.image for it in parts["test"]}
    if overlap and kind == "classify":
        raise ValueError(f"{path}: task {name}: train and test share {len(overlap)} image(s)")
    return SplitTask(_field(t, "classes", list, path, where), _field(t, "class_names", list, path, where),
                     parts["train"], parts["test"], t.get("head", "multiclass"))


def validation_split(split: Split, fraction: float = 0.25, seed: int = 0) -> Split:
    """A split whose test part is carved out of `split`'s train part: hyper-parameters are chosen on it, never on
    the real test part.

    Per class, a seeded `fraction` (at least one) of the train identities (file stems, one set over all tasks, so
    an emoji drawn in two styles never sits on both sides) becomes validation, never one that is the last train
    identity of the class in some task (a task with one shot of a class keeps it); the test part is dropped.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    stems: dict[str, set[str]] = {}
    per_task: dict[str, list[set[str]]] = {}  # label -> the stems of each task that trains on it
    for task in split.tasks.values():
        of_task: dict[str, set[str]] = {}
        for it in task.train:
            for label in it.label if isinstance(it.label, list) else [it.label]:
                stems.setdefault(label, set()).add(Path(it.image).stem)
                of_task.setdefault(label, set()).add(Path(it.image).stem)
        for label, s in of_task.items():
            per_task.setdefault(label, []).append(s)
    held: set[str] = set()
    taken: set[str] = set()
    for label in sorted(stems):
        pool = sorted(stems[label] - taken)
        random.Random(f"{seed}:validation:{label}").shuffle(pool)
        want = max(1, round(len(pool) * fraction)) if pool else 0
        for stem in pool:
            if want == 0:
                break
            if all(s - held - {stem} for s in per_task[label]):  # every task keeps a train identity of the class
                held.add(stem)
                want -= 1
        taken |= stems[label]
    tasks = {}
    for name, t in split.tasks.items():
        fit = [it for it in t.train if Path(it.image).stem not in held]
        val = [it for it in t.train if Path(it.image).stem in held]
        tasks[name] = SplitTask(t.classes, t.class_names, fit, val, t.head)
    return Split(split.kind, split.root, split.config, tasks)

