"""Registry snapshots: one registry version, fully built for serving, never mutated after construction.

A snapshot holds everything a request needs that does not depend on the request: per classification task the
class text features (text tower + the task's text prompts, computed once at load) and the task's visual prompts,
stacked per prompt shape (K, P) into banks; per fusion task its MoPE + head and complementary encoder.
`SnapshotBuilder.build` loads, validates and builds a whole registry version, or raises RegistryError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from mmserve.backbone import Backbone
from mmserve.builders import check_entry, load_classify_prompts, load_fusion, open_version
from mmserve.complementary import ComplementaryEncoder, build_complementary
from mmserve.encoders import PromptedTextEncoder
from mmserve.errors import MmserveError, PromptConfigError, RegistryError, require_task
from mmserve.features import load_features, store_features
from mmserve.fusion import FusionModel
from mmserve.registry import MANIFEST, Registry, TaskEntry, now_iso
from mmserve.runtime import ImageRuntime
from mmserve.store import HEAD, Store


@dataclass(frozen=True)
class TaskInfo:
    """What the task listing shows about a task."""

    name: str
    kind: str
    group: str | None
    classes: tuple[str, ...]
    metrics: Mapping[str, Any]
    template: str | None = None
    head: str | None = None
    threshold: float | None = None
    trainable_params: int = 0
    created: str = ""

    @classmethod
    def from_entry(cls, entry: TaskEntry) -> TaskInfo:
        """From a manifest entry."""
        fuse = entry.kind == "fuse"
        return cls(entry.name, entry.kind, entry.group, tuple(entry.classes), MappingProxyType(dict(entry.metrics)),
                   None if fuse else entry.template, (entry.head or "multiclass") if fuse else None,
                   entry.threshold if fuse and entry.head == "multilabel" else None, entry.trainable_params,
                   entry.created)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = {"name": self.name, "kind": self.kind, "group": self.group, "classes": list(self.classes),
               "metrics": dict(self.metrics), "trainable_params": self.trainable_params, "created": self.created}
        if self.kind == "classify":
            out["template"] = self.template
        else:
            out["head"] = self.head
            if self.threshold is not None:
                out["threshold"] = self.threshold
        return out


@dataclass(frozen=True)
class ClassifyTask:
    """A classification task ready to serve: class text features (C, E) and visual prompts (K, P, d_v)."""

    info: TaskInfo
    text_features: torch.Tensor
    vision_prompts: torch.Tensor | None

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """(K, P) of the visual prompts; (0, 0) when the task has none (text-only prompts)."""
        if self.vision_prompts is None:
            return (0, 0)
        return (int(self.vision_prompts.shape[0]), int(self.vision_prompts.shape[1]))


@dataclass(frozen=True)
class FusionTask:
    """A fusion task ready to serve: its MoPE + head and the encoder that turns texts into psi."""

    info: TaskInfo
    model: FusionModel
    complement: ComplementaryEncoder


@dataclass(frozen=True)
class PromptBank:
    """Visual prompts of every classify task with one (K, P) shape, stacked (T, K, P, d_v) for per-sample gathers."""

    prompts: torch.Tensor
    index: Mapping[str, int]

    def gather(self, tasks: Sequence[str]) -> torch.Tensor:
        """Per-sample prompts (B, K, P, d_v) for the tasks of a batch."""
        rows = torch.tensor([self.index[t] for t in tasks], device=self.prompts.device)
        return self.prompts.index_select(0, rows)


@dataclass(frozen=True)
class Snapshot:
    """One registry version, fully built; never mutated after construction."""

    version: str
    root: Path
    loaded_at: str
    infos: tuple[TaskInfo, ...]
    classify: Mapping[str, ClassifyTask]
    fusion: Mapping[str, FusionTask]
    banks: Mapping[tuple[int, int], PromptBank]

    @cached_property
    def kinds(self) -> Mapping[str, str]:
        """Every task's kind, by name, in manifest order."""
        return MappingProxyType({t.name: t.kind for t in self.infos})

    def names(self, kind: str | None = None) -> list[str]:
        """Task names (of one kind, if given) in manifest order."""
        return [t.name for t in self.infos if kind is None or t.kind == kind]

    def require(self, name: str, kind: str) -> ClassifyTask | FusionTask:
        """The task `name`, which must be of `kind`; raises UnknownTaskError / WrongTaskKindError."""
        tasks = self.classify if kind == "classify" else self.fusion
        if name not in tasks:
            require_task(self.kinds, name, kind)  # raises: the task is unknown or of the other kind
        return tasks[name]


def format_template(template: str, name: str) -> str:
    """A class name put into a prompt template; PromptConfigError when the template has no '{}'."""
    if "{}" not in template:
        raise PromptConfigError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template.format(name)


