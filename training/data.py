"""Labelled data: image-folder classification tasks, fusion JSON lines, bad-file policy, preprocessed tensors.

Classification tree: ROOT/<task>/<class>/<image>; the class set may be shared across tasks (Office-Home).
A class's prompt name is the folder name with '-'/'_' as spaces, unless a class-names file maps it
(a JSON {"id": "name"} or prepare's classes.json {"classes": [{"id", "name"}]}, found in ROOT or its parent).
Fusion lines: {"image": path, "text": str, "label": str | [str, ...]} (other fields ignored; relative image
paths are relative to the JSONL's folder).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mmserve.errors import MmserveError
from mmserve.fileio import atomic_write
from training.progress import log

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BAD_FILE_POLICIES = ("skip", "stop")


class BadFileError(MmserveError):
    """A bad input file under --on-bad-file stop; the message names the file."""


@dataclass
class BadFiles:
    """Reports bad inputs with their path and either records them (skip) or raises (stop)."""

    policy: str = "skip"
    seen: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in BAD_FILE_POLICIES:
            raise ValueError(f"--on-bad-file must be one of {BAD_FILE_POLICIES}, got {self.policy!r}")

    def report(self, path: str | Path, reason: str) -> None:
        """Report one bad file; raise BadFileError under 'stop', else log it and go on without it."""
        if self.policy == "stop":
            raise BadFileError(f"{path}: {reason} (run with --on-bad-file skip to go on without it)")
        log(f"skipping {path}: {reason}")
        self.seen.append({"path": str(path), "reason": reason})


@dataclass
class Item:
    """One labelled sample: image path (relative to the data root, or absolute), label(s), optional text."""

    image: str
    label: str | list[str]
    text: str | None = None

    def to_dict(self) -> dict:
        """JSON form for split files."""
        return {"image": self.image, "label": self.label} | ({} if self.text is None else {"text": self.text})

    @classmethod
    def from_dict(cls, data: dict) -> Item:
        """Inverse of to_dict."""
        return cls(image=data["image"], label=data["label"], text=data.get("text"))


@dataclass
class ClassTask:
    """A classification task: class ids (folder names), their prompt names, and its items."""

    name: str
    classes: list[str]
    class_names: list[str]
    items: list[Item]


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully as RGB; transparent images (RGBA, LA, palette with transparency) go on white."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


def check_image(path: Path) -> str | None:
    """None if the image decodes, else the reason it does not."""
    try:
        load_image(path)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def default_class_name(class_id: str) -> str:
    """Prompt name of a class folder: '-' and '_' become spaces."""
    return class_id.replace("_", " ").replace("-", " ").strip()


def load_class_names(root: Path, names_file: str | Path | None = None) -> dict[str, str]:
    """Class id -> prompt name from `names_file`, or ROOT/classes.json, or ROOT/../classes.json, else {}."""
    candidates = [Path(names_file)] if names_file else [root / "classes.json", root.parent / "classes.json"]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            if isinstance(data, dict) and isinstance(data.get("classes"), list):
                mapping = _class_entries(path, data["classes"])
            elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
                mapping = dict(data)
            else:
                raise ValueError(f"{path}: expected {{id: name}} or {{'classes': [{{'id', 'name'}}]}}")
            log(f"class names from {path} ({len(mapping)} classes)")
            return mapping
        if names_file:
            raise FileNotFoundError(f"class-names file not found: {path}")
    return {}


def _class_entries(path: Path, entries: list) -> dict[str, str]:
    """prepare's {"classes": [{"id", "name"}, ...]} as id -> name; an entry without both names the file."""
    mapping = {}
    for i, c in enumerate(entries):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{path}: field classes[{i}] needs 'id' and 'name', got {c!r}")
        mapping[str(c["id"])] = str(c["name"])
    return mapping


