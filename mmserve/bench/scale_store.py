"""A store of many random MmAP tasks written directly, for the registry-scale benchmark (speed only, no accuracy).

Every task and group gets its own random weights blob with the shapes the shipped prompt config builds, and
random unit-norm class text features, stored with its visual prompts as an engine stores the ones it computes
(same file, fingerprint and key), so an engine reads them instead of running 55 classes per task through the
text tower: at 10,000 tasks that pass would take ~40 minutes here; what it costs per task is measured on its own.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mmserve.backbone import Backbone
from mmserve.builders import PromptMaker, classify_prompt_module, open_version
from mmserve.features import store_features
from mmserve.prompts import MmAPConfig, count_params
from mmserve.registry import BackboneRef, GroupEntry, Manifest, TaskEntry, tensor_bytes
from mmserve.store import Store, blob_name

TASKS_PER_GROUP = 4


def _random_weights(template: dict[str, torch.Tensor], gen: torch.Generator) -> bytes:
    """Weights of the template's shapes: its initial values plus noise, as safetensors bytes."""
    return tensor_bytes({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in template.items()})


def task_name(i: int) -> str:
    """The benchmark's i-th task."""
    return f"task{i:06d}"


def write_random_store(url: str, backbone: Backbone, n_tasks: int, n_classes: int = 55, seed: int = 0,
                       stored_prompts: bool = True) -> Manifest:
    """Write `n_tasks` random tasks (groups of TASKS_PER_GROUP) as one version of a new store; its manifest.
    `stored_prompts` False leaves the visual prompts out of the stored files (an engine computes them from the
    weights, as for files written before they were kept)."""
    store = Store.open(url)
    store.durable = False  # a throwaway store of up to 100,000 tasks: no fsync per file (2 ms each here)
    gen = torch.Generator().manual_seed(seed)
    config = MmAPConfig().to_dict()
    template = {k: v.detach() for k, v in classify_prompt_module(config, backbone).state_dict().items()}
    params = count_params(classify_prompt_module(config, backbone))
    groups, tasks = [], []
    for g in range((n_tasks + TASKS_PER_GROUP - 1) // TASKS_PER_GROUP):
        members = [task_name(t) for t in range(g * TASKS_PER_GROUP, min(n_tasks, (g + 1) * TASKS_PER_GROUP))]
        sha = store.put_blob(_random_weights(template, gen))
        groups.append(GroupEntry(f"group{g}", members, config, params, weights=blob_name(sha), sha256=sha))
        for name in members:
            sha = store.put_blob(_random_weights(template, gen))
            tasks.append(TaskEntry(name, "classify", [f"thing {c} of {name}" for c in range(n_classes)], config,
                                   params, group=f"group{g}", weights=blob_name(sha), sha256=sha))
    manifest = Manifest(BackboneRef(backbone.spec.model, backbone.fingerprint, backbone.spec.pretrained), groups,
                        tasks)
    store.put_version(manifest)
    maker = PromptMaker(backbone)  # what an engine stores for each task: class text features (random here), prompts
    groups: dict = {}
    registry = open_version(store, manifest.version, backbone)
    for task in manifest.tasks:
        feats = F.normalize(torch.randn(n_classes, backbone.embed_dim, generator=gen), dim=-1)
        vision = maker.classify(registry, task, store, groups).vision if stored_prompts else None
        store_features(store, manifest, task, backbone.fingerprint, feats, vision)
    store.move_head(None, manifest.version, f"bench: {n_tasks} random tasks")
    return manifest
