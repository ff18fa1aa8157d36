"""Rebuild the trainable modules that registry entries describe, and load their weights."""

from __future__ import annotations

from torch import nn

from mmserve.backbone import Backbone
from mmserve.fusion import FusionModel
from mmserve.prompts import TowerPrompts, build_prompt, concat_prompts
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import Registry, TaskEntry


def classify_prompt_module(config: dict, backbone: Backbone) -> nn.Module:
    """An (untrained) MmAP or single-tower deep prompt for `backbone`, from its config dict."""
    return build_prompt(config, backbone.text_width, backbone.vision_width, backbone.text_layers,
                        backbone.vision_layers)


def fusion_module(task: TaskEntry, backbone: Backbone) -> FusionModel:
    """An (untrained) MoPE + head for a fusion task entry."""
    return FusionModel(MoPEConfig.from_dict(task.prompt_config), backbone.vision_width, backbone.vision_layers,
                       backbone.embed_dim, int(task.psi_dim or 0), len(task.classes), task.head or "multiclass")


def expected_shapes(entry: TaskEntry | dict, backbone: Backbone) -> dict:
    """Tensor names and shapes a group config (dict) or a task entry must have on `backbone`."""
    if isinstance(entry, dict):
        module = classify_prompt_module(entry, backbone)
    elif entry.kind == "fuse":
        module = fusion_module(entry, backbone)
    else:
        module = classify_prompt_module(entry.prompt_config, backbone)
    return {k: v.shape for k, v in module.state_dict().items()}


class ClassifyPrompts(nn.Module):
    """A classification task's prompts: its group-shared prompt (if any) concatenated with its own, per layer."""

    def __init__(self, task: nn.Module, group: nn.Module | None = None):
        super().__init__()
        self.group = group
        self.task = task

    def forward(self) -> TowerPrompts:
        """Group-shared then task-specific prompts for both towers."""
        parts = ([self.group()] if self.group is not None else []) + [self.task()]
        return concat_prompts(*parts)


def load_classify_prompts(registry: Registry, name: str, backbone: Backbone) -> ClassifyPrompts:
    """The trained prompts of classification task `name`, frozen, ready for the prompted towers."""
    task = registry.manifest.task(name)
    task_module = classify_prompt_module(task.prompt_config, backbone)
    task_module.load_state_dict(registry.task_weights[name])
    group_module = None
    if task.group is not None:
        group = registry.manifest.group(task.group)
        group_module = classify_prompt_module(group.prompt_config, backbone)
        group_module.load_state_dict(registry.group_weights[group.name])
    prompts = ClassifyPrompts(task_module, group_module).to(backbone.device).eval()
    return prompts.requires_grad_(False)


def load_fusion(registry: Registry, name: str, backbone: Backbone) -> FusionModel:
    """The trained MoPE + head of fusion task `name`, frozen."""
    task = registry.manifest.task(name)
    model = fusion_module(task, backbone)
    model.load_state_dict(registry.task_weights[name])
    return model.to(backbone.device).eval().requires_grad_(False)
