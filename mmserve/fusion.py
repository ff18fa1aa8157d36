"""The trainable part of a fusion task: MoPE prompts for the image tower plus a linear head.

The head reads the prompted image feature alone (`head_input="image"`, the paper's: the complementary modality
reaches the label only through the prompts) or `[prompted image feature ; psi]` (`"image+psi"`, mmserve's first
head, a late-fusion path around the prompts, and what a registry entry without the field was trained with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmserve.encoders import PromptedImageEncoder
from mmserve.errors import PromptConfigError
from mmserve.prompts.mope import HEAD_INPUTS, MoPE, MoPEConfig
from mmserve.prompts.table import register_method

HEADS = ("multiclass", "multilabel")


def head_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax for multi-class heads, independent sigmoids for multi-label heads."""
    return logits.sigmoid() if multilabel else logits.softmax(dim=-1)


@dataclass
class FusionOutput:
    """Head logits (B, C), the gates (B, K, k) that weighted the experts and the router's noise-free softmax."""

    logits: torch.Tensor
    routing: torch.Tensor
    probs: torch.Tensor

    def probabilities(self, multilabel: bool) -> torch.Tensor:
        """Softmax for multi-class heads, independent sigmoids for multi-label heads."""
        return head_probabilities(self.logits, multilabel)


class FusionModel(nn.Module):
    """MoPE-prompted image feature (with psi when `config.head_input` is "image+psi"), then a linear head."""

    def __init__(self, config: MoPEConfig, vision_width: int, vision_layers: int, embed_dim: int, psi_dim: int,
                 n_classes: int, head: str = "multiclass"):
        super().__init__()
        if head not in HEADS:
            raise PromptConfigError(f"fusion head must be one of {HEADS}, got {head!r}")
        if n_classes < 1:
            raise PromptConfigError("a fusion head needs at least one class")
        if config.head_input not in HEAD_INPUTS:
            raise PromptConfigError(f"MoPE head_input must be one of {HEAD_INPUTS}, got {config.head_input!r}")
        self.multilabel = head == "multilabel"
        self.head_uses_psi = config.head_input == "image+psi"
        self.mope = MoPE(config, vision_width, vision_layers, psi_dim)
        self.head = nn.Linear(embed_dim + (psi_dim if self.head_uses_psi else 0), n_classes)

    @property
    def psi_dim(self) -> int:
        """Width of the complementary feature psi the model is conditioned on."""
        return self.mope.psi_dim

    @property
    def n_classes(self) -> int:
        """Outputs of the head."""
        return int(self.head.out_features)

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """(K, P) of the image-tower prompts the model makes: prompted layers, tokens per layer."""
        return self.mope.depth, self.mope.n_tokens

    @property
    def uses_image_summary(self) -> bool:
        """Whether `prompts` needs the image tower's token embeddings as well as psi."""
        return bool(self.mope.config.router_uses_image)

    def _mope(self, psi: torch.Tensor, image_embeds: torch.Tensor | None):
        summary = image_embeds[:, 1:].mean(dim=1) if self.uses_image_summary and image_embeds is not None else None
        return self.mope(psi, summary)

    def prompts(self, psi: torch.Tensor, image_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample prompts (B, K, P, d_v) and routing gates (B, K, k); image_embeds (B, 1 + N, d_v) when
        `uses_image_summary`."""
        out = self._mope(psi, image_embeds)
        return out.prompts, out.routing

    def logits(self, image_features: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """Head logits (B, C) over the prompted image features (B, E), and psi (B, d_psi) when the head reads it."""
        if not self.head_uses_psi:
            return self.head(image_features)
        return self.head(torch.cat([image_features, psi.to(image_features.dtype)], dim=-1))

    def forward(self, image_encoder: PromptedImageEncoder, images: torch.Tensor, psi: torch.Tensor) -> FusionOutput:
        """Logits for images (B, 3, H, W) conditioned on complementary features psi (B, d_psi)."""
        embeds = image_encoder.embed(images)  # (B, 1 + N, d_v)
        out = self._mope(psi, embeds)
        feats = image_encoder.forward_embeds(embeds, out.prompts)  # (B, embed_dim), normalised
        return FusionOutput(logits=self.logits(feats, psi), routing=out.routing, probs=out.probs)


register_method("mope", MoPEConfig, FusionModel, kind="fuse",
                summary="MoPE: image-tower prompts conditioned on the complementary feature psi, and a linear head "
                        "(on the prompted image feature, or on it and psi)")
