"""MmAP: per-layer source prompt shared by both towers, scaled into text and visual prompts by Kronecker products."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmserve.errors import PromptConfigError
from mmserve.prompts.base import TowerPrompts, resolve_depth
from mmserve.prompts.table import register_method


@dataclass
class MmAPConfig:
    """Shape of one MmAP: b prompt tokens per layer from an m x n source prompt, in the first `depth` layers."""

    n_tokens: int = 4  # b: prompt tokens per layer in each tower
    source_rows: int = 2  # m
    source_cols: int = 8  # n
    depth: int | None = None  # K: layers that receive prompts (None = every layer)
    init_std: float = 0.02  # std of the initial text/visual prompt entries

    type: str = "mmap"

    def to_dict(self) -> dict:
        """Plain dict for the registry manifest."""
        return asdict(self)


def batched_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product per leading index: a (K, p, q) x b (K, m, n) -> (K, p*m, q*n)."""
    k, p, q = a.shape
    _, m, n = b.shape
    return torch.einsum("kij,krc->kirjc", a, b).reshape(k, p * m, q * n)


class MmAP(nn.Module):
    """One multi-modal alignment prompt: text prompt kron(M_l, P_s) (b x d_l), visual kron(M_v, P_s) (b x d_v)."""

    def __init__(self, config: MmAPConfig, text_width: int, vision_width: int, text_layers: int, vision_layers: int):
        super().__init__()
        b, m, n = config.n_tokens, config.source_rows, config.source_cols
        if b < 1 or m < 1 or n < 1:
            raise PromptConfigError(f"MmAP sizes must be positive, got b={b}, m={m}, n={n}")
        if b % m:
            raise PromptConfigError(f"MmAP: n_tokens b={b} must be divisible by source_rows m={m}")
        if text_width % n:
            raise PromptConfigError(f"MmAP: text width d_l={text_width} must be divisible by source_cols n={n}")
        if vision_width % n:
            raise PromptConfigError(f"MmAP: vision width d_v={vision_width} must be divisible by source_cols n={n}")
        self.config = config
        self.depth = resolve_depth(config.depth, text_layers, vision_layers)
        # each factor gets std sqrt(init_std) so that their products start with std ~init_std
        std = math.sqrt(config.init_std)
        k = self.depth
        self.source = nn.Parameter(torch.randn(k, m, n) * std)  # P_s: (K, m, n)
        self.scale_text = nn.Parameter(torch.randn(k, b // m, text_width // n) * std)  # M_l: (K, b/m, d_l/n)
        self.scale_vision = nn.Parameter(torch.randn(k, b // m, vision_width // n) * std)  # M_v: (K, b/m, d_v/n)

    def forward(self) -> TowerPrompts:
        """Text prompts (K, b, d_l) and visual prompts (K, b, d_v) for every prompted layer."""
        return TowerPrompts(
            text=batched_kron(self.scale_text, self.source),
            vision=batched_kron(self.scale_vision, self.source),
        )


def mmap_param_count(config: MmAPConfig, text_width: int, vision_width: int, depth: int) -> int:
    """K * (m*n + (b/m)*(d_l/n) + (b/m)*(d_v/n)): the trainable parameters of one MmAP."""
    b, m, n = config.n_tokens, config.source_rows, config.source_cols
    return depth * (m * n + (b // m) * (text_width // n) + (b // m) * (vision_width // n))


register_method("mmap", MmAPConfig, MmAP, summary="MmAP: kron(M_l, P_s) text and kron(M_v, P_s) visual prompts")
