"""Registry snapshots: one registry version, fully built for serving, never mutated after construction.

A snapshot holds everything a request needs that does not depend on the request: per classification task the
class text features (text tower + the task's text prompts, computed once at load) and the task's visual prompts,
stacked per prompt shape (K, P) into banks; per fusion task its MoPE + head and complementary encoder.
`SnapshotBuilder.build` loads, validates and builds a whole registry version, or raises RegistryError.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from mmserve.backbone import Backbone
from mmserve.builders import PromptMaker, check_entry, load_fusion, open_version
from mmserve.complementary import ComplementaryEncoder, build_complementary
from mmserve.encoders import PromptedTextEncoder
from mmserve.errors import MmserveError, PromptConfigError, RegistryError, require_task
from mmserve.features import load_features, store_features
from mmserve.fusion import FusionModel
from mmserve.prompts import TowerPrompts
from mmserve.registry import DEFAULT_TEMPLATE, MANIFEST, Registry, TaskEntry, now_iso
from mmserve.runtime import ImageRuntime
from mmserve.store import HEAD, Store, paused_gc


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
    key: Hashable = ()  # what it was built from (build_key): equal keys, equal tensors
    load_prompts: Callable[[], TowerPrompts] | None = field(default=None, repr=False, compare=False)

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """(K, P) of the visual prompts; (0, 0) when the task has none (text-only prompts)."""
        if self.vision_prompts is None:
            return (0, 0)
        return (int(self.vision_prompts.shape[0]), int(self.vision_prompts.shape[1]))

    @property
    def text_prompts(self) -> torch.Tensor | None:
        """The task's text-tower prompts (K, P_l, d_l), group's then its own; recomputed from the store at each
        call (a served task keeps only what every request needs: callers cache what they derive from them)."""
        return None if self.load_prompts is None else self.load_prompts().text

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it serves with."""
        vision = 0 if self.vision_prompts is None else self.vision_prompts.nbytes
        return self.text_features.nbytes + vision


@dataclass(frozen=True)
class FusionTask:
    """A fusion task ready to serve: its MoPE + head and the encoder that turns texts into psi."""

    info: TaskInfo
    model: FusionModel
    complement: ComplementaryEncoder


