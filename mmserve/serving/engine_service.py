"""MmServeEngine: the internal BentoML service that holds the backbone and the registry snapshot.

Reached by the front over a local socket, never exposed on the port. Its inference APIs are `batchable`, so
BentoML's adaptive batching coalesces the one-item calls of concurrent requests, of ANY tasks, into one list,
which the engine answers with one mixed-task forward pass, one Outcome per item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import bentoml
import numpy as np
import torch

from mmserve.answers import Outcome
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.errors import RegistryError
from mmserve.images import preprocess_from_config, split_preprocess
from mmserve.serving.metrics import EngineMetrics
from mmserve.serving.settings import CONFIG
from mmserve.wire import ClassifyItem, FuseItem, pixels_to_tensor, unpack_pixels

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
@bentoml.service(name="mmserve-engine", workers=1, threads=1, resources=ENGINE_RESOURCES, traffic={"timeout": 120},
                 logging={"access": {"enabled": False}},
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

    def _tensor(self, item: ClassifyItem | FuseItem) -> torch.Tensor | np.ndarray:
        return pixels_to_tensor(unpack_pixels(item.image, self.engine.image_size, item.pixels), self.finish)

    def _batch(self, endpoint: str, items: list[Item], request: Callable[[Item, torch.Tensor | np.ndarray], Req],
               answer: Callable[[Sequence[Req]], list[Outcome]]) -> list[dict[str, Any]]:
        """Record the batch, turn its items into engine requests, and answer each with its outcome's JSON form."""
        self.metrics.observe(endpoint, [it.task for it in items])
        return [o.to_dict() for o in answer([request(it, self._tensor(it)) for it in items])]

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