def discover_image_tasks(root: str | Path, bad: BadFiles, tasks: list[str] | None = None,
                         names_file: str | Path | None = None, validate: bool = True) -> dict[str, ClassTask]:
    """Scan ROOT/<task>/<class>/<image>; unreadable images and empty classes go to `bad`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if tasks:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise FileNotFoundError(f"task folder(s) {missing} not in {root} (found: {found})")
        found = list(tasks)
    names = load_class_names(root, names_file)
    out: dict[str, ClassTask] = {}
    for task in found:
        classes, items = [], []
        for class_dir in sorted(p for p in (root / task).iterdir() if p.is_dir() and not p.name.startswith(".")):
            kept = []
            for path in sorted(class_dir.rglob("*")):
                if not path.is_file() or path.name.startswith("."):
                    continue
                if path.suffix.lower() not in IMAGE_EXTS:
                    bad.report(path, f"not an image (extension {path.suffix or 'none'})")
                    continue
                reason = check_image(path) if validate else None
                if reason:
                    bad.report(path, reason)
                    continue
                kept.append(Item(str(path.relative_to(root)), class_dir.name))
            if not kept:
                bad.report(class_dir, "empty class (no readable image)")
                continue
            classes.append(class_dir.name)
            items += kept
        if len(classes) < 2:
            raise ValueError(f"{root / task}: a task needs at least two classes with images, found {classes}")
        class_names = [names.get(c, default_class_name(c)) for c in classes]
        dupes = sorted({n for n in class_names if class_names.count(n) > 1})
        if dupes:
            raise ValueError(f"{root / task}: classes share the prompt name(s) {dupes}; fix the class-names file")
        out[task] = ClassTask(task, classes, class_names, items)
    if not out:
        raise FileNotFoundError(f"no task folders under {root} (expected ROOT/<task>/<class>/<image>)")
    return out


def read_fusion_jsonl(path: str | Path, bad: BadFiles, select: dict[str, str] | None = None,
                      classes: list[str] | None = None, validate: bool = True) -> list[Item]:
    """Read fusion lines; malformed lines, missing/unreadable images and unknown labels go to `bad`."""
    path = Path(path)
    items = []
    known = set(classes) if classes else None
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.report(where, f"invalid JSON ({exc.msg})")
                continue
            if select and any(str(row.get(k)) != v for k, v in select.items()):
                continue
            label, image, text = row.get("label"), row.get("image"), row.get("text")
            if not isinstance(image, str) or not isinstance(text, str):
                bad.report(where, "needs string fields 'image' and 'text'")
                continue
            labels = label if isinstance(label, list) else [label]
            if not labels or not all(isinstance(x, str) for x in labels):
                bad.report(where, "'label' must be a string or a non-empty list of strings")
                continue
            if known is not None and any(x not in known for x in labels):
                bad.report(where, f"unknown label(s) {[x for x in labels if x not in known]}")
                continue
            image_path = path.parent.resolve() / image
            reason = check_image(image_path) if validate else None
            if reason:
                bad.report(f"{image_path} ({where})", reason)
                continue
            items.append(Item(str(image_path), label, text))
    if not items:
        raise ValueError(f"{path}: no usable lines" + (f" matching {select}" if select else ""))
    return items


def _cache_key(paths: list[Path], preprocess) -> str:
    h = hashlib.sha256(repr(preprocess).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def image_tensors(root: str | Path, items: list[Item], preprocess, bad: BadFiles,
                  cache_dir: str | Path | None = None) -> tuple[torch.Tensor, list[Item]]:
    """Preprocess every item's image once: (N, 3, H, W) float tensor and the items that loaded.

    With `cache_dir`, the tensor is also stored on disk, keyed by the files (path, size, mtime) and the
    preprocessing, so a rerun on the same split skips decoding.
    """
    root = Path(root)
    paths = [root / it.image for it in items]
    key = None
    if cache_dir is not None and all(p.is_file() for p in paths):
        key = _cache_key(paths, preprocess)
        cached = Path(cache_dir) / f"{key}.pt"
        if cached.is_file():
            return torch.load(cached), list(items)
    tensors, kept = [], []
    for item, path in zip(items, paths, strict=True):
        try:
            image = load_image(path)
        except Exception as exc:  # any decoding failure makes it a bad file
            bad.report(path, f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        tensors.append(preprocess(image))
        kept.append(item)
    if not tensors:
        raise ValueError(f"no readable image among {len(items)} items under {root}")
    stacked = torch.stack(tensors)
    if key is not None and len(kept) == len(items):
        # runs sharing a cache each write their own temp file
        atomic_write(Path(cache_dir) / f"{key}.pt", lambda tmp: torch.save(stacked, tmp))
    return stacked, kept
