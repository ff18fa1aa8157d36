"""The front -> engine wire: preprocessed pixels packed as base64, and the items the engine's batchable APIs take."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel


def pack_pixels(pixels: np.ndarray) -> str:
    """Pixels as base64 of their C-order bytes: the front -> engine wire format, float32 (3, S, S) or uint8
    (S, S, 3) (a JSON list of floats is 3.7x larger than float32 and costs ~4 ms per 96 px image to write and parse,
    more than the forward pass; uint8 is 4x smaller again)."""
    dtype = np.uint8 if pixels.dtype == np.uint8 else np.float32
    return base64.b64encode(np.ascontiguousarray(pixels, dtype=dtype).tobytes()).decode("ascii")


def unpack_pixels(data: str, size: int, kind: str = "float32") -> np.ndarray:
    """The inverse of pack_pixels: float32 shaped (3, size, size) or uint8 shaped (size, size, 3) when the length
    fits, else flat (the engine refuses it)."""
    dtype = np.uint8 if kind == "uint8" else np.float32
    try:
        flat = np.frombuffer(base64.b64decode(data, validate=True), dtype=dtype)
    except (binascii.Error, ValueError):
        return np.zeros(0, dtype=dtype)
    if flat.size != 3 * size * size:
        return flat
    return flat.reshape(size, size, 3) if dtype == np.uint8 else flat.reshape(3, size, size)


def pixels_to_tensor(pixels: np.ndarray, finish: Any) -> torch.Tensor | np.ndarray:
    """Engine side of the wire: uint8 (S, S, 3) through the transform's tensor part (`finish`); float32 as is."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or finish is None:
        return pixels
    return finish(pixels.copy())  # frombuffer arrays are read-only; to_tensor wants a writable one


class ClassifyItem(BaseModel):
    """One classification request as the engine's batchable API receives it."""

    image: str  # pack_pixels of the preprocessed image
    task: str
    top_k: int = 5
    pixels: str = "float32"  # float32: (3, S, S) after the whole transform; uint8: (S, S, 3) before ToTensor


class FuseItem(BaseModel):
    """One fusion request as the engine's batchable API receives it."""

    image: str  # pack_pixels of the preprocessed image
    text: str
    task: str
    pixels: str = "float32"  # as ClassifyItem.pixels


class EmbedItem(BaseModel):
    """One embedding request as the engine's batchable API receives it: an image and/or a text."""

    image: str | None = None  # pack_pixels of the preprocessed image
    text: str | None = None
    task: str | None = None  # a classification task whose prompts to embed through; None: the bare backbone
    pixels: str = "float32"  # as ClassifyItem.pixels


class LabelsItem(BaseModel):
    """One open-vocabulary request: rank the caller's labels for an image (task None: zero-shot)."""

    image: str  # pack_pixels of the preprocessed image
    labels: list[str]
    task: str | None = None
    top_k: int = 5
    pixels: str = "float32"  # as ClassifyItem.pixels
