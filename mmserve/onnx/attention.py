"""The export-friendly copy of the vision tower: nn.MultiheadAttention rewritten with q/k/v projections + SDPA.

The result is identical (parity is checked at export and in tests) but its graph matches the attention patterns
of onnxscript's onnxruntime fusions; nn.MultiheadAttention's packed in-projection does not match onnxruntime's own
optimizer, whose fusions also need a symbolic shape inference that fails on this graph. The backbone itself is
never modified: the rewrite is applied to a copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.backbone import Backbone
from mmserve.encoders import PromptedImageEncoder


class ExportAttention(nn.Module):
    """nn.MultiheadAttention self-attention rewritten with q/k/v projections + SDPA (same weights, same result)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        for i, proj in enumerate((self.q, self.k, self.v)):
            proj.weight.data.copy_(w[i * d:(i + 1) * d])
            proj.bias.data.copy_(b[i * d:(i + 1) * d])
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.requires_grad_(False)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Self-attention over `query` (key and value are the same tensor in open_clip's vision blocks)."""
        x = query if self.batch_first else query.transpose(0, 1)
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, s, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _swappable(mha: nn.Module) -> bool:
    return (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
            and mha.bias_k is None and not mha.add_zero_attn)


def exportable_encoder(backbone: Backbone) -> PromptedImageEncoder:
    """A prompted image encoder over a COPY of the vision tower whose attention is export-friendly."""
    encoder = PromptedImageEncoder(backbone)
    visual = copy.deepcopy(backbone.model.visual)
    for block in visual.transformer.resblocks:
        if _swappable(getattr(block, "attn", None)):
            block.attn = ExportAttention(block.attn)
    encoder.visual = visual.eval().requires_grad_(False)
    return encoder.eval()


def num_heads(backbone: Backbone) -> int:
    """Attention heads of the vision tower (what the fusion passes need to know)."""
    attn = getattr(backbone.model.visual.transformer.resblocks[0], "attn", None)
    return int(getattr(attn, "num_heads", 0) or max(1, backbone.vision_width // 64))
