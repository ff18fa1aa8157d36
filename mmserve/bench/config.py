"""What `mmserve bench` measures (BenchConfig) and the issue's targets it judges against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TARGETS = {"mixed_over_single": 0.95, "engine_over_floor": 0.85, "onnx_fp32_over_torch": 1.2,
           "onnx_int8_over_torch": 1.8, "int8_agreement": 0.99, "http_over_engine": 0.8, "http_p99_over_p50": 3.0}


@dataclass
class BenchConfig:
    """What to measure and how often."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    rounds: int = 15  # each figure is the median over rounds
    iters: int = 1  # calls per case per round (1: the finest interleaving, so bursts of load hit every case)
    warmup: int = 2
    tasks: int = 32  # tasks of the generated registry (when no registry is given)
    classes: int = 10  # classes per generated task
    registry: Path | None = None
    onnx_dir: Path | None = None  # reuse graphs exported for this backbone; default: export to a temp dir
    variants: tuple[str, ...] = ("fp32", "opt", "int8")
    exporter: str = "dynamo"
    threads: int | None = None  # intra-op threads for torch and onnxruntime; None = calibrate (1 vs physical cores)
    agreement_images: int = 256
    onnx_spinning: bool = False  # onnxruntime intra-op threads spin between ops (the server's default: off)
    agreement_root: Path | None = None  # real images <root>/<task>/.../*.png; default: synthetic pictures
    target_batch: int = 8  # the batch size the onnx/torch and engine/floor targets are judged at
    http: bool = True
    http_runtime: str = "torch"  # torch | onnx-fp32 | onnx-opt | onnx-int8
    http_concurrency: tuple[int, ...] = (1, 8, 32)
    http_requests: int = 192
    http_runs: int = 3
    http_max_batch: int = 32
    http_ready_timeout: float = 300.0
    out: Path = Path("bench.json")
    seed: int = 0
