"""Emoji metadata (emojibase) and SVG sources for the seven drawing styles."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .sources import SourceError, read_json

# style -> iconify package (None: the openmoji npm package's black/svg line art)
STYLE_PACKAGES: dict[str, str | None] = {
    "noto": "noto",
    "twemoji": "twemoji",
    "openmoji": "openmoji",
    "openmoji_line": None,
    "fluent": "fluent-emoji",
    "fluent_flat": "fluent-emoji-flat",
    "fluent_mono": "fluent-emoji-high-contrast",
}
TASK_STYLES: tuple[str, ...] = ("noto", "twemoji", "fluent_flat", "openmoji_line", "fluent_mono")


PRETRAIN_STYLES: tuple[str, ...] = ("openmoji", "fluent")
# iconify packages whose chars.json is empty: borrow the char->name mapping of a sibling package
CHARS_FALLBACK: dict[str, str] = {"fluent-emoji": "fluent-emoji-flat"}


def npm_package(style: str) -> str:
    """The npm package a style's drawings come from."""
    package = STYLE_PACKAGES[style]
    return "openmoji" if package is None else f"@iconify-json/{package}"

# readable class names where "replace hyphens by spaces" reads badly
CLASS_NAME_OVERRIDES: dict[str, str] = {
    "alphanum": "letters and numbers",
    "av-symbol": "audio video symbol",
    "book-paper": "book and paper",
    "face-concerned": "concerned face",
    "face-neutral-skeptical": "neutral face",
    "face-smiling": "smiling face",
    "face-unwell": "unwell face",
    "hand-fingers-open": "open hand",
    "light-video": "light and video",
    "other-symbol": "other symbol",
    "place-other": "other place",
    "plant-other": "other plant",
    "sky-weather": "sky and weather",
}


def normalise_hexcode(hexcode: str) -> str:
    """Upper-case dash-joined codepoints without the FE0F variation selector."""
    parts = hexcode.replace("_", "-").upper().split("-")
    return "-".join(p for p in parts if p and p != "FE0F")


def class_name(subgroup: str) -> str:
    """Human-readable class name of an emojibase subgroup id, for zero-shot prompts."""
    return CLASS_NAME_OVERRIDES.get(subgroup, subgroup.replace("-", " "))


@dataclass
class EmojiInfo:
    """One emoji's emojibase metadata."""

    hexcode: str
    char: str
    name: str
    subgroup: str
    group: str
    tags: list[str] = field(default_factory=list)


def load_emojibase(npm_root: Path) -> dict[str, EmojiInfo]:
    """Load emojibase-data `en/data.json`: normalised hexcode -> EmojiInfo (entries without subgroup skipped)."""
    data_path = npm_root / "emojibase-data" / "en" / "data.json"
    meta_path = npm_root / "emojibase-data" / "meta" / "groups.json"
    data = read_json(data_path)
    meta = read_json(meta_path)
    if not isinstance(data, list):
        raise SourceError(f"{data_path}: expected a list of emoji entries, found {type(data).__name__}")
    for key in ("subgroups", "groups"):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), dict):
            raise SourceError(f"{meta_path}: no object field {key!r}")
    subgroups, groups = meta["subgroups"], meta["groups"]
    out: dict[str, EmojiInfo] = {}
    for i, row in enumerate(data):
        if "subgroup" not in row:  # regional indicators, components
            continue
        for key in ("hexcode", "label", "emoji", "group"):
            if key not in row:
                raise SourceError(f"{data_path}: entry {i} has no field {key!r}")
        sub = subgroups.get(str(row["subgroup"]))
        if sub is None:
            raise SourceError(f"{meta_path}: no subgroup {row['subgroup']!r} (used by {data_path} entry {i})")
        hexcode = normalise_hexcode(row["hexcode"])
        out[hexcode] = EmojiInfo(hexcode=hexcode, char=row["emoji"], name=row["label"], subgroup=sub,
                                 group=groups.get(str(row["group"]), str(row["group"])),
                                 tags=[str(t) for t in row.get("tags", [])])
    return out


