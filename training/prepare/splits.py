"""Seeded splits: held-out emoji identities shared by all tasks, and a stable validation slice."""

from __future__ import annotations

import random
import zlib


def heldout_identities(members: dict[str, list[str]], seed: int = 0, test_fraction: float = 0.5,
                       min_test: int = 5) -> dict[str, dict[str, list[str]]]:
    """Per class, split its emoji hexcodes into train and test (at least `min_test` test, at least one train)."""
    out: dict[str, dict[str, list[str]]] = {}
    for class_id in sorted(members):
        items = sorted(members[class_id])
        rng = random.Random(f"{seed}:{class_id}")
        n_test = max(min_test, round(len(items) * test_fraction))
        n_test = min(n_test, len(items) - 1)
        test = set(rng.sample(items, n_test)) if n_test > 0 else set()
        out[class_id] = {"train": [h for h in items if h not in test], "test": [h for h in items if h in test]}
    return out


def in_val_slice(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether a key (e.g. an image path) falls in the held-out validation slice; stable across runs and order."""
    return zlib.crc32(f"{seed}:{key}".encode()) % 100_000 < fraction * 100_000
