"""Tiny generated data sets (coloured shapes) for tests and smoke runs: no download, seconds to make."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "car", "tree")


def draw_shape(colour: str, shape: str, size: int, rng: random.Random, rgba: bool = False) -> Image.Image:
    """One shape of `colour` at a random place and scale, on white (or on transparency when `rgba`)."""
    mode, bg = ("RGBA", (0, 0, 0, 0)) if rgba else ("RGB", (255, 255, 255))
    img = Image.new(mode, (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLOURS[colour] + ((255,) if rgba else ())
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_image_task(root: str | Path, task: str, classes: dict[str, str], n_per_class: int, size: int = 32,
                     seed: int = 0, rgba: bool = False) -> Path:
    """ROOT/<task>/<class>/<i>.png where class folder `c` holds shapes of colour `classes[c]` (random shape).

    Mapping a class to another class's colour makes a task with permuted labels.
    """
    rng = random.Random(f"{seed}:{task}")
    for cls, colour in classes.items():
        folder = Path(root) / task / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            draw_shape(colour, rng.choice(SHAPES), size, rng, rgba).save(folder / f"{cls}{i:03d}.png")
    return Path(root) / task


def write_fusion_jsonl(path: str | Path, n: int, size: int = 32, seed: int = 0, multilabel: bool = False,
                       colours: tuple[str, ...] = ("red", "blue"), words: tuple[str, ...] = ("cat", "dog")) -> Path:
    """Fusion lines whose label needs both modalities: the image gives a colour, the text a word.

    Multi-class label "<colour>-<word>"; multi-label ["<colour>", "<word>"].
    """
    path = Path(path)
    images = path.parent / f"{path.stem}_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:{path.name}")
    with path.open("w") as f:
        for i in range(n):
            colour, word = colours[i % len(colours)], words[(i // len(colours)) % len(words)]
            name = f"{i:04d}.png"
            draw_shape(colour, rng.choice(SHAPES), size, rng).save(images / name)
            label = [colour, word] if multilabel else f"{colour}-{word}"
            f.write(json.dumps({"image": f"{images.name}/{name}", "text": f"a picture of a {word}",
                                "label": label}) + "\n")
    return path
