"""Building the benchmark (backbone, registry, engines per runtime) and running every section into a report."""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmserve.backbone import Backbone
from mmserve.bench.config import BenchConfig
from mmserve.bench.http import http_section
from mmserve.bench.inputs import agreement_inputs, make_random_registry, mixed_tasks, synthetic_images
from mmserve.bench.report import compute_ratios, cpu_budget, judge_targets
from mmserve.bench.timing import Case, measure, token_cost
from mmserve.config import ServeConfig
from mmserve.images import decode_image


@dataclass
class BenchSetup:
    """Everything built before timing: backbone, registry, engines per runtime, images."""

    backbone: Backbone
    backbone_note: str
    registry: Path
    registry_note: str
    task_names: list[str]
    engines: dict[str, Any]
    onnx_dir: Path | None
    onnx_runtimes: dict[str, Any]
    images: torch.Tensor
    torch_threads: int
    onnx_threads: int
    calibration: dict[str, Any]
    prompt_shapes: list[tuple[int, int]]


def _setup(config: BenchConfig, backbone: Backbone, backbone_note: str, log: Callable[[str], None],
           cleanup: list[Path]) -> BenchSetup:
    """Registry, engines, ONNX runtimes and thread counts of a run; temp directories it makes go into `cleanup`."""
    from mmserve.builders import load_registry
    from mmserve.engine import InferenceEngine
    from mmserve.onnx.catalogue import read_sidecars
    from mmserve.onnx.export import ExportOptions, export_all
    from mmserve.onnx.runtime import OnnxImageRuntime, OnnxOptions, physical_cores

    candidates = [config.threads] if config.threads else sorted({1, physical_cores()})
    if config.registry is not None:
        registry_dir, note = config.registry, f"{config.registry}"
    else:
        registry_dir = Path(tempfile.mkdtemp(prefix="mmserve-bench-registry-"))
        cleanup.append(registry_dir)
        make_random_registry(registry_dir, backbone, config.tasks, config.classes, seed=config.seed)
        note = f"generated: {config.tasks} tasks with random MmAP prompts (group + task), speed only"
    log(f"registry: {note}")
    engine = InferenceEngine(backbone, registry_dir, "torch")
    snap = engine.snapshot
    task_names = snap.names("classify")
    shapes = sorted({t.prompt_shape for t in snap.classify.values()})
    engines: dict[str, Any] = {"torch": engine}
    onnx_runtimes: dict[str, Any] = {}
    onnx_dir = config.onnx_dir
    n_images = max(max(config.batch_sizes), config.target_batch, 1)
    pil = synthetic_images(n_images, backbone.image_size * 2, config.seed)
    images = torch.stack([backbone.preprocess(img) for img in pil])
    x = images[:config.target_batch]
    calibration: dict[str, Any] = {"batch": config.target_batch, "candidates": candidates}
    torch_threads = _calibrate(calibration, "torch", {t: Case(f"torch@{t}", lambda: backbone.model.encode_image(x),
                                                              len(x), before=lambda t=t: torch.set_num_threads(t))
                                                      for t in candidates}, config)
    torch.set_num_threads(torch_threads)
    log(f"torch threads: {torch_threads} ({calibration['torch']})")
    onnx_threads = candidates[-1]
    if config.variants:
        if onnx_dir is None:
            onnx_dir = Path(tempfile.mkdtemp(prefix="mmserve-bench-onnx-"))
            cleanup.append(onnx_dir)
        have = {(g.kind, g.depth, g.prompt_tokens, g.variant) for g in read_sidecars(onnx_dir)
                if g.fingerprint == backbone.fingerprint}
        if not all(("image", k, p, v) in have for k, p in shapes + [(0, 0)] for v in config.variants):
            log(f"exporting ONNX graphs ({', '.join(config.variants)}) to {onnx_dir} ...")
            started = time.perf_counter()
            export_all(backbone, onnx_dir, load_registry(registry_dir, backbone),
                       options=ExportOptions(optimize="opt" in config.variants or "int8" in config.variants,
                                             int8="int8" in config.variants, exporter=config.exporter))
            log(f"exported in {time.perf_counter() - started:.0f} s")
        def onnx_runtime(variant: str, threads: int) -> OnnxImageRuntime:
            return OnnxImageRuntime(backbone, OnnxOptions(onnx_dir=onnx_dir, variant=variant, intra_op_threads=threads,
                                                          spinning=config.onnx_spinning, export_missing=False))

        probe = config.variants[-1]
        runtimes = {t: onnx_runtime(probe, t) for t in candidates}
        onnx_threads = _calibrate(calibration, f"onnx-{probe}", {
            t: Case(f"onnx@{t}", lambda rt=rt: rt.encode(x, None), len(x)) for t, rt in runtimes.items()}, config)
        log(f"onnxruntime threads: {onnx_threads} ({calibration[f'onnx-{probe}']})")
        for variant in config.variants:
            rt = onnx_runtime(variant, onnx_threads)
            onnx_runtimes[variant] = rt
            e = copy.copy(engine)  # shares the immutable snapshot; only the image-tower runtime differs
            e.runtime = rt
            engines[f"onnx-{variant}"] = e
    return BenchSetup(backbone, backbone_note, registry_dir, note, task_names, engines, onnx_dir, onnx_runtimes,
                      images, torch_threads, onnx_threads, calibration, shapes)


