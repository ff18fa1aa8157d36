"""Caption variants for the pretraining image-text pairs."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")
_TOKEN_SPLIT = re.compile(r"[_\-\s.,+()\[\]]+")


def clean_text(text: str) -> str:
    """One line of text without tabs, newlines or double quotes (safe for the TSV caption file)."""
    text = text.replace('"', "").replace("\t", " ").replace("\r", " ").replace("\n", " ")
    return _SPACE.sub(" ", text).strip()


def words_from_name(stem: str) -> str:
    """Readable words from a file or folder name: split on _-., strip trailing digits, drop other digit tokens."""
    tokens = [t.rstrip("0123456789") for t in _TOKEN_SPLIT.split(stem)]
    return " ".join(t for t in tokens if t and not any(c.isdigit() for c in t))


def _dedupe(items: list[str]) -> list[str]:
    """Keep the first occurrence of each non-empty item (case-insensitive)."""
    seen: set[str] = set()
    out = []
    for item in items:
        item = clean_text(item)
        key = item.lower()
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _article(word: str) -> str:
    """`a` or `an` for a following word."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _lower_article(text: str) -> str:
    """Lower-case a leading article so "A duck" reads well after "a picture of"."""
    first, _, rest = text.partition(" ")
    if rest and first in ("A", "An", "The"):
        return f"{first.lower()} {rest}"
    return text


def drawing_captions(title: str, keywords: list[str], folder_words: list[str], kind: str = "drawing") -> list[str]:
    """Three variants for a clipart drawing: title; "a drawing of <title>"; title + keywords + folder words."""
    title = clean_text(title)
    extra = _dedupe([*keywords, *folder_words])
    extra = [w for w in extra if w.lower() not in title.lower().split()]
    out = [title, f"{_article(kind)} {kind} of {_lower_article(title)}"]
    if extra:
        out.append(f"{title}, {', '.join(extra[:8])}")
    return _dedupe(out)


def class_word_captions(class_words: str) -> list[str]:
    """The bare class words, as zero-shot prompts spell them ("animal mammal", "an animal mammal")."""
    class_words = clean_text(class_words)
    return [class_words, f"{_article(class_words)} {class_words}"]


def emoji_captions(name: str, class_words: str, tags: list[str]) -> list[str]:
    """Five variants for an emoji picture; they include the readable class name used by zero-shot prompts."""
    name = clean_text(name)
    tags = [t for t in _dedupe(tags) if t.lower() != name.lower()]
    out = [
        name,
        f"an emoji of {name}",
        f"{_article(class_words)} {class_words} emoji: {name}",
        f"a picture of {_article(class_words)} {class_words}: {name}",
    ]
    if tags:
        out.append(f"{name}, {', '.join(tags[:6])}")
    return _dedupe(out)
