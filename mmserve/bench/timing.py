"""Interleaved timing (every case each round, median over rounds) and the prompt-token FLOPs model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmserve.backbone import Backbone


@dataclass
class Case:
    """One timed call; `before`/`after` run outside the timed window (e.g. to switch thread counts)."""

    name: str
    fn: Callable[[], Any]
    batch: int
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None


@dataclass
class Timing:
    """Per-call seconds of one case: median over rounds, and the spread."""

    name: str
    batch: int
    median_s: float
    min_s: float
    max_s: float
    rounds: int
    cpu_s: float | None = None  # process CPU seconds per call (all threads), median over rounds

    @property
    def images_per_s(self) -> float:
        """Throughput at the median."""
        return self.batch / self.median_s

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = {"batch": self.batch, "images_per_s": self.images_per_s, "median_ms": self.median_s * 1e3,
               "min_ms": self.min_s * 1e3, "max_ms": self.max_s * 1e3, "rounds": self.rounds}
        if self.cpu_s is not None:
            out["cpu_ms_per_image"] = self.cpu_s * 1e3 / self.batch
        return out


def measure(cases: list[Case], rounds: int, iters: int, warmup: int) -> dict[str, Timing]:
    """Interleaved rounds: each round times every case `iters` times (rotating the order); median over rounds."""
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu: dict[str, list[float]] = {c.name: [] for c in cases}
    for case in cases:
        if case.before:
            case.before()
        for _ in range(warmup):
            case.fn()
        if case.after:
            case.after()
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            if case.before:
                case.before()
            cpu_started, started = time.process_time(), time.perf_counter()
            for _ in range(iters):
                case.fn()
            samples[case.name].append((time.perf_counter() - started) / iters)
            cpu[case.name].append((time.process_time() - cpu_started) / iters)
            if case.after:
                case.after()
    return {c.name: Timing(c.name, c.batch, statistics.median(samples[c.name]), min(samples[c.name]),
                           max(samples[c.name]), rounds, statistics.median(cpu[c.name])) for c in cases}


def token_cost(backbone: Backbone, prompt_tokens: int) -> dict[str, float]:
    """Relative transformer FLOPs with and without P prompt tokens (linear 12*d^2 per token, attention 2*S^2*d)."""
    vision = backbone.config.get("vision_cfg", {})
    patch = int(vision.get("patch_size", 16))
    n = (backbone.image_size // patch) ** 2
    d = backbone.vision_width
    mlp = float(vision.get("mlp_ratio", 4.0))

    def flops(seq: int) -> float:
        return seq * (4 + 2 * mlp) * d * d + 2 * seq * seq * d

    base, prompted = flops(1 + n), flops(1 + prompt_tokens + n)
    return {"patches": n, "prompt_tokens": prompt_tokens, "width": d, "tokens_floor": 1 + n,
            "tokens_prompted": 1 + prompt_tokens + n, "linear_share": (4 + 2 * mlp) * d / ((4 + 2 * mlp) * d +
                                                                                           2 * (1 + n)),
            "predicted_engine_over_floor": base / prompted}
