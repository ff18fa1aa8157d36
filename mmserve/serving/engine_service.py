"""MmServeEngine: the internal BentoML service that holds the backbone and the registry snapshot.

Reached by the front over a local socket, never exposed on the port. Its inference APIs are `batchable`, so
BentoML's adaptive batching coalesces the one-item calls of concurrent requests, of ANY tasks, into one list,
which the engine answers with one mixed-task forward pass, one Outcome per item.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar

import bentoml
import numpy as np
import torch

from mmserve.answers import Outcome
from mmserve.embed import EmbedRequest, embed_requests
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.errors import RegistryError
from mmserve.images import preprocess_from_config, split_preprocess
from mmserve.serving.metrics import NO_TASK, EngineMetrics
from mmserve.serving.settings import CONFIG
from mmserve.store import StaleVersionError
from mmserve.vocab import LabelCache, LabelRequest, rank_label_requests
from mmserve.wire import ClassifyItem, EmbedItem, FuseItem, LabelsItem, pixels_to_tensor, unpack_pixels

logger = logging.getLogger("mmserve")

ENGINE_RESOURCES: dict[str, Any] = {"gpu": 1} if CONFIG.device.startswith("cuda") else {"cpu": "2"}
ENGINE_POOL_MAX_REQUESTS = 1_000_000_000  # effectively never by count (see MmServeEngine)
ENGINE_POOL_MAX_AGE_S = 3600.0

Item = TypeVar("Item", ClassifyItem, FuseItem)
Req = TypeVar("Req", ClassifyRequest, FuseRequest)


# no access log here: every engine call is one front request, which the front's access log already records.
# runner_connection: BentoML's client to this service replaces its whole connection pool every `max_requests`
# calls (default 100) and closes the old pool with calls still in flight on it, which fail with "server
# disconnected" (about 1 request in 5 at concurrency 32); the calls stay on one pool, renewed by age only
@bentoml.service(name="mmserve-engine", workers=CONFIG.engine_workers, threads=1, resources=ENGINE_RESOURCES,
                 traffic={"timeout": 120}, logging={"access": {"enabled": False}},
                 runner_connection={"max_requests": ENGINE_POOL_MAX_REQUESTS, "max_age": ENGINE_POOL_MAX_AGE_S})
class MmServeEngine:
    """Internal service: the backbone, the registry snapshot and the batchable inference APIs."""

    def __init__(self) -> None:
        self.engine = InferenceEngine.from_config(CONFIG)
        self.metrics = EngineMetrics()
        split = split_preprocess(preprocess_from_config(self.engine.describe()["preprocess"]))
        self.finish = split[1] if split else None  # ToTensor + Normalize of uint8 pixels from the front
        logger.info("engine ready: registry %s version %s, runtime %s, device %s", CONFIG.registry,
                    self.engine.snapshot.version, self.engine.runtime.name, CONFIG.device)
        if CONFIG.registry_poll_s > 0:  # every worker follows the store on its own: no worker is told of a change
            threading.Thread(target=self._follow_store, name="mmserve-registry-poll", daemon=True).start()

    def __is_ready__(self) -> bool:
        """BentoML's readiness (the front's /readyz asks it): not ready while the store does not answer polls,
        though the last good version keeps serving."""
        return self.engine.store_error is None

    def _follow_store(self) -> None:
        """Serve the store's current version within MMSERVE_REGISTRY_POLL_S of any change, whoever made it."""
        refused = None
        while True:
            time.sleep(CONFIG.registry_poll_s)
            try:
                result = self.engine.poll()
            except RegistryError as exc:  # a version this backbone cannot serve: keep the last good one
                if str(exc) != refused:
                    logger.error("registry version refused, still serving %s: %s", self.engine.snapshot.version, exc)
                    refused = str(exc)
                continue
            except Exception:  # never let the thread die: the next poll tries again
                logger.exception("registry poll failed")
                continue
            refused = None
            if result is not None and result.changed:
                logger.info("registry followed: %s -> %s", result.previous_version, result.version)

    def _tensor(self, item: ClassifyItem | FuseItem) -> torch.Tensor | np.ndarray:
        return pixels_to_tensor(unpack_pixels(item.image, self.engine.image_size, item.pixels), self.finish)

    def _batch(self, endpoint: str, items: list[Item], request: Callable[[Item, torch.Tensor | np.ndarray], Req],
               answer: Callable[[Sequence[Req]], list[Outcome]]) -> list[dict[str, Any]]:
        """Record the batch, turn its items into engine requests, and answer each with its outcome's JSON form."""
        self.metrics.observe(endpoint, [it.task for it in items])
        outcomes = answer([request(it, self._tensor(it)) for it in items])
        self.metrics.observe_residency(self.engine.resident.stats())
        return [o.to_dict() for o in outcomes]

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def classify_batch(self, items: list[ClassifyItem]) -> list[dict[str, Any]]:
        """Classify a batch of independent requests (any mix of tasks) in one forward pass."""
        return self._batch("classify", items, lambda it, image: ClassifyRequest(image, it.task, it.top_k),
                           self.engine.classify_requests)

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def fuse_batch(self, items: list[FuseItem]) -> list[dict[str, Any]]:
        """Fuse a batch of independent image+text requests, one pass per fusion task present."""
        return self._batch("fuse", items, lambda it, image: FuseRequest(image, it.text, it.task),
                           self.engine.fuse_requests)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Served registry version, tasks, preprocessing, runtime and backbone."""
        return self.engine.describe()

    @bentoml.api
    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Build and swap in a registry version (default: re-read the current path); refused if invalid."""
        try:
            result = await asyncio.to_thread(self.engine.reload, path)
        except RegistryError as exc:
            return {"ok": False, "error": str(exc), "serving_version": self.engine.snapshot.version}
        logger.info("registry reloaded: %s -> %s (%s)", result.previous_version, result.version, result.root)
        return {"ok": True, **result.to_dict()}

    @bentoml.api
    async def change(self, operation: str, source: str | None = None, tasks: list[str] | None = None,
                     version: str | None = None, expected_version: str | None = None) -> dict[str, Any]:
        """A per-task change to the store (add, remove, rollback), checked here before it becomes current."""
        try:
            done, served = await asyncio.to_thread(self.engine.change, operation, source, tasks, version,
                                                   expected_version)
        except StaleVersionError as exc:
            return {"ok": False, "conflict": True, "error": str(exc), "serving_version": self.engine.snapshot.version}
        except RegistryError as exc:
            return {"ok": False, "conflict": False, "error": str(exc),
                    "serving_version": self.engine.snapshot.version}
        logger.info("registry changed (%s): %s -> %s", done.operation, served.previous_version, served.version)
        return {"ok": True, **done.to_dict(), "registry_version": served.version}

    @cached_property
    def label_cache(self) -> LabelCache:
        """Label text features of open-vocabulary requests, per (task build, label), bounded LRU."""
        return LabelCache()

    def _image(self, image: str | None, kind: str) -> torch.Tensor | np.ndarray | None:
        return None if image is None else pixels_to_tensor(unpack_pixels(image, self.engine.image_size, kind),
                                                           self.finish)

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def embed_batch(self, items: list[EmbedItem]) -> list[dict[str, Any]]:
        """Embed a batch of independent image and/or text requests (any mix of tasks, or none)."""
        self.metrics.observe("embed", [it.task or NO_TASK for it in items])
        requests = [EmbedRequest(self._image(it.image, it.pixels), it.text, it.task) for it in items]
        return [o.to_dict() for o in embed_requests(self.engine, requests)]

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def labels_batch(self, items: list[LabelsItem]) -> list[dict[str, Any]]:
        """Rank the caller's labels for a batch of images (any mix of tasks, or zero-shot), one image pass."""
        self.metrics.observe("labels", [it.task or NO_TASK for it in items])
        requests = [LabelRequest(self._image(it.image, it.pixels), tuple(it.labels), it.task, it.top_k)
                    for it in items]
        return [o.to_dict() for o in rank_label_requests(self.engine, self.label_cache, requests)]