class ResidentTasks:
    """The classify tasks in memory, by build key, shared by every version one builder makes.

    Unbounded (`capacity` None): every task of the served version, loaded when the version is built. Bounded
    (MMSERVE_MAX_RESIDENT_TASKS): tasks load on first use and the least recently used beyond `capacity` are
    evicted; a request holding an evicted task finishes with it. Counts hits, misses (loads) and evictions.
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"resident task capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._tasks: OrderedDict[Hashable, ClassifyTask] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self._bytes = 0

    def get(self, key: Hashable, load: Callable[[], ClassifyTask]) -> ClassifyTask:
        """The task built from `key`, loaded (and counted a miss) when it is not resident."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                self._tasks.move_to_end(key)
                self.hits += 1
                return task
        task = load()
        with self._lock:
            self.misses += 1
            self._put(key, task)
        return task

    def peek(self, key: Hashable) -> ClassifyTask | None:
        """The resident task built from `key`, or None; not counted, not moved."""
        with self._lock:
            return self._tasks.get(key)

    def put(self, key: Hashable, task: ClassifyTask) -> None:
        """Make a task resident (evicting the least recently used beyond capacity)."""
        with self._lock:
            self._put(key, task)

    def _put(self, key: Hashable, task: ClassifyTask) -> None:
        old = self._tasks.pop(key, None)
        self._bytes += task.nbytes - (0 if old is None else old.nbytes)
        self._tasks[key] = task
        while self.capacity is not None and len(self._tasks) > self.capacity:
            self._bytes -= self._tasks.popitem(last=False)[1].nbytes
            self.evictions += 1

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Drop the tasks no key in `keys` names (what a new unbounded version no longer serves)."""
        wanted = set(keys)
        with self._lock:
            for key in [k for k in self._tasks if k not in wanted]:
                self._bytes -= self._tasks.pop(key).nbytes

    def stats(self) -> dict[str, int | None]:
        """Counters and sizes, for /metrics and the benchmark."""
        with self._lock:
            return {"resident": len(self._tasks), "capacity": self.capacity, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions,
                    "bytes": self._bytes}


class ClassifyTasks(Mapping[str, ClassifyTask]):
    """One version's classify tasks by name: held (unbounded residency) or fetched through ResidentTasks."""

    def __init__(self, infos: Mapping[str, TaskInfo], keys: Mapping[str, BuildKey], resident: ResidentTasks,
                 load: Callable[[TaskInfo, BuildKey], ClassifyTask], held: Mapping[str, ClassifyTask] | None = None):
        self._infos, self._keys, self._resident, self._load, self._held = infos, keys, resident, load, held

    def __getitem__(self, name: str) -> ClassifyTask:
        if self._held is not None:
            return self._held[name]
        info, key = self._infos[name], self._keys[name]
        task = self._resident.get(key, lambda: self._load(info, key))
        return task if task.info is info or task.info == info else replace(task, info=info)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Snapshot:
    """One registry version, fully built; never mutated after construction."""

    version: str
    root: Path
    loaded_at: str
    infos: tuple[TaskInfo, ...]
    classify: Mapping[str, ClassifyTask]
    fusion: Mapping[str, FusionTask]

    @cached_property
    def kinds(self) -> Mapping[str, str]:
        """Every task's kind, by name, in manifest order."""
        return MappingProxyType({t.name: t.kind for t in self.infos})

    @cached_property
    def zero_shot_template(self) -> str:
        """The class template of zero-shot answers (no task): the one every classification task shares (a trained
        registry's, chosen for its backbone), else DEFAULT_TEMPLATE."""
        templates = {t.template or DEFAULT_TEMPLATE for t in self.infos if t.kind == "classify"}
        return templates.pop() if len(templates) == 1 else DEFAULT_TEMPLATE

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

    Incremental: a task built from the same weights, config, template and classes (and group weights) as one
    already built is taken over; only new or changed tasks read their weights and run the text tower, and their
    class text features come from the store when a build on this backbone stored them. With bounded residency
    (`max_resident`) a version's classify tasks load on first use; every build after the first loads, and so
    checks, the tasks it changed before it returns.
    """

    def __init__(self, backbone: Backbone, text_encoder: PromptedTextEncoder, runtime: ImageRuntime,
                 max_resident: int | None = None):
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.runtime = runtime
        self.prompt_maker = PromptMaker(backbone)
        self.resident = ResidentTasks(max_resident)
        self._complements: dict[str, ComplementaryEncoder] = {}
        self._fusion: dict[BuildKey, FusionTask] = {}  # by build key: the fusion tasks of the last build
        self._keys: frozenset[BuildKey] | None = None  # classify build keys of the last build (None before the first)
        self._shapes: dict[Hashable, tuple[int, int]] = {}
        self._parts: dict[int, tuple[object, tuple]] = {}  # build_key shares of the last build's entries
        self._infos: dict[int, tuple[object, TaskInfo]] = {}  # listings of the last build's entries, by entry
        self.rebuilt = 0  # tasks the last build made anew (the others were taken over or load on first use)

    def _complement(self, spec: dict) -> ComplementaryEncoder:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._complements:  # frozen encoders: shared across tasks and registry versions
            self._complements[key] = build_complementary(spec, self.backbone)
        return self._complements[key]

    @torch.inference_mode()
    def _classify(self, store: Store, registry: Registry, entry: TaskEntry, info: TaskInfo, key: BuildKey,
                  groups: dict[str, TowerPrompts] | None = None) -> ClassifyTask:
        fingerprint, width = self.backbone.fingerprint, self.backbone.embed_dim
        k, p = self._prompt_shape(registry, entry, key)
        vision_shape = None if (k, p) == (0, 0) else (k, p, self.backbone.vision_width)
        stored = load_features(store, registry.manifest, entry, fingerprint, width, vision_shape)
        if stored is not None and (vision_shape is None or stored.vision is not None):
            features, vision = stored.features, stored.vision  # one file read: no weights, no text tower
        else:
            prompts = self.prompt_maker.classify(registry, entry, store, groups)
            if stored is not None:
                features = stored.features
            else:
                texts = [format_template(entry.template, c) for c in entry.classes]
                tokens = self.text_encoder.tokenize(texts, prompts.text_tokens).to(self.backbone.device)
                features = self.text_encoder(tokens, prompts.text)  # (C, E), normalised
            vision = prompts.vision
            store_features(store, registry.manifest, entry, fingerprint, features, vision)

        def load_prompts() -> TowerPrompts:
            return self.prompt_maker.classify(registry, entry, store)

        device = self.backbone.device
        return ClassifyTask(info, features.to(device), None if vision is None else vision.to(device), key,
                            load_prompts)

    def _fusion_task(self, registry: Registry, entry: TaskEntry, info: TaskInfo) -> FusionTask:
        model = load_fusion(registry, entry.name, self.backbone)
        spec = dict(entry.complementary or {"kind": "clip_text"})
        complement = self._complement(spec)
        if entry.psi_dim is not None and int(entry.psi_dim) != complement.dim:
            raise PromptConfigError(f"psi_dim is {entry.psi_dim} but the complementary encoder {spec} gives "
                                    f"{complement.dim}")
        return FusionTask(info, model, complement)

    def _prompt_shape(self, registry: Registry, entry: TaskEntry, key: BuildKey) -> tuple[int, int]:
        """(K, P) of a classify task's visual prompts, from its configs alone (tasks may not be loaded yet): once
        per distinct pair of frozen task and group configs, which its build key holds."""
        configs_key = (key[2], None if key[-1] is None else key[-1][1])
        shape = self._shapes.get(configs_key)
        if shape is None:
            group = registry.manifest.group(entry.group) if entry.group is not None else None
            configs = [entry.prompt_config] if group is None else [group.prompt_config, entry.prompt_config]
            vision = [p.vision for p in (self.prompt_maker.initial(c) for c in configs) if p.vision is not None]
            shape = (0, 0) if not vision else (int(vision[0].shape[0]), sum(int(v.shape[1]) for v in vision))
            self._shapes[configs_key] = shape
        return shape

    def _guarded(self, where: str, name: str, work: Callable[[], Any]) -> Any:
        """Run one task's load; its errors as RegistryError naming the manifest and the task."""
        try:
            return work()
        except RegistryError:
            raise
        except (MmserveError, ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError) as exc:
            raise RegistryError(f"{where}: tasks[{name}]: {exc}") from None

    def build(self, path: str | Path, version: str | None = None) -> Snapshot:
        """Load, validate and build a version (default: the current one) of a store or registry directory
        without serving it; raises RegistryError, and then what the previous build made stays as it was."""
        with paused_gc():
            return self._build(path, version)

    def _build(self, path: str | Path, version: str | None) -> Snapshot:
        store = Store.open(path)
        if version is None:
            head = store.head()
            if head is None:
                raise RegistryError(f"{store.where(MANIFEST)}: no manifest (not a registry directory), and no "
                                    f"{HEAD} (not a store with a version: add tasks with mmserve registry add)")
            version = head.version
        registry = open_version(store, version, self.backbone)
        where = store.manifest_where(version)
        manifest = registry.manifest
        if not manifest.tasks:
            raise RegistryError(f"{where}: tasks: the registry has no task to serve")
        bounded = self.resident.capacity is not None
        infos = {e.name: _part(self._infos, e, lambda e=e: TaskInfo.from_entry(e)) for e in manifest.tasks}
        self._infos = {id(e): self._infos[id(e)] for e in manifest.tasks}  # the entries served from now on
        entries = {e.name: e for e in manifest.tasks}
        keys: dict[str, BuildKey] = {}
        held: dict[str, ClassifyTask] = {}
        fresh: dict[BuildKey, ClassifyTask] = {}  # loaded by this build: resident once the whole build succeeds
        fusion: dict[str, FusionTask] = {}
        fusion_built: dict[BuildKey, FusionTask] = {}
        shapes: set[tuple[int, int]] = set()
        groups: dict[str, TowerPrompts] = {}
        parts: dict[int, tuple[object, tuple]] = {}  # this build's key shares, from the last build's where the same
        fusion_rebuilt = 0
        for entry in manifest.tasks:
            info, key = infos[entry.name], build_key(registry, entry, self._parts)
            parts[id(entry)] = self._parts[id(entry)]
            if entry.group is not None:
                config = registry.manifest.group(entry.group).prompt_config
                parts[id(config)] = self._parts[id(config)]
            if entry.kind == "fuse":
                task = self._fusion.get(key)
                if task is None:
                    def make(entry: TaskEntry = entry, info: TaskInfo = info) -> FusionTask:
                        check_entry(store, registry, entry, self.backbone)
                        return self._fusion_task(registry, entry, info)
                    task = self._guarded(where, entry.name, make)
                    fusion_rebuilt += 1
                else:
                    task = replace(task, info=info)
                fusion_built[key], fusion[entry.name] = task, task
                continue
            keys[entry.name] = key
            shapes.add(self._guarded(where, entry.name, lambda e=entry, k=key: self._prompt_shape(registry, e, k)))
            loaded = fresh.get(key) or self.resident.peek(key)
            changed = self._keys is not None and key not in self._keys
            if loaded is None and (not bounded or changed):
                loaded = self._guarded(where, entry.name, lambda e=entry, i=info, k=key: self._classify(
                    store, registry, e, i, k, groups))
                fresh[key] = loaded
            if not bounded:  # the same listing (the usual case): the task as it was, no copy
                held[entry.name] = loaded if loaded.info is info or loaded.info == info else replace(loaded,
                                                                                                     info=info)
        try:  # open the runtime's graphs now: the first request must not pay, a missing graph must refuse the load
            self.runtime.prepare(shapes, {n: (t.model, t.complement.dim) for n, t in fusion.items()})
        except MmserveError as exc:
            raise RegistryError(f"{where}: runtime {self.runtime.name}: {exc}") from None
        self.rebuilt = len(fresh) + fusion_rebuilt
        for key, task in fresh.items():
            self.resident.put(key, task)
        if not bounded:
            self.resident.retain(keys.values())
        self._fusion, self._keys = fusion_built, frozenset(keys.values())
        self._parts = parts

        def load(info: TaskInfo, key: BuildKey) -> ClassifyTask:
            entry = entries[info.name]
            return self._guarded(where, info.name, lambda: self._classify(store, registry, entry, info, key))

        classify = ClassifyTasks(MappingProxyType(infos), MappingProxyType(keys), self.resident, load,
                                 None if bounded else MappingProxyType(held))
        root = Path(path).resolve() if store.is_local else store.url
        return Snapshot(version, root, now_iso(),  # type: ignore[arg-type]
                        tuple(infos.values()), classify, MappingProxyType(fusion))


