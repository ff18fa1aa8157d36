"""Independent per-layer prompts for a single tower: the text-only and visual-only ablations."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmserve.errors import PromptConfigError
from mmserve.prompts.base import TowerPrompts, resolve_depth
from mmserve.prompts.table import ResultRow, register_method


@dataclass
class DeepPromptConfig:
    """Independent per-layer prompts in one tower: text-only (CoOp/MaPLe-style) or visual-only (VPT-deep)."""

    tower: str = "text"  # "text" or "vision"
    n_tokens: int = 4
    depth: int | None = None
    init_std: float = 0.02

    type: str = "deep"

    def to_dict(self) -> dict:
        """Plain dict for the registry manifest."""
        return asdict(self)


class DeepPrompt(nn.Module):
    """A (K, b, d) block of free prompt tokens for a single tower: the single-modality ablation."""

    def __init__(self, config: DeepPromptConfig, text_width: int, vision_width: int, text_layers: int,
                 vision_layers: int):
        super().__init__()
        if config.tower not in ("text", "vision"):
            raise PromptConfigError(f"deep prompt tower must be 'text' or 'vision', got {config.tower!r}")
        if config.n_tokens < 1:
            raise PromptConfigError(f"deep prompt n_tokens must be positive, got {config.n_tokens}")
        self.config = config
        width, layers = (text_width, text_layers) if config.tower == "text" else (vision_width, vision_layers)
        self.depth = resolve_depth(config.depth, layers)
        self.prompt = nn.Parameter(torch.randn(self.depth, config.n_tokens, width) * config.init_std)

    def forward(self) -> TowerPrompts:
        """The prompts for the configured tower; the other tower gets none."""
        if self.config.tower == "text":
            return TowerPrompts(text=self.prompt)
        return TowerPrompts(vision=self.prompt)


register_method(
    "deep", DeepPromptConfig, DeepPrompt, choices={"text": {"tower": "text"}, "vision": {"tower": "vision"}},
    summary="independent deep prompts in one tower: text-only (CoOp-style) or visual-only (VPT-deep)",
    results=(
        ResultRow("text-only", "text-only prompts (CoOp-style)",
                  "deep text prompts only (b = 4 tokens per layer, every text layer), one per task, no sharing",
                  "text"),
        ResultRow("visual-only", "visual-only prompts (VPT-style)",
                  "deep visual prompts only (b = 4 tokens per layer, every image layer), one per task, no sharing",
                  "vision"),
    ))
