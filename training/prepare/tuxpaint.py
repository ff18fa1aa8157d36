"""Tux Paint stamps: cut-out photos and cartoons with a one-line English description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .captions import clean_text, words_from_name

SKIP_SUFFIXES: tuple[str, ...] = ("_back", "_mirror")  # flipped/back copies of another stamp


@dataclass
class Stamp:
    """One Tux Paint stamp: its picture (PNG or SVG) and description."""

    path: Path
    description: str
    folder_words: list[str] = field(default_factory=list)

    @property
    def is_svg(self) -> bool:
        """Whether the picture is an SVG (needs rendering)."""
        return self.path.suffix.lower() == ".svg"


def read_description(txt: Path) -> str:
    """First line of a stamp's NAME.txt (the English description), without the trailing period."""
    lines = txt.read_text(errors="replace").splitlines()
    first = clean_text(lines[0]) if lines else ""
    return first.rstrip(".").strip()


def scan_stamps(root: Path) -> tuple[list[Stamp], dict[str, int]]:
    """All stamps under `root` (PNG preferred over an SVG of the same name); return them and skip counts."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Tux Paint stamps not found (Debian package tuxpaint-stamps-default)")
    stats = {"mirror_or_back": 0, "svg_with_png": 0, "no_txt": 0}
    chosen: dict[Path, Path] = {}
    for path in sorted([*root.rglob("*.png"), *root.rglob("*.svg")]):
        stem = path.with_suffix("")
        if stem.name.endswith(SKIP_SUFFIXES):
            stats["mirror_or_back"] += 1
            continue
        if stem in chosen:
            stats["svg_with_png"] += 1
            if path.suffix.lower() == ".png":
                chosen[stem] = path
            continue
        chosen[stem] = path
    stamps: list[Stamp] = []
    for stem, path in sorted(chosen.items()):
        txt = stem.with_suffix(".txt")
        desc = ""
        if txt.is_file():
            try:
                desc = read_description(txt)
            except OSError as exc:
                print(f"[tuxpaint] {txt}: cannot read description ({exc}); using the file name")
        else:
            stats["no_txt"] += 1
        desc = desc or words_from_name(stem.name)
        if not desc:
            continue
        rel_dir = path.parent.relative_to(root)
        words = [w for w in (words_from_name(p) for p in rel_dir.parts) if w]
        stamps.append(Stamp(path=path, description=desc, folder_words=words))
    return stamps, stats
