"""The inference engine: one frozen backbone, an immutable snapshot per registry version, mixed-task batches.

A snapshot holds everything a request needs that does not depend on the request: per classification task the
class text features (text tower + the task's text prompts, computed once at load) and the task's visual prompts;
per fusion task its MoPE + head and complementary encoder. `reload` builds and validates a whole new snapshot
before swapping one reference, so a request that took the old snapshot finishes on it, and a registry that
fails validation never replaces the one being served.

Mixed-task classification: the visual prompts of every task in a batch are gathered per sample into one
(B, K, P, d_v) tensor and the batch runs ONE image-tower forward pass. Tasks whose prompts differ in depth K or
length P cannot share a tensor, so a batch is split into one sub-batch per (K, P); tasks sharing a prompt
shape (the usual case: one registry, one prompt config) always share the pass. Fusion batches are grouped per
task (each task has its own MoPE + head) and each group runs one pass.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from mmserve.backbone import Backbone, load_backbone
from mmserve.builders import load_classify_prompts, load_fusion, load_registry
from mmserve.complementary import ComplementaryEncoder, build_complementary
from mmserve.config import ServeConfig
from mmserve.encoders import PromptedTextEncoder
from mmserve.errors import MmserveError, PromptConfigError, RegistryError
from mmserve.fusion import FusionModel, head_probabilities
from mmserve.images import preprocess_config
from mmserve.registry import MANIFEST, Registry, TaskEntry, now_iso
from mmserve.runtime import ImageRuntime, TorchImageRuntime

KINDS_ENDPOINT = {"classify": "/classify", "fuse": "/fuse"}


class TaskError(MmserveError):
    """A request names a task it cannot use; `status` is the HTTP status the service answers with."""

    status = 400

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details = details


class UnknownTaskError(TaskError):
    """No task of that name in the registry version being served."""

    status = 404


class WrongTaskKindError(TaskError):
    """The task exists but is of the other kind (a fusion task sent to /classify or the reverse)."""

    status = 400


class RuntimeUnavailableError(MmserveError):
    """The configured image-tower runtime cannot be used in this installation."""


def _onnx_runtime(backbone: Backbone) -> ImageRuntime:
    """onnxruntime engine; graphs from MMSERVE_ONNX_DIR (default models/onnx), see mmserve.onnx_runtime."""
    from mmserve.onnx.runtime import OnnxImageRuntime

    return OnnxImageRuntime(backbone)


RUNTIMES: dict[str, Callable[[Backbone], ImageRuntime]] = {"torch": TorchImageRuntime, "onnx": _onnx_runtime}


def check_runtime(name: str) -> None:
    """Raise RuntimeUnavailableError unless runtime `name` can be built here."""
    if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailableError(
            "runtime 'onnx' needs onnxruntime: pip install 'mmserve[cpu]' (or 'mmserve[gpu]' for onnxruntime-gpu)")
    if name in RUNTIMES:
        return
    raise RuntimeUnavailableError(f"unknown runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})")


def make_runtime(name: str, backbone: Backbone) -> ImageRuntime:
    """The image-tower runtime `name` (MMSERVE_RUNTIME)."""
    check_runtime(name)
    return RUNTIMES[name](backbone)


@dataclass(frozen=True)
class Prediction:
    """One class and its probability."""

    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"label": self.label, "score": self.score}


@dataclass(frozen=True)
class ClassifyResult:
    """The answer to one classification request."""

    task: str
    label: str
    score: float
    top_k: tuple[Prediction, ...]
    registry_version: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {task, label, score, top_k: [{label, score}], registry_version}."""
        return {"task": self.task, "label": self.label, "score": self.score,
                "top_k": [p.to_dict() for p in self.top_k], "registry_version": self.registry_version}


