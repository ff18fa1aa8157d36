"""Loading: a registry read from storage, checked against a backbone, and the modules its entries describe.

mmserve.registry is the storage format (manifest, weights, hashes) and knows no module; this file builds modules
through the method table (mmserve.prompts.table) to check shapes and to serve.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from torch import nn

from mmserve.backbone import Backbone
from mmserve.errors import PromptConfigError, RegistryError
from mmserve.fusion import FusionModel
from mmserve.prompts import TowerPrompts, build_prompt, concat_prompts
from mmserve.prompts.table import get_method
from mmserve.registry import MANIFEST, Registry, TaskEntry, check_tensors, read_registry
from mmserve.store import Store


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


class StoredWeights(Mapping):
    """A version's weights by entry name, read from the store (sha256 checked) at each use, never kept: a served
    task keeps its prompts, not its weights."""

    def __init__(self, store: Store, entries: dict[str, tuple[str, str, str]]):
        self._store = store
        self._entries = entries  # name -> (weights path, sha256, where for messages)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        rel, sha, where = self._entries[name]
        data = self._store.weights_bytes(rel, sha, where)
        try:
            return load_tensors(data)
        except (SafetensorError, ValueError) as exc:
            raise RegistryError(f"{self._store.where(rel)}: unreadable safetensors: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def open_version(store: Store, version: str, backbone: Backbone) -> Registry:
    """One version of a store as a Registry whose weights load on first use; the backbone fingerprint checked."""
    manifest = store.get_version(version)
    where = store.manifest_where(version)
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise RegistryError(
            f"{where}: backbone.fingerprint: registry was trained on {manifest.backbone.model} "
            f"({manifest.backbone.fingerprint}), but the loaded backbone is {backbone.spec.model} "
            f"({backbone.fingerprint})")
    groups = {g.name: (g.weights, g.sha256, f"groups[{g.name}]") for g in manifest.groups}
    tasks = {t.name: (t.weights, t.sha256, f"tasks[{t.name}]") for t in manifest.tasks}
    return Registry(Path(store.url) if store.is_local else store.url, manifest,  # type: ignore[arg-type]
                    StoredWeights(store, groups), StoredWeights(store, tasks))


def check_entry(store: Store, registry: Registry, task: TaskEntry, backbone: Backbone) -> None:
    """A task's weights (and its group's) have exactly the tensors its config builds on `backbone`."""
    where = store.manifest_where(registry.manifest.version)
    try:
        if task.group is not None:
            group = registry.manifest.group(task.group)
            check_tensors(store.where(group.weights), expected_shapes(group.prompt_config, backbone),
                          registry.group_weights[group.name])
        check_tensors(store.where(task.weights), expected_shapes(task, backbone), registry.task_weights[task.name])
    except (PromptConfigError, TypeError, ValueError, KeyError) as exc:  # values of a wrong type or range
        raise RegistryError(f"{where}: prompt_config: {exc}") from None


class PromptMaker:
    """Served prompts from a classification entry's weights, through one module per prompt config, reused under a
    lock: building a module costs more than running it, and a store of 10,000 tasks must load in seconds."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self._modules: dict[str, tuple[nn.Module, dict[str, torch.Size]]] = {}
        self._lock = threading.Lock()

    def _module(self, config: dict) -> tuple[nn.Module, dict[str, torch.Size]]:
        key = json.dumps(config, sort_keys=True)
        if key not in self._modules:
            module = classify_prompt_module(config, self.backbone).to(self.backbone.device).eval()
            module.requires_grad_(False)
            self._modules[key] = module, {k: v.shape for k, v in module.state_dict().items()}
        return self._modules[key]

    @torch.inference_mode()
    def prompts(self, config: dict, weights: Mapping[str, torch.Tensor], where: str) -> TowerPrompts:
        """The prompts (text, vision) of one weights file, checked against its config's tensors; copies the
        module does not own. RegistryError naming `where` for weights that do not fit; PromptConfigError for a
        config the method refuses."""
        with self._lock:
            module, shapes = self._module(config)
            check_tensors(where, shapes, dict(weights))
            module.load_state_dict(weights)
            out = module()
            return TowerPrompts(None if out.text is None else out.text.clone(),
                                None if out.vision is None else out.vision.clone())

    def classify(self, registry: Registry, task: TaskEntry, store: Store,
                 groups: dict[str, TowerPrompts] | None = None) -> TowerPrompts:
        """A classification task's served prompts: its group's (if any; kept in `groups` by the group's weights
        and config, for the other tasks of one build) then its own, per layer."""
        parts = []
        if task.group is not None:
            group = registry.manifest.group(task.group)
            key = group.sha256 + json.dumps(group.prompt_config, sort_keys=True)
            shared = (groups or {}).get(key)
            if shared is None:
                shared = self.prompts(group.prompt_config, registry.group_weights[group.name],
                                      store.where(group.weights))
                if groups is not None:
                    groups[key] = shared
            parts.append(shared)
        parts.append(self.prompts(task.prompt_config, registry.task_weights[task.name], store.where(task.weights)))
        return concat_prompts(*parts) if len(parts) > 1 else parts[0]

    @torch.inference_mode()
    def initial(self, config: dict) -> TowerPrompts:
        """The prompts of a config's module, with whatever weights it last held: for their shapes."""
        with self._lock:
            return self._module(config)[0]()
