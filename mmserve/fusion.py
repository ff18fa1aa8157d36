"""The trainable part of a fusion task: MoPE prompts for the image tower plus a linear head over both modalities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmserve.encoders import PromptedImageEncoder
from mmserve.errors import PromptConfigError
from mmserve.prompts.mope import MoPE, MoPEConfig
from mmserve.prompts.table import register_method

HEADS = ("multiclass", "multilabel")


def head_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax for multi-class heads, independent sigmoids for multi-label heads."""
    return logits.sigmoid() if multilabel else logits.softmax(dim=-1)


@dataclass
class FusionOutput:
    """Head logits (B, C) and the routing scores (B, K, k) behind them."""

    logits: torch.Tensor
    routing: torch.Tensor

    def probabilities(self, multilabel: bool) -> torch.Tensor:
        """Softmax for multi-class heads, independent sigmoids for multi-label heads."""
        return head_probabilities(self.logits, multilabel)


class FusionModel(nn.Module):
    """MoPE-prompted image feature concatenated with psi, then a linear head (softmax or sigmoid)."""

    def __init__(self, config: MoPEConfig, vision_width: int, vision_layers: int, embed_dim: int, psi_dim: int,
                 n_classes: int, head: str = "multiclass"):
        super().__init__()
        if head not in HEADS:
            raise PromptConfigError(f"fusion head must be one of {HEADS}, got {head!r}")
        if n_classes < 1:
            raise PromptConfigError("a fusion head needs at least one class")
        self.multilabel = head == "multilabel"
        self.mope = MoPE(config, vision_width, vision_layers, psi_dim)
        self.head = nn.Linear(embed_dim + psi_dim, n_classes)

    def forward(self, image_encoder: PromptedImageEncoder, images: torch.Tensor, psi: torch.Tensor) -> FusionOutput:
        """Logits for images (B, 3, H, W) conditioned on complementary features psi (B, d_psi)."""
        embeds = image_encoder.embed(images)  # (B, 1 + N, d_v)
        summary = embeds[:, 1:].mean(dim=1) if self.mope.config.router_uses_image else None
        out = self.mope(psi, summary)
        feats = image_encoder.forward_embeds(embeds, out.prompts)  # (B, embed_dim), normalised
        logits = self.head(torch.cat([feats, psi.to(feats.dtype)], dim=-1))
        return FusionOutput(logits=logits, routing=out.routing)


register_method("mope", MoPEConfig, FusionModel, kind="fuse",
                summary="MoPE: image-tower prompts conditioned on the complementary feature psi, and a linear head")
