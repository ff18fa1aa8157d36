"""Openclipart drawings: titles and keywords from the SVG metadata, pictures from the shipped PNGs."""

from __future__ import annotations

import html
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .captions import clean_text, words_from_name

_TITLE = re.compile(r"<dc:title[^>]*>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject[^>]*>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li[^>]*>(.*?)</rdf:li>", re.S)
_CLIPART_WORD = re.compile(r"\bclip ?arts?\b", re.I)

# titles that name a collection, a theme or an uploader rather than the drawing (inspected in the data)
BOILERPLATE_TITLES: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.I) for p in (
    r"^part of the .*collection",    # "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)" x950
    r"\btheme\b",                    # "Lemon SVG theme", "gold-theme", "plastik-icon-theme"
    r"icon ?set|\bicons\b",          # "blueberry - iconset", "Etiquette Icons"
    r"^clipart by ",                 # "Clipart by Nicu Buculei - piggybank" (often the wrong drawing)
    r"^various cliparts?$",
    r"^gramastar$",                  # 1,375 generated star shapes
    r"s[ui]bmission",                # "R16 sibmission"
    r"collection",                   # "SVG Gradient Collection by Alan Horkan, 2004."
    r"^aiga_symbol_signs$",
    r"^svg road signs$",
    r"^untitled",
    r"^architetto francesco rollandin",  # the uploader's name used as a title
))
# titles that are right but ambiguous, replaced by a clearer phrase
TITLE_REWRITES: dict[str, str] = {"card": "playing card"}
_AUTHOR_SUFFIX = re.compile(r"(^|_)architetto.*$", re.I)
# keywords that are tagging noise, not content
NOISE_KEYWORDS: frozenset[str] = frozenset({
    "", "hash", "magick", "icons", "icon", "theme", "lemon_theme_icon", "mapsym", "networksym", "weathersym",
    "musicsym", "appicon", "openclipart", "unsorted", "special", "miscellany", "creation", "stock", "clip art",
    "clipart", "image", "media", "svg", "png", "public domain", "externalsource", "architetto francesco rollandin",
})
# folder names that carry no content
NOISE_FOLDERS: frozenset[str] = frozenset({"icons", "flat-theme", "lemon-theme", "unsorted", "special", "misc"})
# folders with many near-identical drawings: keep a seeded sample of at most this many
FOLDER_CAPS: dict[str, int] = {"shapes/stars": 100, "special/gradients": 30, "special/patterns": 50}


@dataclass
class Drawing:
    """One openclipart drawing: its PNG and the text describing it."""

    png: Path
    title: str
    keywords: list[str] = field(default_factory=list)
    folder_words: list[str] = field(default_factory=list)
    title_from_filename: bool = False


def is_boilerplate(title: str) -> bool:
    """Whether an SVG title is collection/theme boilerplate rather than a description."""
    return any(p.search(title) for p in BOILERPLATE_TITLES)


def parse_svg_metadata(svg_path: Path) -> tuple[str, list[str]]:
    """The first `<dc:title>` and the `<rdf:li>` keywords of `<dc:subject>` in an SVG file."""
    text = svg_path.read_text(errors="replace")
    m = _TITLE.search(text)
    title = clean_text(html.unescape(m.group(1))) if m else ""
    keywords: list[str] = []
    subject = _SUBJECT.search(text)
    if subject:
        for kw in _LI.findall(subject.group(1)):
            kw = clean_text(html.unescape(kw)).lower()
            if kw in NOISE_KEYWORDS or kw.startswith("hash(") or any(c.isdigit() for c in kw):
                continue
            kw = kw.replace("_", " ")
            if kw not in keywords:
                keywords.append(kw)
    return title, keywords


def folder_words(rel_dir: Path) -> list[str]:
    """Readable words of the category folders a drawing sits in (icon-theme folders dropped)."""
    keep = [p for p in rel_dir.parts if p not in NOISE_FOLDERS and not p.endswith("-theme")]
    return [w for w in (words_from_name(p) for p in keep) if w]


def clean_title(title: str) -> str:
    """Drop "clipart"/"clip art" filler words from a title."""
    return clean_text(_CLIPART_WORD.sub(" ", title.replace("_", " ")))


def scan_openclipart(root: Path, seed: int = 0) -> tuple[list[Drawing], dict[str, int]]:
    """Pair `root/png/**.png` with `root/svg/**.svg` metadata; return drawings and counts of what was dropped."""
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise FileNotFoundError(f"{png_root}: openclipart PNGs not found (Debian package openclipart-png)")
    stats = {"no_svg": 0, "boilerplate_title": 0, "no_title": 0, "capped": 0}
    by_folder: dict[str, list[Drawing]] = {}
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root)
        svg = svg_root / rel.with_suffix(".svg")
        title, keywords = "", []
        if svg.is_file():
            try:
                title, keywords = parse_svg_metadata(svg)
            except OSError as exc:
                print(f"[clipart] {svg}: cannot read metadata ({exc}); using the file name")
        else:
            stats["no_svg"] += 1
        from_name = False
        if not title or is_boilerplate(title):
            stats["boilerplate_title" if title else "no_title"] += 1
            title, from_name = words_from_name(_AUTHOR_SUFFIX.sub("", rel.stem)), True
            if not title:
                title = " ".join(keywords[:2]) or " ".join(folder_words(rel.parent)[-1:])
        if not title:
            continue
        title = clean_title(title) or title.replace("_", " ")
        title = TITLE_REWRITES.get(title.lower(), title)
        by_folder.setdefault(rel.parent.as_posix(), []).append(
            Drawing(png=png, title=title, keywords=keywords, folder_words=folder_words(rel.parent),
                    title_from_filename=from_name))
    rng = random.Random(seed)
    drawings: list[Drawing] = []
    for folder, items in sorted(by_folder.items()):
        cap = FOLDER_CAPS.get(folder)
        if cap is not None and len(items) > cap:
            stats["capped"] += len(items) - cap
            items = sorted(rng.sample(items, cap), key=lambda d: d.png)
        drawings.extend(items)
    return drawings, stats
