"""Deep prompts for one or both towers, their concatenation, and single-tower prompts for ablations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmserve.errors import PromptConfigError


@dataclass
class TowerPrompts:
    """Deep prompts per prompted layer: text (K, P_l, d_l) and vision (K, P_v, d_v); None = no prompts there."""

    text: torch.Tensor | None = None
    vision: torch.Tensor | None = None

    @property
    def text_tokens(self) -> int:
        """Prompt tokens per layer in the text tower."""
        return 0 if self.text is None else self.text.shape[-2]


def _cat_layers(parts: list[torch.Tensor]) -> torch.Tensor | None:
    if not parts:
        return None
    depth = max(p.shape[0] for p in parts)
    if any(p.shape[0] != depth for p in parts):
        raise PromptConfigError(f"prompts to concatenate have different depths: {[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1)


def concat_prompts(*prompts: TowerPrompts) -> TowerPrompts:
    """Concatenate prompts per layer (group-shared then task-specific, MmAP eq. 9/10)."""
    return TowerPrompts(
        text=_cat_layers([p.text for p in prompts if p.text is not None]),
        vision=_cat_layers([p.vision for p in prompts if p.vision is not None]),
    )


def resolve_depth(depth: int | None, *tower_layers: int) -> int:
    """The number of prompted layers: `depth`, or every layer of the shallowest tower involved."""
    limit = min(tower_layers)
    if depth is None:
        return limit
    if not 1 <= depth <= limit:
        raise PromptConfigError(f"prompt depth {depth} must be between 1 and {limit} (layers of the prompted towers)")
    return depth


def count_params(module: nn.Module) -> int:
    """Trainable parameters of a prompt module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

