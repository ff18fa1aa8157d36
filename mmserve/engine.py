"""The inference engine: one frozen backbone, an immutable snapshot per registry version, mixed-task batches.

`reload` builds and validates a whole new snapshot (mmserve.snapshot) before swapping one reference, so a request
that took the old snapshot finishes on it, and a registry that fails validation never replaces the one being
served.

Mixed-task classification: the visual prompts of every task in a batch are gathered per sample into one
(B, K, P, d_v) tensor and the batch runs ONE image-tower forward pass. Tasks whose prompts differ in depth K or
length P cannot share a tensor, so a batch is split into one sub-batch per (K, P); tasks sharing a prompt
shape (the usual case: one registry, one prompt config) always share the pass. Fusion batches are grouped per
task (each task has its own MoPE + head) and each group runs one pass.

A batch of independent requests (`classify_requests`, `fuse_requests`) answers each with an Outcome: a result,
or that request's own RequestError (mmserve.errors); one bad request never fails the rest of its batch.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmserve.answers import ClassifyResult, FuseResult, Outcome, Prediction, ReloadResult
from mmserve.backbone import Backbone, load_backbone
from mmserve.config import ServeConfig, registry_location
from mmserve.encoders import PromptedTextEncoder
from mmserve.errors import (
    InvalidInputError,
    RegistryError,
    RequestError,
    RuntimeUnavailableError,
    TaskUnavailableError,
)
from mmserve.fusion import head_probabilities
from mmserve.images import preprocess_config
from mmserve.runtime import check_runtime, make_runtime
from mmserve.snapshot import ClassifyTask, FusionTask, Snapshot, SnapshotBuilder
from mmserve.store import Store, StoreUnreachableError, paused_gc
from mmserve.versions import Change, add_tasks, remove_tasks, rollback

__all__ = ["ClassifyRequest", "FuseRequest", "InferenceEngine"]


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


def _settle() -> None:
    """After a version is served: what it holds leaves the cyclic collector's generations (gc.freeze). At 10,000
    tasks a full collection, which allocations trigger at any moment, cost ~0.8 s in the middle of a change or a
    batch; what a later version drops is still freed by reference counting (only reference cycles among frozen
    objects would stay, and a snapshot makes none)."""
    gc.freeze()


class InferenceEngine:
    """Loads the backbone and a registry once; answers classification and fusion batches; hot-swaps registries."""

    def __init__(self, backbone: Backbone, registry: str | Path, runtime: str = "torch",
                 max_resident: int | None = None):
        self.backbone = backbone
        self.runtime = make_runtime(runtime, backbone)
        self.text_encoder = PromptedTextEncoder(backbone)
        self.image_size = backbone.image_size
        self._builder = SnapshotBuilder(backbone, self.text_encoder, self.runtime, max_resident)
        self.resident = self._builder.resident  # the classify tasks in memory (bounded: MMSERVE_MAX_RESIDENT_TASKS)
        self._reload_lock = threading.Lock()
        self.registry_path = registry_location(registry)
        self._snapshot = self.build_snapshot(self.registry_path)
        _settle()
        self.store_error: str | None = None  # set while the store does not answer polls (the last good version serves)

    @classmethod
    def from_config(cls, config: ServeConfig) -> InferenceEngine:
        """Engine for a ServeConfig (backbone spec, registry path, runtime)."""
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"MMSERVE_DEVICE={config.device} but torch sees no CUDA device")
        check_runtime(config.runtime)  # fail before the (slow) backbone load
        return cls(load_backbone(config.backbone_spec()), config.registry, config.runtime,
                   config.max_resident_tasks)

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot being served; take it once per request and use only that one."""
        return self._snapshot

    # ---- registry versions ---------------------------------------------------------------------------------

    def build_snapshot(self, path: str | Path) -> Snapshot:
        """Load, validate and fully build a registry version without serving it; raises RegistryError."""
        return self._builder.build(path)

    def reload(self, path: str | Path | None = None) -> ReloadResult:
        """Build `path` (default: re-read the current one) and swap it in; RegistryError keeps the old one."""
        with self._reload_lock:
            target = registry_location(path) if path is not None else self.registry_path
            fresh = self.build_snapshot(target)
            previous = self._snapshot
            self._snapshot = fresh  # the swap: one reference assignment
            self.registry_path = target
        _settle()
        return ReloadResult(previous.version, fresh.version, fresh.root, len(fresh.infos))

    def poll(self) -> ReloadResult | None:
        """Serve the store's current version if it moved since the served one (whoever moved it); None if not.

        A registry directory in the older layout is never polled: it changes only through reload(). A store
        that does not answer keeps the served version and sets `store_error`; a version that fails validation
        is logged by the caller and retried at the next poll.
        """
        try:
            store = Store.open(self.registry_path)
            head = None if store.legacy else store.head()
        except StoreUnreachableError as exc:
            self.store_error = str(exc)
            return None
        self.store_error = None
        if head is None or head.version == self._snapshot.version:
            return None
        return self.reload()

    def change(self, operation: str, source: str | None = None, tasks: Sequence[str] | None = None,
               version: str | None = None, expected: str | None = None) -> tuple[Change, ReloadResult]:
        """A per-task change to the store this engine serves (add | remove | rollback), built and checked
        against this backbone before the store's HEAD moves, then served here at once (other workers and
        servers follow within their poll). RegistryError (StaleVersionError on a lost race) changes nothing."""
        store = Store.open(self.registry_path)
        if store.legacy:
            raise RegistryError(f"{self.registry_path}: a registry directory has no per-task versions; serve a "
                                f"store (mmserve registry add STORE {self.registry_path}) to change tasks one by one")
        built: dict[str, Snapshot] = {}

        def check(candidate: str) -> None:
            built[candidate] = self.build_snapshot_version(candidate)

        with self._reload_lock, paused_gc():
            if operation == "add":
                if not source:
                    raise RegistryError("add: 'source' (a registry directory or store URL) is required")
                done = add_tasks(store, source, tasks, expected, check)
            elif operation == "remove":
                done = remove_tasks(store, list(tasks or []), expected, check)
            elif operation == "rollback":
                done = rollback(store, version, expected, check)
            else:
                raise RegistryError(f"unknown operation {operation!r} (add, remove, rollback)")
            previous, self._snapshot = self._snapshot, built[done.version]
        _settle()
        fresh = self._snapshot
        return done, ReloadResult(previous.version, fresh.version, fresh.root, len(fresh.infos))

    def build_snapshot_version(self, version: str) -> Snapshot:
        """Build one version of the served store (not necessarily its current one) without serving it."""
        return self._builder.build(self.registry_path, version)

    def describe(self) -> dict[str, Any]:
        """What the service front needs: served version, tasks, preprocessing, runtime and backbone."""
        snap = self._snapshot
        return {"registry_version": snap.version, "registry_loaded_at": snap.loaded_at,
                "tasks": [t.to_dict() for t in snap.infos], "runtime": self.runtime.name,
                "backbone": {"model": self.backbone.spec.model, "fingerprint": self.backbone.fingerprint},
                "image_size": self.image_size, "preprocess": preprocess_config(self.backbone),
                "store": {"location": str(self.registry_path), "reachable": self.store_error is None,
                          "error": self.store_error},
                "residency": self.resident.stats()}

    # ---- inference ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, entries: Sequence[ClassifyTask | None]) -> torch.Tensor:
        """Normalised image features (B, E) of images (B, 3, S, S), sample i through entries[i]'s visual prompts
        (none for None): one forward pass per distinct prompt shape in the batch (usually exactly one)."""
        images = images.to(self.backbone.device, torch.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, entry in enumerate(entries):
            groups.setdefault((0, 0) if entry is None else entry.prompt_shape, []).append(i)
        out: torch.Tensor | None = None
        for shape, rows in groups.items():
            whole = len(rows) == len(entries)
            index = torch.tensor(rows, device=images.device)
            sub = images if whole else images.index_select(0, index)
            prompts = None if shape == (0, 0) else torch.stack(
                [entries[i].vision_prompts for i in rows]).to(images.device)  # type: ignore[union-attr,misc]
            feats = self.runtime.encode(sub, prompts)
            if whole:
                return feats
            if out is None:
                out = feats.new_empty(len(entries), feats.shape[-1])
            out[index] = feats
        assert out is not None, "no images"
        return out

    @torch.inference_mode()
    def classify(self, images: torch.Tensor, tasks: Sequence[str], top_k: int | Sequence[int] = 5,
                 snapshot: Snapshot | None = None) -> list[ClassifyResult]:
        """Classify images (B, 3, S, S), sample i with task tasks[i], in one mixed-task forward pass; a task that
        is not resident loads first (RegistryError when the store cannot give it)."""
        snap = snapshot or self._snapshot
        if images.dim() != 4 or images.shape[0] != len(tasks):
            raise ValueError(f"images must be (B, 3, H, W) with B = len(tasks) = {len(tasks)}, got "
                             f"{tuple(images.shape)}")
        if not len(tasks):
            return []
        ks = [top_k] * len(tasks) if isinstance(top_k, int) else list(top_k)
        entries = [snap.require(t, "classify") for t in tasks]
        feats = self.encode_images(images, entries)
        scale = self.backbone.logit_scale
        rows: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            rows.setdefault(t, []).append(i)
        results: list[ClassifyResult | None] = [None] * len(tasks)
        for name, idx in rows.items():
            task = entries[idx[0]]
            probs = (scale * feats[idx] @ task.text_features.T).softmax(dim=-1).cpu()
            order = probs.argsort(dim=-1, descending=True)
            classes = task.info.classes
            for row, i in enumerate(idx):
                k = max(1, min(int(ks[i]), len(classes)))
                top = tuple(Prediction(classes[j], float(probs[row, j])) for j in order[row, :k].tolist())
                results[i] = ClassifyResult(name, top, snap.version)
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

    def check_image(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A preprocessed image as a float tensor (3, S, S); InvalidInputError otherwise."""
        tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        expected = (3, self.image_size, self.image_size)
        if tuple(tensor.shape) != expected or not tensor.is_floating_point():
            raise InvalidInputError(f"preprocessed image must be a float tensor {expected}, got {tuple(tensor.shape)} "
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
                try:
                    snap.require(req.task, "classify")  # a cold task loads here, before the batch's forward pass
                except RegistryError as exc:
                    raise TaskUnavailableError(f"task {req.task!r} could not be loaded: {exc}") from None
                images.append(self.check_image(req.image))
                good.append(i)
            except RequestError as exc:
                outcomes[i] = Outcome.failure(exc)
        if good:
            results = self.classify(torch.stack(images), [requests[i].task for i in good],
                                    [requests[i].top_k for i in good], snapshot=snap)
            for i, res in zip(good, results, strict=True):
                outcomes[i] = Outcome(res.to_dict())
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
                    raise InvalidInputError("text must be a non-empty string")
                groups.setdefault(req.task, []).append((i, self.check_image(req.image)))
            except RequestError as exc:
                outcomes[i] = Outcome.failure(exc)
        for task, members in groups.items():
            rows = [i for i, _ in members]
            results = self.fuse(torch.stack([img for _, img in members]), [requests[i].text for i in rows], task,
                                snapshot=snap)
            for i, res in zip(rows, results, strict=True):
                outcomes[i] = Outcome(res.to_dict())
        return outcomes  # type: ignore[return-value]
