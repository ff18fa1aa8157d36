"""Monochrome drawings derived from the Fluent colour (3D) pretraining emoji: line art and white-lined silhouettes.

The experiment of docs/backbone.md: no pretraining picture is line art or a black silhouette, and the two
monochrome task styles gain least from pretraining. Only Fluent colour pictures are transformed: thresholding
OpenMoji colour would re-create OpenMoji's own black line art, which is a task style (openmoji_line), while
Fluent's shaded 3D renders give generic outlines that no task style draws.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from PIL import Image, ImageChops, ImageFilter, ImageOps

from mmserve.fileio import atomic_write

from .captions import class_word_captions
from .emoji import class_name, npm_package
from .pretrain_pairs import Pair
from .sources import installed_version

SOURCE_STYLE = "fluent"  # the pretraining emoji style transformed (see the module docstring)
EDGE_THRESHOLD = 40  # FIND_EDGES response above which a pixel is an edge
WHITE = 245  # grey level at or above which a pixel is background
RECIPE = 1  # bump when line_art / silhouette draw differently: cached versions are then made again


def _edges(grey: Image.Image) -> Image.Image:
    """Edge mask of a grey picture (255 = edge), on a white-padded copy so the picture's frame is no edge."""
    padded = ImageOps.expand(grey, border=2, fill=255)
    edges = padded.filter(ImageFilter.FIND_EDGES).crop((2, 2, 2 + grey.width, 2 + grey.height))
    return edges.point(lambda v: 255 if v > EDGE_THRESHOLD else 0)


def line_art(image: Image.Image) -> Image.Image:
    """Black outlines on white: the picture's edges."""
    return ImageOps.invert(_edges(ImageOps.grayscale(image))).convert("RGB")


def silhouette(image: Image.Image) -> Image.Image:
    """A black silhouette of every non-white pixel, with the picture's inner edges drawn in white."""
    grey = ImageOps.grayscale(image)
    shape = grey.point(lambda v: 255 if v < WHITE else 0)
    inner_edges = ImageChops.multiply(_edges(grey), shape.filter(ImageFilter.MinFilter(5)))
    return ImageChops.lighter(ImageOps.invert(shape), inner_edges).convert("RGB")


TRANSFORMS = {"line": line_art, "silhouette": silhouette}


def mono_made_from(npm_root: Path, size: int) -> dict:
    """What the cached monochrome pictures are made from (their render-cache stamp, see stamps.py)."""
    package = npm_package(SOURCE_STYLE)
    return {"from": package, "version": installed_version(npm_root, package), "size": size,
            "edge_threshold": EDGE_THRESHOLD, "white": WHITE, "recipe": RECIPE}


def monochrome_pairs(pairs: list[Pair], out_dir: Path) -> list[Pair]:
    """For each Fluent colour emoji pair, its line art and its silhouette (written once under `out_dir`, then
    cached), each captioned with only its class's bare words."""
    out: list[Pair] = []
    for pair in pairs:
        if pair.source != f"emoji_{SOURCE_STYLE}":
            continue
        image = None
        for name, transform in TRANSFORMS.items():
            path = out_dir / f"{SOURCE_STYLE}-{name}" / pair.image.name
            if not path.exists():
                image = image or Image.open(pair.image).convert("RGB")
                atomic_write(path, partial(transform(image).save, format="PNG"))
            out.append(replace(pair, image=path, captions=class_word_captions(class_name(pair.extra["subgroup"])),
                               source=f"emoji_{SOURCE_STYLE}_{name}"))
    return out
