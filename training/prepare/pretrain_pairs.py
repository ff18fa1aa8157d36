"""The pretraining caption files: tab-separated `filepath` / `title` rows as open_clip_train's CSV loader reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmserve.fileio import atomic_write_bytes

from .captions import clean_text
from .splits import in_val_slice


@dataclass
class Pair:
    """One pretraining picture with its caption variants and the source it came from."""

    image: Path
    captions: list[str]
    source: str
    extra: dict = field(default_factory=dict)


def write_caption_csv(path: Path, pairs: list[Pair]) -> int:
    """Write a TSV with header `filepath\\ttitle`, one row per caption variant; return the row count."""
    rows = ["filepath\ttitle\n"]
    for pair in pairs:
        image = str(pair.image.resolve())
        if "\t" in image or "\n" in image:
            raise ValueError(f"{image}: image path holds a tab or newline (field filepath)")
        rows += [f"{image}\t{caption}\n" for caption in map(clean_text, pair.captions) if caption]
    atomic_write_bytes(path, "".join(rows).encode("utf-8"))
    return len(rows) - 1


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Split pictures (all captions of a picture together) into train and a small validation slice."""
    train, val = [], []
    for pair in pairs:
        (val if in_val_slice(str(pair.image), val_fraction, seed) else train).append(pair)
    return train, val
