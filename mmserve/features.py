"""Stored served tensors: each classification task's class text features (C, E), computed once per backbone, and
its visual prompts (K, P, d_v) as its group and task weights make them, kept in the store beside the blobs, so
loading a task reads one file instead of running every class through the text tower and its prompt modules.

    <store>/features/<backbone fingerprint>/<task sha256>-<key>.safetensors   tensors "features" (and "vision")

The key hashes everything they depend on besides the backbone: the task's and its group's weights and prompt
configs, the template and the class names. The file records the fingerprint and key it was made for; a file that
says otherwise, or whose tensors have other shapes than the task needs, is refused naming it. A file without
"vision" (written before it was kept) serves its features, the prompts coming from the weights. A directory
registry in the older layout keeps no features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mmserve.errors import RegistryError
from mmserve.registry import Manifest, TaskEntry
from mmserve.store import Store

FEATURES = "features"
logger = logging.getLogger("mmserve")


def feature_key(manifest: Manifest, task: TaskEntry) -> str:
    """What a task's class text features depend on, hashed (the backbone is the folder)."""
    group = manifest.group(task.group) if task.group is not None else None
    inputs = {"task": task.sha256, "config": task.prompt_config, "template": task.template, "classes": task.classes,
              "group": None if group is None else [group.sha256, group.prompt_config]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def feature_name(fingerprint: str, task: TaskEntry, key: str) -> str:
    """A task's features file inside the store."""
    return f"{FEATURES}/{fingerprint}/{task.sha256}-{key}.safetensors"


def feature_task(name: str) -> str:
    """The task sha256 a features file name starts with (gc keeps the file while that blob is used)."""
    return name.split("-", 1)[0]


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes (the JSON header after its 8-byte length)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


@dataclass(frozen=True)
class Served:
    """A task's stored tensors: class text features (C, E) and, when the file keeps them, visual prompts."""

    features: torch.Tensor
    vision: torch.Tensor | None


def load_features(store: Store, manifest: Manifest, task: TaskEntry, fingerprint: str, width: int,
                  vision_shape: tuple[int, ...] | None = None) -> Served | None:
    """The stored tensors of `task` for this backbone, or None when none are stored; `vision_shape` is the
    (K, P, d_v) its visual prompts must have (None: it has none)."""
    if store.legacy:
        return None
    key = feature_key(manifest, task)
    name = feature_name(fingerprint, task, key)
    data = store.read_optional(name)
    if data is None:
        return None
    try:
        meta = _metadata(data)
        tensors = load(data)
        features = tensors["features"]
    except (SafetensorError, ValueError, KeyError, struct.error) as exc:
        raise RegistryError(f"{store.where(name)}: unreadable features file: {exc}") from None
    if meta.get("fingerprint") != fingerprint or meta.get("key") != key:
        raise RegistryError(f"{store.where(name)}: fingerprint: made for backbone {meta.get('fingerprint')} "
                            f"(key {meta.get('key')}), not {fingerprint} (key {key})")
    if tuple(features.shape) != (len(task.classes), width):
        raise RegistryError(f"{store.where(name)}: features: shape {tuple(features.shape)}, the task needs "
                            f"{(len(task.classes), width)}")
    vision = tensors.get("vision")
    if vision is not None and (vision_shape is None or tuple(vision.shape) != tuple(vision_shape)):
        raise RegistryError(f"{store.where(name)}: vision: shape {tuple(vision.shape)}, the task's prompt configs "
                            f"make {vision_shape}")
    return Served(features, vision)


def store_features(store: Store, manifest: Manifest, task: TaskEntry, fingerprint: str,
                   features: torch.Tensor, vision: torch.Tensor | None = None) -> None:
    """Keep a task's computed features (and visual prompts) in the store (skipped, with a warning, where the
    store refuses writes)."""
    if store.legacy:
        return
    key = feature_key(manifest, task)
    tensors = {"features": features} if vision is None else {"features": features, "vision": vision}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"fingerprint": fingerprint, "key": key})
    try:
        store.write(feature_name(fingerprint, task, key), data)
    except (OSError, RegistryError) as exc:
        logger.warning("could not store the text features of task %s: %s", task.name, exc)
