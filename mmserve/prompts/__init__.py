"""Prompt generators: MmAP and single-tower deep prompts for classification, MoPE for fusion."""

from __future__ import annotations

from torch import nn

from mmserve.errors import PromptConfigError
from mmserve.prompts.base import TowerPrompts, concat_prompts, count_params, resolve_depth
from mmserve.prompts.deep import DeepPrompt, DeepPromptConfig
from mmserve.prompts.mmap import MmAP, MmAPConfig, mmap_param_count

PromptConfig = MmAPConfig | DeepPromptConfig


def prompt_config_from_dict(data: dict) -> PromptConfig:
    """Rebuild a classification prompt config (MmAP or deep) from its manifest dict."""
    kinds = {"mmap": MmAPConfig, "deep": DeepPromptConfig}
    kind = data.get("type")
    if kind not in kinds:
        raise PromptConfigError(f"unknown prompt config type {kind!r} (known: {sorted(kinds)})")
    cls = kinds[kind]
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise PromptConfigError(f"unknown fields in {kind} prompt config: {sorted(unknown)}")
    return cls(**data)


def build_prompt(config: PromptConfig | dict, text_width: int, vision_width: int, text_layers: int,
                 vision_layers: int) -> nn.Module:
    """Instantiate the prompt module that `config` describes (MmAP or a single-tower deep prompt)."""
    if isinstance(config, dict):
        config = prompt_config_from_dict(config)
    if isinstance(config, MmAPConfig):
        return MmAP(config, text_width, vision_width, text_layers, vision_layers)
    if isinstance(config, DeepPromptConfig):
        return DeepPrompt(config, text_width, vision_width, text_layers, vision_layers)
    raise PromptConfigError(f"not a prompt config: {config!r}")


__all__ = [
    "TowerPrompts", "concat_prompts", "count_params", "resolve_depth", "DeepPrompt", "DeepPromptConfig", "MmAP",
    "MmAPConfig", "mmap_param_count", "PromptConfig", "prompt_config_from_dict", "build_prompt",
]