@dataclass(frozen=True)
class FuseResult:
    """The answer to one fusion request: the label (multi-class) or the labels above threshold (multi-label)."""

    task: str
    head: str
    scores: tuple[Prediction, ...]  # every class, best first
    registry_version: str
    threshold: float | None = None  # multi-label only

    @property
    def labels(self) -> tuple[Prediction, ...]:
        """Multi-label: the classes above threshold (best first); multi-class: the top class."""
        if self.head == "multilabel":
            threshold = 0.5 if self.threshold is None else float(self.threshold)
            return tuple(p for p in self.scores if p.score > threshold)
        return self.scores[:1]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; multi-class: label + score; multi-label: labels above threshold; both: every score."""
        out: dict[str, Any] = {"task": self.task, "head": self.head}
        if self.head == "multilabel":
            out["labels"] = [p.to_dict() for p in self.labels]
            out["threshold"] = self.threshold
        else:
            out["label"], out["score"] = self.scores[0].label, self.scores[0].score
        out["scores"] = [p.to_dict() for p in self.scores]
        out["registry_version"] = self.registry_version
        return out


@dataclass(frozen=True)
class TaskInfo:
    """What /tasks shows about a task."""

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
        out = {"name": self.name, "kind": self.kind, "endpoint": KINDS_ENDPOINT[self.kind], "group": self.group,
               "classes": list(self.classes), "metrics": dict(self.metrics),
               "trainable_params": self.trainable_params, "created": self.created}
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

    def names(self, kind: str | None = None) -> list[str]:
        """Task names (of one kind, if given) in manifest order."""
        return [t.name for t in self.infos if kind is None or t.kind == kind]

    def require(self, name: str, kind: str) -> ClassifyTask | FusionTask:
        """The task `name`, which must be of `kind`; raises UnknownTaskError / WrongTaskKindError."""
        tasks = self.classify if kind == "classify" else self.fusion
        if name in tasks:
            return tasks[name]
        known = self.names(kind)
        other = self.fusion if kind == "classify" else self.classify
        if name in other:
            other_kind = "fuse" if kind == "classify" else "classify"
            raise WrongTaskKindError(
                f"task '{name}' is a {other_kind} task: send it to POST {KINDS_ENDPOINT[other_kind]}",
                known_tasks=known)
        raise UnknownTaskError(f"unknown task '{name}'; known {kind} tasks: {', '.join(known) or '(none)'}",
                               known_tasks=known)


@dataclass(frozen=True)
class ReloadResult:
    """What an admin reload did."""

    previous_version: str
    version: str
    root: Path
    tasks: int

    @property
    def changed(self) -> bool:
        """True when the served registry version differs from the previous one."""
        return self.previous_version != self.version

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"previous_version": self.previous_version, "version": self.version, "changed": self.changed,
                "path": str(self.root), "tasks": self.tasks}


@dataclass(frozen=True)
class ClassifyRequest:
    """One preprocessed image (3, S, S) to classify with `task`."""

    image: torch.Tensor | np.ndarray
    task: str
    top_k: int = 5


@dataclass(frozen=True)
class FuseRequest:
    """One preprocessed image (3, S, S) plus its text, for fusion task `task`."""

    image: torch.Tensor | np.ndarray
    text: str
    task: str


@dataclass(frozen=True)
class Outcome:
    """Per-request result of a batch: a JSON-able result, or an HTTP status and message for that request alone."""

    status: int
    result: dict[str, Any] | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, exc: TaskError | MmserveError, status: int | None = None) -> Outcome:
        """From a user-facing error."""
        return cls(status or getattr(exc, "status", 400), error=str(exc), details=dict(getattr(exc, "details", {})))

    def to_dict(self) -> dict[str, Any]:
        """JSON form exchanged between the service processes."""
        return {"status": self.status, "result": self.result, "error": self.error, "details": self.details}


def _format_template(template: str, name: str) -> str:
    if "{}" not in template:
        raise PromptConfigError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template.format(name)


class InferenceEngine:
    """Loads the backbone and a registry once; answers classify/fuse batches; hot-swaps registry versions."""

    def __init__(self, backbone: Backbone, registry: str | Path, runtime: str = "torch"):
        self.backbone = backbone
        self.runtime = make_runtime(runtime, backbone)
        self.text_encoder = PromptedTextEncoder(backbone)
        self.image_size = backbone.image_size
        self._complements: dict[str, ComplementaryEncoder] = {}
        self._reload_lock = threading.Lock()
        self._snapshot = self.build_snapshot(registry)
        self.registry_path = Path(registry)

    @classmethod
    def from_config(cls, config: ServeConfig) -> InferenceEngine:
        """Engine for a ServeConfig (backbone spec, registry path, runtime)."""
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"MMSERVE_DEVICE={config.device} but torch sees no CUDA device")
        check_runtime(config.runtime)  # fail before the (slow) backbone load
        return cls(load_backbone(config.backbone_spec()), config.registry, config.runtime)

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot being served; take it once per request and use only that one."""
        return self._snapshot

    # ---- building and swapping registry versions -------------------------------------------------------

    def _complement(self, spec: dict) -> ComplementaryEncoder:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._complements:  # frozen encoders: shared across tasks and registry versions
            self._complements[key] = build_complementary(spec, self.backbone)
        return self._complements[key]

    @torch.inference_mode()
    def _build_classify(self, registry: Registry, entry: TaskEntry) -> ClassifyTask:
        prompts = load_classify_prompts(registry, entry.name, self.backbone)()
        texts = [_format_template(entry.template, c) for c in entry.classes]
        tokens = self.text_encoder.tokenize(texts, prompts.text_tokens).to(self.backbone.device)
        features = self.text_encoder(tokens, prompts.text)  # (C, E), normalised
        vision = None if prompts.vision is None else prompts.vision.detach().clone()
        return ClassifyTask(TaskInfo.from_entry(entry), features, vision)

    def _build_fusion(self, registry: Registry, entry: TaskEntry) -> FusionTask:
        model = load_fusion(registry, entry.name, self.backbone)
        spec = dict(entry.complementary or {"kind": "clip_text"})
        complement = self._complement(spec)
        if entry.psi_dim is not None and int(entry.psi_dim) != complement.dim:
            raise PromptConfigError(f"psi_dim is {entry.psi_dim} but the complementary encoder {spec} gives "
                                    f"{complement.dim}")
        return FusionTask(TaskInfo.from_entry(entry), model, complement)

    def build_snapshot(self, path: str | Path) -> Snapshot:
        """Load, validate and fully build a registry version without serving it; raises RegistryError."""
        root = Path(path)
        registry = load_registry(root, self.backbone)
        if not registry.manifest.tasks:
            raise RegistryError(f"{root / MANIFEST}: tasks: the registry has no task to serve")
        classify: dict[str, ClassifyTask] = {}
        fusion: dict[str, FusionTask] = {}
        for entry in registry.manifest.tasks:
            try:
                if entry.kind == "classify":
                    classify[entry.name] = self._build_classify(registry, entry)
                else:
                    fusion[entry.name] = self._build_fusion(registry, entry)
            except RegistryError:
                raise
            except (MmserveError, ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError) as exc:
                raise RegistryError(f"{root / MANIFEST}: tasks[{entry.name}]: {exc}") from None
        by_shape: dict[tuple[int, int], list[ClassifyTask]] = {}
        for task in classify.values():
            if task.vision_prompts is not None:
                by_shape.setdefault(task.prompt_shape, []).append(task)
        banks = {shape: PromptBank(torch.stack([t.vision_prompts for t in tasks]),
                                   MappingProxyType({t.info.name: i for i, t in enumerate(tasks)}))
                 for shape, tasks in by_shape.items()}
        try:  # open the runtime's graphs now: the first request must not pay, a missing graph must refuse the load
            self.runtime.prepare({t.prompt_shape for t in classify.values()},
                                 {n: (t.model, t.complement.dim) for n, t in fusion.items()})
        except MmserveError as exc:
            raise RegistryError(f"{root / MANIFEST}: runtime {self.runtime.name}: {exc}") from None
        return Snapshot(registry.version, root.resolve(), now_iso(),
                        tuple(TaskInfo.from_entry(e) for e in registry.manifest.tasks),
                        MappingProxyType(classify), MappingProxyType(fusion), MappingProxyType(banks))

    def reload(self, path: str | Path | None = None) -> ReloadResult:
        """Build `path` (default: re-read the current one) and swap it in; RegistryError keeps the old one."""
        with self._reload_lock:
            target = Path(path) if path is not None else self.registry_path
            fresh = self.build_snapshot(target)
            previous = self._snapshot
            self._snapshot = fresh  # the swap: one reference assignment
            self.registry_path = target
        return ReloadResult(previous.version, fresh.version, fresh.root, len(fresh.infos))

    def describe(self) -> dict[str, Any]:
        """What the service front needs: served version, tasks, preprocessing, runtime and backbone."""
        snap = self._snapshot
        return {"registry_version": snap.version, "registry_loaded_at": snap.loaded_at,
                "tasks": [t.to_dict() for t in snap.infos], "runtime": self.runtime.name,
                "backbone": {"model": self.backbone.spec.model, "fingerprint": self.backbone.fingerprint},
                "image_size": self.image_size, "preprocess": preprocess_config(self.backbone)}

    # ---- inference ---------------------------------------------------------------------------------------

    def _encode_mixed(self, images: torch.Tensor, tasks: Sequence[str], entries: Sequence[ClassifyTask],
                      snap: Snapshot) -> torch.Tensor:
        """Image features (B, E): one forward pass per distinct prompt shape in the batch (usually exactly one)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, entry in enumerate(entries):
            groups.setdefault(entry.prompt_shape, []).append(i)
        out: torch.Tensor | None = None
        for shape, rows in groups.items():
            whole = len(rows) == len(entries)
            index = torch.tensor(rows, device=images.device)
            sub = images if whole else images.index_select(0, index)
            prompts = None if shape == (0, 0) else snap.banks[shape].gather([tasks[i] for i in rows])
            feats = self.runtime.encode(sub, prompts)
            if whole:
                return feats
            if out is None:
                out = feats.new_empty(len(entries), feats.shape[-1])
            out[index] = feats
        assert out is not None
        return out

    @torch.inference_mode()
    def classify(self, images: torch.Tensor, tasks: Sequence[str], top_k: int | Sequence[int] = 5,
                 snapshot: Snapshot | None = None) -> list[ClassifyResult]:
        """Classify images (B, 3, S, S), sample i with task tasks[i], in one mixed-task forward pass."""
        snap = snapshot or self._snapshot
        if images.dim() != 4 or images.shape[0] != len(tasks):
            raise ValueError(f"images must be (B, 3, H, W) with B = len(tasks) = {len(tasks)}, got "
                             f"{tuple(images.shape)}")
        if not len(tasks):
            return []
        ks = [top_k] * len(tasks) if isinstance(top_k, int) else list(top_k)
        entries = [snap.require(t, "classify") for t in tasks]
        images = images.to(self.backbone.device, torch.float32)
        feats = self._encode_mixed(images, tasks, entries, snap)
        scale = self.backbone.logit_scale
        rows: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            rows.setdefault(t, []).append(i)
        results: list[ClassifyResult | None] = [None] * len(tasks)
        for name, idx in rows.items():
            task = snap.classify[name]
            probs = (scale * feats[idx] @ task.text_features.T).softmax(dim=-1).cpu()
            order = probs.argsort(dim=-1, descending=True)
            classes = task.info.classes
            for row, i in enumerate(idx):
                k = max(1, min(int(ks[i]), len(classes)))
                top = tuple(Prediction(classes[j], float(probs[row, j])) for j in order[row, :k].tolist())
                results[i] = ClassifyResult(name, top[0].label, top[0].score, top, snap.version)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def fuse(self, images: torch.Tensor, texts: Sequence[str], task: str, snapshot: Snapshot | None = None
             ) -> list[FuseResult]:
        """Fuse images (B, 3, S, S) with texts (B) for fusion task `task`."""
        snap = snapshot or self._snapshot
        if images.dim() != 4 or images.shape[0] != len(texts):
            raise ValueError(f"images must be (B, 3, H, W) with B = len(texts) = {len(texts)}, got "
                             f"{tuple(images.shape)}")
        entry = snap.require(task, "fuse")
        assert isinstance(entry, FusionTask)
        if not len(texts):
            return []
        images = images.to(self.backbone.device, torch.float32)
        psi = entry.complement.encode(list(texts)).to(images.device)
        logits, _routing = self.runtime.fuse(task, entry.model, images, psi)
        probs = head_probabilities(logits, entry.model.multilabel).cpu()
        order = probs.argsort(dim=-1, descending=True)
        info = entry.info
        return [FuseResult(task, info.head or "multiclass",
                           tuple(Prediction(info.classes[j], float(probs[i, j])) for j in order[i].tolist()),
                           snap.version, info.threshold)
                for i in range(len(texts))]

    # ---- batches of independent requests (what the service's batchable APIs call) -------------------------

    def _check_image(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        expected = (3, self.image_size, self.image_size)
        if tuple(tensor.shape) != expected or not tensor.is_floating_point():
            raise TaskError(f"preprocessed image must be a float tensor {expected}, got {tuple(tensor.shape)} "
                            f"{tensor.dtype}")
        return tensor

    def classify_requests(self, requests: Sequence[ClassifyRequest]) -> list[Outcome]:
        """Answer independent requests in one mixed-task pass; a bad request fails alone, never its batch."""
        snap = self._snapshot
        outcomes: list[Outcome | None] = [None] * len(requests)
        good: list[int] = []
        images: list[torch.Tensor] = []
        for i, req in enumerate(requests):
            try:
                snap.require(req.task, "classify")
                images.append(self._check_image(req.image))
                good.append(i)
            except TaskError as exc:
                outcomes[i] = Outcome.failure(exc)
        if good:
            results = self.classify(torch.stack(images), [requests[i].task for i in good],
                                    [requests[i].top_k for i in good], snapshot=snap)
            for i, res in zip(good, results, strict=True):
                outcomes[i] = Outcome(200, res.to_dict())
        return outcomes  # type: ignore[return-value]

    def fuse_requests(self, requests: Sequence[FuseRequest]) -> list[Outcome]:
        """Answer independent fusion requests, one pass per task present; a bad request fails alone."""
        snap = self._snapshot
        outcomes: list[Outcome | None] = [None] * len(requests)
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for i, req in enumerate(requests):
            try:
                snap.require(req.task, "fuse")
                if not isinstance(req.text, str) or not req.text.strip():
                    raise TaskError("text must be a non-empty string")
                groups.setdefault(req.task, []).append((i, self._check_image(req.image)))
            except TaskError as exc:
                outcomes[i] = Outcome.failure(exc)
        for task, members in groups.items():
            rows = [i for i, _ in members]
            results = self.fuse(torch.stack([img for _, img in members]), [requests[i].text for i in rows], task,
                                snapshot=snap)
            for i, res in zip(rows, results, strict=True):
                outcomes[i] = Outcome(200, res.to_dict())
        return outcomes  # type: ignore[return-value]