class SnapshotBuilder:
    """Builds registry versions over one backbone, text encoder and runtime (complementary encoders are shared).

    Incremental: a task whose weights, config, template and classes (and group) are those of a task the previous
    build made is taken over as built; only new or changed tasks load weights and run the text tower, and their
    class text features come from the store when a build on this backbone already stored them.
    """

    def __init__(self, backbone: Backbone, text_encoder: PromptedTextEncoder, runtime: ImageRuntime):
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.runtime = runtime
        self._complements: dict[str, ComplementaryEncoder] = {}
        self._built: dict[str, ClassifyTask | FusionTask] = {}  # by build key: the tasks of the last build
        self.rebuilt = 0  # tasks the last build made anew (the others were taken over)

    def _complement(self, spec: dict) -> ComplementaryEncoder:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._complements:  # frozen encoders: shared across tasks and registry versions
            self._complements[key] = build_complementary(spec, self.backbone)
        return self._complements[key]

    @torch.inference_mode()
    def _classify(self, store: Store, registry: Registry, entry: TaskEntry) -> ClassifyTask:
        prompts = load_classify_prompts(registry, entry.name, self.backbone)()
        fingerprint, width = self.backbone.fingerprint, self.backbone.embed_dim
        features = load_features(store, registry.manifest, entry, fingerprint, width)
        if features is None:
            texts = [format_template(entry.template, c) for c in entry.classes]
            tokens = self.text_encoder.tokenize(texts, prompts.text_tokens).to(self.backbone.device)
            features = self.text_encoder(tokens, prompts.text)  # (C, E), normalised
            store_features(store, registry.manifest, entry, fingerprint, features)
        vision = None if prompts.vision is None else prompts.vision.detach().clone()
        return ClassifyTask(TaskInfo.from_entry(entry), features.to(self.backbone.device), vision)

    def _fusion(self, registry: Registry, entry: TaskEntry) -> FusionTask:
        model = load_fusion(registry, entry.name, self.backbone)
        spec = dict(entry.complementary or {"kind": "clip_text"})
        complement = self._complement(spec)
        if entry.psi_dim is not None and int(entry.psi_dim) != complement.dim:
            raise PromptConfigError(f"psi_dim is {entry.psi_dim} but the complementary encoder {spec} gives "
                                    f"{complement.dim}")
        return FusionTask(TaskInfo.from_entry(entry), model, complement)

    def build(self, path: str | Path, version: str | None = None) -> Snapshot:
        """Load, validate and build a version (default: the current one) of a store or registry directory
        without serving it; raises RegistryError, and then the previous build's tasks stay the ones taken over."""
        store = Store.open(path)
        if version is None:
            head = store.head()
            if head is None:
                raise RegistryError(f"{store.where(MANIFEST)}: no manifest (not a registry directory), and no "
                                    f"{HEAD} (not a store with a version: add tasks with mmserve registry add)")
            version = head.version
        registry = open_version(store, version, self.backbone)
        where = store.manifest_where(version)
        if not registry.manifest.tasks:
            raise RegistryError(f"{where}: tasks: the registry has no task to serve")
        classify: dict[str, ClassifyTask] = {}
        fusion: dict[str, FusionTask] = {}
        built: dict[str, ClassifyTask | FusionTask] = {}
        rebuilt = 0
        for entry in registry.manifest.tasks:
            key = build_key(registry, entry)
            try:
                task = self._built.get(key)
                if task is not None:
                    task = replace(task, info=TaskInfo.from_entry(entry))  # same weights: only the listing changes
                else:
                    check_entry(store, registry, entry, self.backbone)
                    task = (self._classify(store, registry, entry) if entry.kind == "classify"
                            else self._fusion(registry, entry))
                    rebuilt += 1
            except RegistryError:
                raise
            except (MmserveError, ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError) as exc:
                raise RegistryError(f"{where}: tasks[{entry.name}]: {exc}") from None
            built[key] = task
            if isinstance(task, ClassifyTask):
                classify[entry.name] = task
            else:
                fusion[entry.name] = task
        banks = prompt_banks(classify.values())
        try:  # open the runtime's graphs now: the first request must not pay, a missing graph must refuse the load
            self.runtime.prepare({t.prompt_shape for t in classify.values()},
                                 {n: (t.model, t.complement.dim) for n, t in fusion.items()})
        except MmserveError as exc:
            raise RegistryError(f"{where}: runtime {self.runtime.name}: {exc}") from None
        self._built, self.rebuilt = built, rebuilt
        root = Path(path).resolve() if store.is_local else store.url
        return Snapshot(version, root, now_iso(),  # type: ignore[arg-type]
                        tuple(TaskInfo.from_entry(e) for e in registry.manifest.tasks),
                        MappingProxyType(classify), MappingProxyType(fusion), banks)


def build_key(registry: Registry, entry: TaskEntry) -> str:
    """What a served task is built from: its kind, weights, config and classes, and its group's weights."""
    group = registry.manifest.group(entry.group) if entry.group is not None else None
    inputs = {"kind": entry.kind, "sha": entry.sha256, "config": entry.prompt_config, "classes": entry.classes,
              "template": entry.template, "head": entry.head, "complementary": entry.complementary,
              "psi_dim": entry.psi_dim, "group": None if group is None else [group.sha256, group.prompt_config]}
    return json.dumps(inputs, sort_keys=True)


def prompt_banks(tasks: Iterable[ClassifyTask]) -> Mapping[tuple[int, int], PromptBank]:
    """The visual prompts of classify tasks stacked per prompt shape (tasks without visual prompts left out)."""
    by_shape: dict[tuple[int, int], list[ClassifyTask]] = {}
    for task in tasks:
        if task.vision_prompts is not None:
            by_shape.setdefault(task.prompt_shape, []).append(task)
    return MappingProxyType({shape: PromptBank(torch.stack([t.vision_prompts for t in group]),
                                               MappingProxyType({t.info.name: i for i, t in enumerate(group)}))
                             for shape, group in by_shape.items()})
