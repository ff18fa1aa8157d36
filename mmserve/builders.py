"""Loading: a registry read from storage, checked against a backbone, and the modules its entries describe.

mmserve.registry is the storage format (manifest, weights, hashes) and knows no module; this file builds modules
through the method table (mmserve.prompts.table) to check shapes and to serve.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmserve.backbone import Backbone
from mmserve.errors import PromptConfigError, RegistryError
from mmserve.fusion import FusionModel
from mmserve.prompts import TowerPrompts, build_prompt, concat_prompts
from mmserve.prompts.table import get_method
from mmserve.registry import MANIFEST, Registry, TaskEntry, check_tensors, read_registry


def classify_prompt_module(config: dict, backbone: Backbone) -> nn.Module:
    """An (untrained) MmAP or single-tower deep prompt for `backbone`, from its config dict."""
    return build_prompt(config, backbone.text_width, backbone.vision_width, backbone.text_layers,
                        backbone.vision_layers)


def fusion_module(task: TaskEntry, backbone: Backbone) -> FusionModel:
    """An (untrained) fusion module (MoPE + head) for a fusion task entry, through the method its config names."""
    config = dict(task.prompt_config)
    config.setdefault("type", "mope")  # manifests before the method table may leave it out
    method = get_method(config["type"], "fuse")
    return method.module_cls(method.config_from_dict(config), backbone.vision_width, backbone.vision_layers,
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


def load_registry(root: str | Path, backbone: Backbone | None = None) -> Registry:
    """Read and validate a registry; with `backbone`, also check its fingerprint and every tensor's shape."""
    root = Path(root)
    registry = read_registry(root)
    manifest = registry.manifest
    if backbone is None:
        return registry
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise RegistryError(
            f"{root / MANIFEST}: backbone.fingerprint: registry was trained on {manifest.backbone.model} "
            f"({manifest.backbone.fingerprint}), but the loaded backbone is {backbone.spec.model} "
            f"({backbone.fingerprint})"
        )
    try:
        for g in manifest.groups:
            check_tensors(str(root / g.weights), expected_shapes(g.prompt_config, backbone),
                          registry.group_weights[g.name])
        for t in manifest.tasks:
            check_tensors(str(root / t.weights), expected_shapes(t, backbone), registry.task_weights[t.name])
    except (PromptConfigError, TypeError, ValueError, KeyError) as exc:  # values of a wrong type or range
        raise RegistryError(f"{root / MANIFEST}: prompt_config: {exc}") from None
    return registry