BuildKey = tuple  # what a served task is built from (build_key): equal keys, equal tensors
_SCALARS = (str, int, float, bool, type(None))


def frozen(value: Any) -> Hashable:
    """A JSON value as a hashable value with the same equality (dict keys sorted)."""
    if type(value) is dict and all(type(v) in _SCALARS for v in value.values()):  # a prompt config: flat
        return tuple(sorted(value.items()))
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    return value


def build_key(registry: Registry, entry: TaskEntry, parts: dict[int, tuple[object, tuple]] | None = None
              ) -> BuildKey:
    """What a served task is built from: its kind, weights, config and classes, and its group's weights (a tuple:
    thousands of tasks are keyed at every build). `parts` keeps each entry's and group's share by object, for
    the entries that versions share (mmserve.store keeps them across the versions it parses)."""
    own = _part(parts, entry, lambda: (entry.kind, entry.sha256, frozen(entry.prompt_config), tuple(entry.classes),
                                       entry.template, entry.head, frozen(entry.complementary), entry.psi_dim))
    if entry.group is None:
        return (*own, None)
    group = registry.manifest.group(entry.group)  # a new object in each version; its config dict is shared
    return (*own, (group.sha256, _part(parts, group.prompt_config, lambda: frozen(group.prompt_config))))


def _part(parts: dict[int, tuple[object, Any]] | None, owner: object, make: Callable[[], Any]) -> Any:
    """What `make` makes of `owner`, kept in `parts` by the object (held there, so its id stays its own)."""
    cached = None if parts is None else parts.get(id(owner))
    if cached is not None and cached[0] is owner:
        return cached[1]
    value = make()
    if parts is not None:
        parts[id(owner)] = (owner, value)
    return value