def _calibrate(record: dict[str, Any], what: str, cases: dict[int, Case], config: BenchConfig) -> int:
    """The faster thread count of `cases` (interleaved, median); records images/s per thread count."""
    if len(cases) == 1:
        record[what] = {"fixed": next(iter(cases))}
        return next(iter(cases))
    with torch.inference_mode():
        timed = measure(list(cases.values()), rounds=max(3, config.rounds // 2), iters=1, warmup=1)
    speed = {t: timed[c.name].images_per_s for t, c in cases.items()}
    record[what] = {f"{t} threads": round(v, 1) for t, v in speed.items()}
    return max(speed, key=speed.get)


def _cases(setup: BenchSetup, batch: int) -> list[Case]:
    model = setup.backbone.model
    x = setup.images[:batch].contiguous()
    single, mixed = [setup.task_names[0]] * batch, mixed_tasks(setup.task_names, batch)
    cases = [Case("floor/torch", lambda: model.encode_image(x), batch)]
    floor_variant = next((v for v in ("opt", "fp32", "int8") if v in setup.onnx_runtimes), None)
    if floor_variant:
        rt = setup.onnx_runtimes[floor_variant]
        cases.append(Case(f"floor/onnx-{floor_variant}", lambda: rt.encode(x, None), batch))
    for name, engine in setup.engines.items():
        cases.append(Case(f"single/{name}", lambda e=engine: e.classify(x, single), batch))
        cases.append(Case(f"mixed/{name}", lambda e=engine: e.classify(x, mixed), batch))
    return cases


def _agreement(setup: BenchSetup, config: BenchConfig) -> dict[str, Any]:
    """Top-1 agreement between runtimes on real images (--agreement-root) or synthetic ones, each with a task."""
    if not setup.onnx_runtimes:
        return {"skipped": "no ONNX variants"}
    if config.agreement_root is not None:
        files, tasks = agreement_inputs(config.agreement_root, config.agreement_images, setup.task_names, config.seed)
        pil = [decode_image(f.read_bytes(), ServeConfig.max_image_pixels) for f in files]  # the service's guard
        source = str(config.agreement_root)
    else:
        pil = synthetic_images(config.agreement_images, setup.backbone.image_size * 2, config.seed + 1)
        tasks = mixed_tasks(setup.task_names, len(pil))
        source = "synthetic"
    images = torch.stack([setup.backbone.preprocess(img) for img in pil])
    labels: dict[str, list[str]] = {}
    for name, engine in setup.engines.items():
        out: list[str] = []
        for start in range(0, len(images), 32):
            out += [r.label for r in engine.classify(images[start:start + 32], tasks[start:start + 32])]
        labels[name] = out

    def agree(a: str, b: str) -> float:
        return float(np.mean([x == y for x, y in zip(labels[a], labels[b], strict=True)]))

    pairs = {f"{a} vs {b}": agree(a, b) for a in labels for b in labels if a < b}
    ref = "onnx-fp32" if "onnx-fp32" in labels else "torch"
    result: dict[str, Any] = {"images": len(images), "source": source, "pairs": pairs}
    if "onnx-int8" in labels:
        result["int8_vs_fp32"] = agree("onnx-int8", ref)
        result["int8_reference"] = ref
    snap = setup.engines["torch"].snapshot
    vision = [snap.classify[t].vision_prompts for t in tasks[:32]]
    prompts = None if any(v is None for v in vision) else torch.stack(vision)
    with torch.inference_mode():
        reference = setup.engines["torch"].runtime.encode(images[:32], prompts)
        result["max_abs_feature_diff_vs_torch"] = {v: float((rt.encode(images[:32], prompts) - reference).abs().max())
                                                   for v, rt in setup.onnx_runtimes.items()}
    return result


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _machine(setup: BenchSetup) -> dict[str, Any]:
    from mmserve.onnx.runtime import physical_cores

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "torch_threads": setup.torch_threads, "onnx_threads": setup.onnx_threads,
            "thread_calibration": setup.calibration,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def run_bench(config: BenchConfig, backbone: Backbone, backbone_note: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section and return the JSON-able report (also written to config.out)."""
    load_before = _load()
    cleanup: list[Path] = []  # the temp directories _setup makes, removed however the run ends (setup included)
    try:
        setup = _setup(config, backbone, backbone_note, log, cleanup)
        timings: dict[str, dict[str, Any]] = {}
        throughput: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for batch in config.batch_sizes:
                log(f"timing batch {batch} ...")
                result = measure(_cases(setup, batch), config.rounds, config.iters, config.warmup)
                timings[str(batch)] = {k: t.to_dict() for k, t in result.items()}
                throughput[str(batch)] = {k: t.images_per_s for k, t in result.items()}
        log("int8 / fp32 / torch top-1 agreement ...")
        agreement = _agreement(setup, config)
        if config.http:
            log(f"HTTP: starting the BentoML server ({config.http_runtime}) ...")
            http = http_section(config, backbone, setup.registry, setup.onnx_dir, setup.task_names,
                                setup.torch_threads, setup.onnx_threads)
        else:
            http = {"skipped": "disabled (--no-http)"}
        ratios = compute_ratios(throughput, http, config)
        shape = setup.prompt_shapes[0] if setup.prompt_shapes else (0, 0)
        tokens = token_cost(backbone, shape[1])
        measured = ratios["engine_over_floor"].get(str(config.target_batch), {}).get("torch")
        if measured is not None:
            tokens["measured_engine_over_floor"] = measured
            gap = 1 - measured
            tokens["gap_explained_by_tokens"] = (1 - tokens["predicted_engine_over_floor"]) / gap if gap > 0 else None
        report = {
            "meta": {"backbone": {"model": backbone.spec.model, "fingerprint": backbone.fingerprint,
                                  "note": backbone_note},
                     "registry": {"path": None if config.registry is None else str(config.registry),
                                  "note": setup.registry_note, "tasks": len(setup.task_names),
                                  "prompt_shapes": [list(s) for s in setup.prompt_shapes]},
                     "machine": _machine(setup), "load_avg_before": load_before, "load_avg_after": _load(),
                     "onnx": {v: rt.describe() for v, rt in setup.onnx_runtimes.items()},
                     "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                     "method": "interleaved rounds; each figure = median over rounds of the per-call time"},
            "floor": {b: {k: v for k, v in row.items() if k.startswith("floor/")} for b, row in timings.items()},
            "engine": {b: {k: v for k, v in row.items() if k.startswith("single/")} for b, row in timings.items()},
            "mixed": {b: {k: v for k, v in row.items() if k.startswith("mixed/")} for b, row in timings.items()},
            "agreement": agreement,
            "http": http,
            "ratios": ratios,
            "cpu_budget": cpu_budget(timings, http, config),
            "tokens": tokens,
        }
        report["targets"] = judge_targets(ratios, agreement, config)
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
