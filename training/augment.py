"""RandAug on the trainers' cached image tensors (normalised floats): undo Normalize, RandAugment, normalise again.

The trainers cache every image once, through the backbone's eval transform (resize, crop, ToTensor, Normalize), so
augmentation works on those tensors: each sample is mapped back to 8-bit pixels, gets torchvision's RandAugment
(its own draw of ops and magnitudes per sample, from torch's global generator, so a seeded run is repeatable) and
is normalised again. Same resolution and crop as the eval transform; only RandAugment's ops differ per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def normalize_stats(preprocess: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (3, 1, 1) tensors of the Normalize that ends the backbone's eval transform."""
    from torchvision.transforms import Normalize

    steps = list(getattr(preprocess, "transforms", []))
    norm = next((t for t in reversed(steps) if isinstance(t, Normalize)), None)
    if norm is None:
        raise ValueError("RandAug needs an eval transform ending in Normalize (open_clip's); this one has none")
    return (torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1),
            torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1))


class TensorRandAugment:
    """RandAugment (num_ops, magnitude: torchvision's defaults 2 and 9) on a batch of normalised images."""

    def __init__(self, preprocess: Callable, num_ops: int = 2, magnitude: int = 9):
        from torchvision.transforms import v2

        self.mean, self.std = normalize_stats(preprocess)
        self.op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented copy of images (B, 3, H, W), each sample with its own ops; same dtype and device."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = ((images.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        out = torch.stack([self.op(p) for p in pixels.cpu()]).to(images.device)
        return ((out.float() / 255 - mean) / std).to(images.dtype)
