"""Image-tower runtimes: the one piece of a request's forward pass that differs between torch and onnxruntime.

`RUNTIMES` names them (MMSERVE_RUNTIME); `make_runtime` builds one for a backbone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

from mmserve.backbone import Backbone
from mmserve.encoders import PromptedImageEncoder
from mmserve.errors import RuntimeUnavailableError
from mmserve.fusion import FusionModel


class ImageRuntime(Protocol):
    """Runs the prompted image tower (and the MoPE fusion path) on a batch; torch and ONNX implement it."""

    name: str

    def prepare(self, shapes: Iterable[tuple[int, int]], fusion: Mapping[str, tuple[FusionModel, int]]) -> None:
        """Make ready everything a registry version needs before it is served: prompt shapes (K, P) of its classify
        tasks and its fusion tasks (model, psi dim); raises if one cannot be served."""
        ...

    def encode(self, images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """Normalised image features (B, E) for images (B, 3, H, W) with per-sample prompts (B, K, P, d_v)."""
        ...

    def fuse(self, task: str, model: FusionModel, images: torch.Tensor, psi: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion logits (B, C) and routing scores (B, K, k) of fusion task `task` for images and psi (B, d_psi)."""
        ...


class TorchImageRuntime:
    """Eager PyTorch runtime: open_clip's blocks called by the prompted image encoder."""

    name = "torch"

    def __init__(self, backbone: Backbone):
        self.encoder = PromptedImageEncoder(backbone)

    def prepare(self, shapes: Iterable[tuple[int, int]], fusion: Mapping[str, tuple[FusionModel, int]]) -> None:
        """Nothing to open: eager torch runs any shape."""

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """Normalised image features (B, E)."""
        return self.encoder(images, prompts)

    @torch.inference_mode()
    def fuse(self, task: str, model: FusionModel, images: torch.Tensor, psi: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion logits and routing scores."""
        out = model(self.encoder, images, psi)
        return out.logits, out.routing


def _onnx_runtime(backbone: Backbone) -> ImageRuntime:
    """onnxruntime engine; graphs from MMSERVE_ONNX_DIR (default models/onnx), see mmserve.onnx.runtime."""
    from mmserve.onnx.runtime import OnnxImageRuntime  # onnxruntime is optional: imported only when asked for

    return OnnxImageRuntime(backbone)


RUNTIMES: dict[str, Callable[[Backbone], ImageRuntime]] = {"torch": TorchImageRuntime, "onnx": _onnx_runtime}


def check_runtime(name: str) -> None:
    """Raise RuntimeUnavailableError unless runtime `name` can be built here."""
    if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailableError(
            "runtime 'onnx' needs onnxruntime: pip install 'mmserve[cpu]' (or 'mmserve[gpu]' for onnxruntime-gpu)")
    if name in RUNTIMES:
        return
    raise RuntimeUnavailableError(f"unknown runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})")


def make_runtime(name: str, backbone: Backbone) -> ImageRuntime:
    """The image-tower runtime `name` (MMSERVE_RUNTIME)."""
    check_runtime(name)
    return RUNTIMES[name](backbone)