class IconifySet:
    """An @iconify-json icon set: emoji hexcode -> standalone SVG markup."""

    def __init__(self, npm_root: Path, package: str) -> None:
        base = npm_root / "@iconify-json"
        self.path = base / package / "icons.json"
        data = read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
            raise SourceError(f"{self.path}: no object field 'icons'")
        self.icons: dict = data["icons"]
        self.aliases: dict = data.get("aliases", {})
        self.width = data.get("width", 16)
        self.height = data.get("height", 16)
        chars_path = base / package / "chars.json"
        chars = read_json(chars_path)
        if not chars and package in CHARS_FALLBACK:
            chars_path = base / CHARS_FALLBACK[package] / "chars.json"
            chars = read_json(chars_path)
        if not isinstance(chars, dict):
            raise SourceError(f"{chars_path}: expected an object (emoji -> icon name), found {type(chars).__name__}")
        self.names: dict[str, str] = {}
        for char, name in chars.items():
            if name in self.icons or name in self.aliases:
                self.names.setdefault(normalise_hexcode(char), name)

    def hexcodes(self) -> set[str]:
        """Normalised hexcodes this set can draw."""
        return set(self.names)

    def _resolve(self, name: str) -> tuple[dict, bool, bool, int]:
        """Follow aliases to an icon; return it with the accumulated hFlip, vFlip, rotate."""
        hflip = vflip = False
        rotate = 0
        seen: set[str] = set()
        while name not in self.icons:
            if name in seen or name not in self.aliases:
                raise KeyError(f"{self.path}: icon {name!r} not found")
            seen.add(name)
            alias = self.aliases[name]
            hflip ^= bool(alias.get("hFlip", False))
            vflip ^= bool(alias.get("vFlip", False))
            rotate += int(alias.get("rotate", 0))
            name = alias["parent"]
        return self.icons[name], hflip, vflip, rotate % 4

    def svg(self, hexcode: str) -> str:
        """Standalone SVG markup of one emoji (iconify body wrapped in an <svg> with its viewBox)."""
        icon, hflip, vflip, rotate = self._resolve(self.names[hexcode])
        if "body" not in icon:
            raise KeyError(f"{self.path}: icon {self.names[hexcode]!r} has no field 'body'")
        left, top = icon.get("left", 0), icon.get("top", 0)
        w, h = icon.get("width", self.width), icon.get("height", self.height)
        hflip ^= bool(icon.get("hFlip", False))
        vflip ^= bool(icon.get("vFlip", False))
        rotate = (rotate + int(icon.get("rotate", 0))) % 4
        body = icon["body"]
        transforms = []
        if hflip:
            transforms.append(f"translate({2 * left + w} 0) scale(-1 1)")
        if vflip:
            transforms.append(f"translate(0 {2 * top + h}) scale(1 -1)")
        if rotate:
            transforms.append(f"rotate({90 * rotate} {left + w / 2} {top + h / 2})")
        if transforms:
            body = f'<g transform="{" ".join(transforms)}">{body}</g>'
        return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                f'viewBox="{left} {top} {w} {h}" width="{w}" height="{h}" color="#000000">{body}</svg>')


class OpenmojiLineSet:
    """The `openmoji` npm package's black (line art) SVG files."""

    def __init__(self, npm_root: Path) -> None:
        self.dir = npm_root / "openmoji" / "black" / "svg"
        self.files = {normalise_hexcode(p.stem): p for p in sorted(self.dir.glob("*.svg"))}

    def hexcodes(self) -> set[str]:
        """Normalised hexcodes this set can draw."""
        return set(self.files)

    def svg(self, hexcode: str) -> str:
        """SVG markup of one emoji's line art."""
        return self.files[hexcode].read_text(encoding="utf-8", errors="replace")


StyleSource = IconifySet | OpenmojiLineSet


def load_styles(npm_root: Path, styles: tuple[str, ...] = tuple(STYLE_PACKAGES)) -> dict[str, StyleSource]:
    """Load the SVG source of each style."""
    out: dict[str, StyleSource] = {}
    for style in styles:
        package = STYLE_PACKAGES[style]
        out[style] = OpenmojiLineSet(npm_root) if package is None else IconifySet(npm_root, package)
    return out


def select_task_emoji(emoji: dict[str, EmojiInfo], styles: dict[str, StyleSource],
                      min_per_class: int = 10) -> dict[str, EmojiInfo]:
    """Emoji drawn in every style whose subgroup has at least `min_per_class` such emoji."""
    common = set(emoji).intersection(*(s.hexcodes() for s in styles.values()))
    counts: dict[str, int] = {}
    for h in common:
        counts[emoji[h].subgroup] = counts.get(emoji[h].subgroup, 0) + 1
    return {h: emoji[h] for h in sorted(common) if counts[emoji[h].subgroup] >= min_per_class}

