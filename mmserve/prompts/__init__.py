"""Prompt methods: MmAP and single-tower deep prompts for classification (MoPE, for fusion, lives beside them).

Each method is one module ending in one `register_method` call; everything else looks methods up in the table
(mmserve.prompts.table). Importing this package registers the built-in classification methods.
"""

from __future__ import annotations

from torch import nn

from mmserve.prompts.base import TowerPrompts, concat_prompts, count_params, resolve_depth
from mmserve.prompts.deep import DeepPrompt, DeepPromptConfig
from mmserve.prompts.mmap import MmAP, MmAPConfig, mmap_param_count
from mmserve.prompts.table import (
    Method,
    ResultRow,
    build_classify_module,
    config_for_choice,
    config_from_dict,
    get_method,
    method_for_choice,
    methods,
    prompt_choices,
    register_method,
    unregister_method,
)

PromptConfig = MmAPConfig | DeepPromptConfig  # the built-in classification configs (any registered one works)


def prompt_config_from_dict(data: dict):
    """Rebuild a classification prompt config from its manifest dict (dispatches on its `type`)."""
    return config_from_dict(data, "classify")


def build_prompt(config, text_width: int, vision_width: int, text_layers: int, vision_layers: int) -> nn.Module:
    """Instantiate the classification prompt module that `config` (object or manifest dict) describes."""
    return build_classify_module(config, text_width, vision_width, text_layers, vision_layers)


__all__ = [
    "TowerPrompts", "concat_prompts", "count_params", "resolve_depth", "DeepPrompt", "DeepPromptConfig", "MmAP",
    "MmAPConfig", "mmap_param_count", "PromptConfig", "prompt_config_from_dict", "build_prompt", "Method",
    "ResultRow", "build_classify_module", "config_for_choice", "config_from_dict", "get_method",
    "method_for_choice", "methods", "prompt_choices", "register_method", "unregister_method",
]
