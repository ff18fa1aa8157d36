"""Decode untrusted image uploads: every way an upload can be unusable becomes an ImageError (HTTP 400).

Uploads are decoded here rather than through a PIL-typed API argument so that a file that is not an image, a
truncated one or a decompression bomb is a clear 400 for that request instead of a 500 from the framework.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmserve.backbone import Backbone
from mmserve.errors import MmserveError

ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MAX_ASPECT = 100  # long side / short side: the transform scales the short side up to the model size


class ImageError(MmserveError, ValueError):
    """The upload is not a usable image; the message says why and is safe to show the client."""


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # the pixel limit below is ours; Pillow's own warning threshold would only add noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise ImageError("not an image: the upload is in no format Pillow can identify") from None
        except MemoryError:
            raise
        except Exception as exc:  # any failure to parse untrusted bytes is the upload's fault
            raise ImageError(f"not a readable image: {exc.__class__.__name__}: {exc}") from None


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale to 8-bit L (Pillow's convert() would clip instead of scale).

    I;16 modes have a known range (0..65535); only 32-bit 'I' and float 'F' guess theirs from the peak value.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale = 65535.0
    else:
        peak = float(arr.max()) if arr.size else 0.0
        scale = 1.0 if peak <= 1.0 and img.mode == "F" else (65535.0 if peak > 255 else 255.0)
    return Image.fromarray(np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any decoded image; transparent pixels are composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_BIT_MODES:
        return _high_bit_to_l(img).convert("RGB")
    has_alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {img.mode!r}: {exc}") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an upload to an RGB image, refusing empty, non-image, truncated and oversized (bomb) inputs."""
    if not data:
        raise ImageError("empty upload: the image part has no bytes")
    img = _open(data)
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                         f"(decompression bomb guard, MMSERVE_MAX_IMAGE_PIXELS)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"image is {width}x{height} px: aspect ratio over {MAX_ASPECT}:1")
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated files raise OSError, broken chunks SyntaxError/ValueError/EOFError
        raise ImageError(f"truncated or corrupt image: {exc.__class__.__name__}: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image; orientation is a nicety
        pass
    return to_rgb(img)


def preprocess_config(backbone: Backbone) -> dict[str, Any]:
    """The backbone's image preprocessing as plain JSON-able data (open_clip's PreprocessCfg fields)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.model.visual.preprocess_cfg.items()}


def preprocess_from_config(config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Rebuild the backbone's eval transform from `preprocess_config` output, without loading any weights."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def split_preprocess(preprocess: Callable[[Image.Image], torch.Tensor]
                     ) -> tuple[Callable[[Image.Image], Image.Image], Callable[[Any], torch.Tensor]] | None:
    """An eval transform ending in ToTensor + Normalize (open_clip's), split there: (PIL part, tensor part).

    The PIL part (resize, crop, mode) ends in 8-bit pixels, so its output travels as uint8 (4x fewer bytes
    than float32) and the tensor part, applied to that uint8 array, gives the same floats as the whole
    transform. None for any other transform shape (callers then send float32 pixels).
    """
    from torchvision.transforms import Compose, Normalize

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or \
            type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    return Compose(steps[:-2]), Compose(steps[-2:])


@dataclass(frozen=True)
class ImageDecoder:
    """Upload bytes -> preprocessed float tensor (3, S, S) for the image tower (or its uint8 pixels, `pixels`)."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    max_pixels: int = 40_000_000

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode, validate and preprocess one upload; raises ImageError on bad input."""
        return self.preprocess(decode_image(data, self.max_pixels))

    @cached_property
    def split(self) -> tuple[Callable[[Image.Image], Image.Image], Callable[[Any], torch.Tensor]] | None:
        """split_preprocess of the transform, computed once (not per request)."""
        return split_preprocess(self.preprocess)

    def pixels(self, data: bytes) -> np.ndarray:
        """Decode and validate one upload, stopping before ToTensor when the transform allows it.

        uint8 (S, S, 3) after resize/crop (finish with `split_preprocess(...)[1]`), else the float32 (3, S, S)
        of the whole transform. Raises ImageError on bad input.
        """
        image = decode_image(data, self.max_pixels)
        split = self.split
        if split is None:
            return self.preprocess(image).numpy()
        out = np.asarray(split[0](image), dtype=np.uint8)
        if out.ndim != 3 or out.shape[2] != 3:
            raise ImageError(f"preprocessing gave pixels of shape {out.shape}, not (S, S, 3)")
        return out
