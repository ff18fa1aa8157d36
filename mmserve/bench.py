"""`mmserve bench`: the serving stack held against the backbone's own speed, every figure measured in one process.

Sections: the floor (open_clip's plain `encode_image`), the prompted engine (InferenceEngine.classify: prompt
gather, image tower, class logits, top-k) with one task per batch and with every sample from a different task,
torch and onnxruntime (fp32, fused, int8), int8 top-1 agreement, and end-to-end HTTP against the real BentoML
server on loopback with a bounded load generator.

Timing method: the cases compared with each other are INTERLEAVED: every round runs each case `iters` times, in
a rotated order, and a figure is the median over rounds of the per-call time. Noise from other processes then
hits every case of a comparison alike, so ratios hold on a shared machine even when absolute figures drift.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmserve.backbone import Backbone
from mmserve.builders import classify_prompt_module
from mmserve.config import ServeConfig
from mmserve.images import decode_image
from mmserve.prompts import MmAPConfig, count_params
from mmserve.registry import BackboneRef, GroupEntry, Manifest, TaskEntry, save_registry

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


# ---- inputs: synthetic images and a random registry -------------------------------------------------------


def synthetic_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic procedural pictures (coloured shapes on a tinted background)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(size // 8, size // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        images.append(img)
    return images


def make_random_registry(root: Path, backbone: Backbone, n_tasks: int, n_classes: int = 10,
                         tasks_per_group: int = 4, seed: int = 0) -> Path:
    """A registry of `n_tasks` MmAP tasks with random (untrained) prompts: for speed measurements only."""
    torch.manual_seed(seed)
    config = MmAPConfig().to_dict()
    groups, tasks, group_w, task_w = [], [], {}, {}
    for g in range((n_tasks + tasks_per_group - 1) // tasks_per_group):
        names = [f"task{t:02d}" for t in range(g * tasks_per_group, min(n_tasks, (g + 1) * tasks_per_group))]
        group = classify_prompt_module(config, backbone)
        groups.append(GroupEntry(f"group{g}", names, config, count_params(group)))
        group_w[f"group{g}"] = group.state_dict()
        for name in names:
            module = classify_prompt_module(config, backbone)
            tasks.append(TaskEntry(name, "classify", [f"thing {c} of {name}" for c in range(n_classes)], config,
                                   count_params(module), group=f"group{g}"))
            task_w[name] = module.state_dict()
    manifest = Manifest(BackboneRef(backbone.spec.model, backbone.fingerprint, backbone.spec.pretrained), groups,
                        tasks)
    save_registry(root, manifest, group_w, task_w)
    return root


# ---- timing -------------------------------------------------------------------------------------------------


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

    @property
    def images_per_s(self) -> float:
        """Throughput at the median."""
        return self.batch / self.median_s

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"batch": self.batch, "images_per_s": self.images_per_s, "median_ms": self.median_s * 1e3,
                "min_ms": self.min_s * 1e3, "max_ms": self.max_s * 1e3, "rounds": self.rounds}


def measure(cases: list[Case], rounds: int, iters: int, warmup: int) -> dict[str, Timing]:
    """Interleaved rounds: each round times every case `iters` times (rotating the order); median over rounds."""
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
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
            started = time.perf_counter()
            for _ in range(iters):
                case.fn()
            samples[case.name].append((time.perf_counter() - started) / iters)
            if case.after:
                case.after()
    return {c.name: Timing(c.name, c.batch, statistics.median(samples[c.name]), min(samples[c.name]),
                           max(samples[c.name]), rounds) for c in cases}


# ---- the prompt-token explanation ---------------------------------------------------------------------------


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


# ---- HTTP ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def bentoml_server(env: dict[str, str], log_path: Path, ready_timeout: float) -> Iterator[str]:
    """`bentoml serve mmserve.service:MmServe` on 127.0.0.1 and a free port; yields its URL; stops it after."""
    import httpx

    bentoml_bin = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml_bin is None:
        raise RuntimeError("the bentoml executable is not installed")
    port = _free_port()
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([bentoml_bin, "serve", "mmserve.service:MmServe", "--host", "127.0.0.1", "--port",
                                 str(port), "--working-dir", str(root)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout:.0f} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _engine_batches(url: str) -> dict[str, float]:
    """Sums and counts of the server's per-batch histograms (requests and distinct tasks per engine batch)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        for metric in ("mmserve_engine_batch_size", "mmserve_engine_batch_tasks"):
            for part in ("_sum", "_count"):
                if line.startswith(metric + part + "{") and 'endpoint="classify"' in line:
                    out[metric + part] = out.get(metric + part, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _served_runtime(url: str) -> str | None:
    """The image-tower runtime the server reports on GET /tasks."""
    import httpx

    try:
        return httpx.get(f"{url}/tasks", timeout=10).json().get("runtime")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def http_section(config: BenchConfig, backbone: Backbone, registry: Path, onnx_dir: Path | None,
                 task_names: list[str], torch_threads: int, onnx_threads: int) -> dict[str, Any]:
    """Throughput and p50/p99 over HTTP, single-task and mixed-task traffic, at each concurrency."""
    from mmserve.loadgen import RequestSpec, run_load

    if config.http_runtime != "torch" and onnx_dir is None:
        return {"skipped": f"HTTP runtime {config.http_runtime} needs exported ONNX graphs"}
    pngs = [_png(img) for img in synthetic_images(16, backbone.image_size * 2, config.seed + 7)]
    runtime, _, variant = config.http_runtime.partition("-")
    work = Path(tempfile.mkdtemp(prefix="mmserve-bench-http-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    env.update({
        "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
        "MMSERVE_REGISTRY": str(registry), "MMSERVE_BACKBONE_MODEL": backbone.spec.model,
        "MMSERVE_BACKBONE_PRETRAINED": backbone.spec.pretrained or "none",
        "MMSERVE_BACKBONE_SEED": str(backbone.spec.seed), "MMSERVE_RUNTIME": runtime,
        "MMSERVE_MAX_BATCH_SIZE": str(config.http_max_batch), "MMSERVE_MAX_LATENCY_MS": "120000",
        "OMP_NUM_THREADS": str(torch_threads), "MMSERVE_ONNX_THREADS": str(onnx_threads),
    })
    if runtime == "onnx":
        env.update({"MMSERVE_ONNX_DIR": str(onnx_dir), "MMSERVE_ONNX_VARIANT": variant or "auto"})

    def maker(mixed: bool) -> Callable[[int], RequestSpec]:
        def make(i: int) -> RequestSpec:
            task = task_names[i % len(task_names)] if mixed else task_names[0]
            return RequestSpec(f"/classify?task={task}", files={"image": ("x.png", pngs[i % len(pngs)], "image/png")})
        return make

    results: dict[str, Any] = {"runtime": config.http_runtime, "requests": config.http_requests,
                               "runs": config.http_runs, "max_batch_size": config.http_max_batch,
                               "traffic": {"single": {}, "mixed": {}}}
    try:
        with bentoml_server(env, work / "server.log", config.http_ready_timeout) as url:
            warm = run_load(url, maker(True), max(8, config.http_max_batch), min(8, config.http_max_batch))
            if warm.ok == 0:
                return {"skipped": f"server answered no request during warm-up: {warm.errors}"}
            results["served_runtime"] = _served_runtime(url)
            runs: dict[tuple[str, int], list] = {}
            batches: dict[tuple[str, int], dict[str, float]] = {}
            # interleaved: every (traffic, concurrency) once per run, concurrency ascending with both traffics at
            # each level, so neither traffic inherits the other's congestion (see `after_load` below)
            for _ in range(config.http_runs):
                for conc in config.http_concurrency:
                    for traffic in ("single", "mixed"):
                        before = _engine_batches(url)
                        cpu = time.process_time()
                        res = run_load(url, maker(traffic == "mixed"), config.http_requests, conc)
                        cpu = time.process_time() - cpu
                        after = _engine_batches(url)
                        runs.setdefault((traffic, conc), []).append(res)
                        acc = batches.setdefault((traffic, conc), {})
                        acc["client_cpu_s"] = acc.get("client_cpu_s", 0.0) + cpu
                        for k in after:
                            acc[k] = acc.get(k, 0.0) + after[k] - before.get(k, 0.0)
            # BentoML's adaptive dispatcher holds a lone request while `n * (wait_n + tick + o_a)` is below 0.95x
            # the mean first-request wait of its last 50 batches; after high concurrency that mean is large, so
            # concurrency-1 latency rises until ~50 new batches flush it: measure it once right after the load
            low = min(config.http_concurrency)
            res = run_load(url, maker(False), config.http_requests, low)
            results["after_load"] = {"traffic": "single", "concurrency": low, "throughput": res.throughput,
                                     "p50_ms": res.p50_ms, "p99_ms": res.p99_ms, "ok": res.ok, "sent": res.requests}
    except RuntimeError as exc:
        return {"skipped": str(exc)}
    finally:
        server_log = None
        failed = any(r.ok < r.requests for rs in runs.values() for r in rs) if "runs" in locals() else True
        if failed and (work / "server.log").is_file():  # keep the evidence next to the report
            server_log = config.out.with_suffix(".server.log")
            server_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "server.log", server_log)
        shutil.rmtree(work, ignore_errors=True)
    for (traffic, conc), rs in runs.items():
        results["traffic"][traffic][str(conc)] = {
            "throughput": statistics.median(r.throughput for r in rs),
            "p50_ms": statistics.median(r.p50_ms for r in rs), "p99_ms": statistics.median(r.p99_ms for r in rs),
            "ok": sum(r.ok for r in rs), "sent": sum(r.requests for r in rs),
            "errors": {str(k): sum(r.errors.get(k, 0) for r in rs) for k in {k for r in rs for k in r.errors}},
            "failures": {k: sum(r.failures.get(k, 0) for r in rs) for k in {k for r in rs for k in r.failures}}}
        acc = batches.get((traffic, conc), {})
        n = acc.get("mmserve_engine_batch_size_count")
        results["traffic"][traffic][str(conc)].update({  # from the server's /metrics: did requests coalesce?
            "engine_batch_mean": acc["mmserve_engine_batch_size_sum"] / n if n else None,
            "engine_tasks_per_batch_mean": acc.get("mmserve_engine_batch_tasks_sum", 0.0) / n if n else None,
            # the load generator shares the cores with the server: its CPU per request is overhead the engine
            # figure never pays
            "client_cpu_ms_per_request": 1e3 * acc.get("client_cpu_s", 0.0) / max(1, sum(r.requests for r in rs))})
    if server_log is not None:
        results["server_log"] = str(server_log)
    return results


# ---- the benchmark ------------------------------------------------------------------------------------------


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
    cleanup: list[Path] = field(default_factory=list)


def _setup(config: BenchConfig, backbone: Backbone, backbone_note: str, log: Callable[[str], None]) -> BenchSetup:
    from mmserve.engine import InferenceEngine
    from mmserve.onnx_export import ExportOptions, export_all, read_sidecars
    from mmserve.onnx_runtime import OnnxImageRuntime, OnnxOptions, physical_cores
    from mmserve.registry import load_registry

    candidates = [config.threads] if config.threads else sorted({1, physical_cores()})
    cleanup: list[Path] = []
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
        probe = config.variants[-1]
        runtimes = {t: OnnxImageRuntime(backbone, OnnxOptions(onnx_dir=onnx_dir, variant=probe, intra_op_threads=t,
                                                              export_missing=False)) for t in candidates}
        onnx_threads = _calibrate(calibration, f"onnx-{probe}", {
            t: Case(f"onnx@{t}", lambda rt=rt: rt.encode(x, None), len(x)) for t, rt in runtimes.items()}, config)
        log(f"onnxruntime threads: {onnx_threads} ({calibration[f'onnx-{probe}']})")
        for variant in config.variants:
            rt = OnnxImageRuntime(backbone, OnnxOptions(onnx_dir=onnx_dir, variant=variant,
                                                        intra_op_threads=onnx_threads, export_missing=False))
            onnx_runtimes[variant] = rt
            e = copy.copy(engine)  # shares the immutable snapshot; only the image-tower runtime differs
            e.runtime = rt
            engines[f"onnx-{variant}"] = e
    return BenchSetup(backbone, backbone_note, registry_dir, note, task_names, engines, onnx_dir, onnx_runtimes,
                      images, torch_threads, onnx_threads, calibration, shapes, cleanup)


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


def _mixed(task_names: list[str], batch: int) -> list[str]:
    return [task_names[i % len(task_names)] for i in range(batch)]


def _cases(setup: BenchSetup, batch: int) -> list[Case]:
    model = setup.backbone.model
    x = setup.images[:batch].contiguous()
    single, mixed = [setup.task_names[0]] * batch, _mixed(setup.task_names, batch)
    cases = [Case("floor/torch", lambda: model.encode_image(x), batch)]
    floor_variant = next((v for v in ("opt", "fp32", "int8") if v in setup.onnx_runtimes), None)
    if floor_variant:
        rt = setup.onnx_runtimes[floor_variant]
        cases.append(Case(f"floor/onnx-{floor_variant}", lambda: rt.encode(x, None), batch))
    for name, engine in setup.engines.items():
        cases.append(Case(f"single/{name}", lambda e=engine: e.classify(x, single), batch))
        cases.append(Case(f"mixed/{name}", lambda e=engine: e.classify(x, mixed), batch))
    return cases


def agreement_inputs(root: Path, n: int, task_names: list[str], seed: int) -> tuple[list[Path], list[str]]:
    """Up to `n` image files under `root` (seeded sample), each with its task: the first folder under `root`
    when that is a task name (e.g. <root>/<style>/<class>/x.png), else the tasks cycled."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise ValueError(f"--agreement-root {root}: no .png/.jpg image under it")
    files = sorted(random.Random(seed).sample(files, min(n, len(files))))
    cycled = _mixed(task_names, len(files))
    tasks = [p.relative_to(root).parts[0] if p.relative_to(root).parts[0] in task_names else t
             for p, t in zip(files, cycled, strict=True)]
    return files, tasks


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
        tasks = _mixed(setup.task_names, len(pil))
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
    banks = setup.engines["torch"].snapshot.banks
    prompts = banks[setup.prompt_shapes[0]].gather(tasks[:32]) if setup.prompt_shapes[0] in banks else None
    with torch.inference_mode():
        reference = setup.engines["torch"].runtime.encode(images[:32], prompts)
        result["max_abs_feature_diff_vs_torch"] = {v: float((rt.encode(images[:32], prompts) - reference).abs().max())
                                                   for v, rt in setup.onnx_runtimes.items()}
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ratios(throughput: dict[str, dict[str, float]], http: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    ratios: dict[str, Any] = {"mixed_over_single": {}, "engine_over_floor": {}, "onnx_over_torch": {},
                              "http_over_engine": {}, "http_p99_over_p50": {}}
    for b, row in throughput.items():
        runtimes = [k.split("/", 1)[1] for k in row if k.startswith("single/")]
        ratios["mixed_over_single"][b] = {rt: _ratio(row.get(f"mixed/{rt}"), row[f"single/{rt}"]) for rt in runtimes}
        ratios["engine_over_floor"][b] = {"torch": _ratio(row.get("single/torch"), row.get("floor/torch"))}
        for k in row:
            if k.startswith("floor/onnx-"):
                v = k.split("/", 1)[1]
                ratios["engine_over_floor"][b][v] = _ratio(row.get(f"single/{v}"), row[k])
        ratios["onnx_over_torch"][b] = {rt: _ratio(row[f"single/{rt}"], row.get("single/torch"))
                                        for rt in runtimes if rt.startswith("onnx")}
    if "traffic" in http:
        b = str(config.http_max_batch)
        top = str(max(config.http_concurrency))
        for traffic, cases in http["traffic"].items():
            engine_tp = throughput.get(b, {}).get(f"{traffic}/{config.http_runtime}")
            if top in cases:
                ratios["http_over_engine"][traffic] = _ratio(cases[top]["throughput"], engine_tp)
                ratios["http_p99_over_p50"][traffic] = _ratio(cases[top]["p99_ms"], cases[top]["p50_ms"])
        ratios["http_over_engine"]["engine_batch"] = int(b)
        ratios["http_over_engine"]["concurrency"] = int(top)
    return ratios


def _targets(ratios: dict[str, Any], agreement: dict[str, Any], config: BenchConfig) -> list[dict[str, Any]]:
    b = str(config.target_batch)
    out = []

    def add(name: str, value: float | None, target: float, met: bool | None, where: str) -> None:
        out.append({"target": name, "value": value, "threshold": target, "met": met, "where": where})

    ms = [v for bb, row in ratios["mixed_over_single"].items() if int(bb) > 1 for v in row.values() if v is not None]
    add("mixed/single >= 0.95", min(ms) if ms else None, TARGETS["mixed_over_single"],
        bool(ms) and min(ms) >= TARGETS["mixed_over_single"], "worst runtime and batch size > 1")
    ef = ratios["engine_over_floor"].get(b, {}).get("torch")
    add("engine/floor >= 0.85", ef, TARGETS["engine_over_floor"], None if ef is None else ef >= 0.85,
        f"torch, batch {b}")
    best = ratios["onnx_over_torch"].get(b, {})
    fp32 = [v for k, v in best.items() if k in ("onnx-fp32", "onnx-opt") and v is not None]
    add("onnx fp32 >= 1.2x torch", max(fp32) if fp32 else None, TARGETS["onnx_fp32_over_torch"],
        None if not fp32 else max(fp32) >= TARGETS["onnx_fp32_over_torch"],
        f"faster fp32 graph (plain or fused) vs torch, batch {b}")
    i8 = best.get("onnx-int8")
    agree = agreement.get("int8_vs_fp32")
    add("onnx int8 >= 1.8x torch", i8, TARGETS["onnx_int8_over_torch"],
        None if i8 is None else i8 >= TARGETS["onnx_int8_over_torch"], f"batch {b}")
    add("int8 top-1 agreement >= 99%", agree, TARGETS["int8_agreement"],
        None if agree is None else agree >= TARGETS["int8_agreement"], f"vs {agreement.get('int8_reference')}")
    conc, batch = max(config.http_concurrency), config.http_max_batch
    for traffic in ("single", "mixed"):
        h = ratios["http_over_engine"].get(traffic)
        add(f"HTTP/engine >= 0.8 ({traffic})", h, TARGETS["http_over_engine"], None if h is None else h >= 0.8,
            f"concurrency {conc} vs in-process engine at batch {batch}, {config.http_runtime}")
        p = ratios["http_p99_over_p50"].get(traffic)
        add(f"HTTP p99 < 3x p50 ({traffic})", p, TARGETS["http_p99_over_p50"], None if p is None else p < 3.0,
            f"concurrency {conc}")
    return out


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _machine(setup: BenchSetup) -> dict[str, Any]:
    from mmserve.onnx_runtime import physical_cores

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
    setup = _setup(config, backbone, backbone_note, log)
    try:
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
        ratios = _ratios(throughput, http, config)
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
            "tokens": tokens,
        }
        report["targets"] = _targets(ratios, agreement, config)
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        for path in setup.cleanup:
            shutil.rmtree(path, ignore_errors=True)


# ---- the printed table ---------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a report."""
    meta = report["meta"]
    batches = list(report["engine"])
    lines = [f"mmserve bench: {meta['backbone']['model']} ({meta['backbone']['note']})",
             f"registry: {meta['registry']['note']}; prompt shapes (K, P): {meta['registry']['prompt_shapes']}",
             f"machine: {meta['machine']['cpu']}, {meta['machine']['logical_cpus']} CPUs, "
             f"{meta['machine']['physical_cores']} physical cores; threads: torch {meta['machine']['torch_threads']}, "
             f"onnxruntime {meta['machine']['onnx_threads']}; "
             f"load avg {meta['load_avg_before']} -> {meta['load_avg_after']}",
             f"thread calibration (images/s at batch {meta['machine']['thread_calibration']['batch']}): " + "; ".join(
                 f"{k}: {v}" for k, v in meta["machine"]["thread_calibration"].items()
                 if k not in ("batch", "candidates")),
             f"method: {meta['method']} ({meta['config']['rounds']} rounds x {meta['config']['iters']} calls)", "",
             "images/s".ljust(44) + "".join(f"batch {b}".rjust(11) for b in batches)]
    labels = {"floor/torch": "floor: open_clip encode_image (torch)"}
    rows: list[str] = []
    for section in ("floor", "engine", "mixed"):
        for name in report[section][batches[0]]:
            rows.append(name)
    for name in rows:
        section = {"floor": "floor", "single": "engine", "mixed": "mixed"}[name.split("/")[0]]
        label = labels.get(name) or (f"floor: unprompted graph ({name.split('/')[1]})" if section == "floor" else
                                     f"engine {name.split('/')[1]}, " +
                                     ("one task per batch" if section == "engine" else "every sample another task"))
        lines.append(label.ljust(44) + "".join(
            _fmt(report[section][b].get(name, {}).get("images_per_s"), ".1f").rjust(11) for b in batches))
    r = report["ratios"]
    lines += ["", "ratios".ljust(44) + "".join(f"batch {b}".rjust(11) for b in batches)]
    for rt in r["mixed_over_single"][batches[0]]:
        lines.append(f"mixed/single {rt}".ljust(44) + "".join(
            _fmt(r["mixed_over_single"][b].get(rt)).rjust(11) for b in batches))
    for rt in r["engine_over_floor"][batches[0]]:
        lines.append(f"engine/floor {rt}".ljust(44) + "".join(
            _fmt(r["engine_over_floor"][b].get(rt)).rjust(11) for b in batches))
    for rt in r["onnx_over_torch"][batches[0]]:
        lines.append(f"{rt}/torch".ljust(44) + "".join(
            _fmt(r["onnx_over_torch"][b].get(rt)).rjust(11) for b in batches))
    agreement = report["agreement"]
    if "pairs" in agreement:
        lines += ["", f"top-1 agreement on {agreement['images']} images ({agreement.get('source', 'synthetic')}; "
                  "each with a task):"]
        lines += [f"  {k}: {v:.3f}" for k, v in agreement["pairs"].items()]
        lines.append("  max |feature diff| vs torch: " + ", ".join(
            f"{k} {v:.1e}" for k, v in agreement["max_abs_feature_diff_vs_torch"].items()))
    http = report["http"]
    lines.append("")
    if "traffic" in http:
        lines.append(f"HTTP on loopback (runtime {http['runtime']}, {http['requests']} requests per run, median of "
                     f"{http['runs']} runs, server max batch {http['max_batch_size']})")
        lines.append("traffic  concurrency    req/s   p50 ms   p99 ms  p99/p50  ok/sent  engine batch  tasks/batch"
                     "  client CPU ms/req")
        for traffic, cases in http["traffic"].items():
            for conc, c in cases.items():
                lines.append(f"{traffic:8s} {conc:>11s} {c['throughput']:8.1f} {c['p50_ms']:8.1f} {c['p99_ms']:8.1f} "
                             f"{c['p99_ms'] / c['p50_ms']:8.2f}  {c['ok']:>3d}/{c['sent']:<3d}"
                             f"{_fmt(c.get('engine_batch_mean'), '.1f'):>14s}"
                             f"{_fmt(c.get('engine_tasks_per_batch_mean'), '.1f'):>13s}"
                             f"{_fmt(c.get('client_cpu_ms_per_request'), '.1f'):>19s}")
        after = http.get("after_load")
        if after:
            lines.append(f"{after['traffic']} again at concurrency {after['concurrency']} right after the load: "
                         f"{after['throughput']:.1f} req/s, p50 {after['p50_ms']:.1f} ms, p99 {after['p99_ms']:.1f} ms "
                         f"(BentoML's dispatcher holds lone requests for its recent mean wait)")
        lines.append("http/engine: " + ", ".join(f"{k} {_fmt(r['http_over_engine'].get(k))}"
                                                 for k in ("single", "mixed")) +
                     f" (concurrency {r['http_over_engine'].get('concurrency')} vs engine batch "
                     f"{r['http_over_engine'].get('engine_batch')}, same runtime)")
    else:
        lines.append(f"HTTP: skipped ({http.get('skipped')})")
    t = report["tokens"]
    lines += ["", f"prompt tokens: {t['tokens_floor']} tokens (1 + {t['patches']} patches) become "
                  f"{t['tokens_prompted']} with P = {t['prompt_tokens']} prompts; with width {t['width']} the linear "
                  f"layers are {t['linear_share']:.0%} of the FLOPs (they grow linearly, attention quadratically), "
                  f"so tokens alone predict engine/floor = {t['predicted_engine_over_floor']:.3f}"]
    measured, share = t.get("measured_engine_over_floor"), t.get("gap_explained_by_tokens")
    if measured is not None and share is None:
        lines.append(f"  measured engine/floor {measured:.3f}: no gap to explain (noise exceeds the token cost)")
    elif measured is not None:
        lines.append(f"  measured engine/floor {measured:.3f}: the extra tokens explain {share:.0%} of the gap; the "
                     "rest is prompt gather, class logits and top-k (the floor stops at features)"
                     if share < 1 else f"  measured engine/floor {measured:.3f}: the extra tokens explain all of "
                     f"the gap (the predicted cost is {share:.1f}x the measured one)")
    lines += ["", "targets:"]
    for tg in report["targets"]:
        status = "n/a" if tg["met"] is None else ("MET" if tg["met"] else "missed")
        lines.append(f"  {tg['target']:34s} {_fmt(tg['value'], '.3f'):>7s}  {status:6s} ({tg['where']})")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `mmserve bench` (the backbone ones are added by the CLI)."""
    d = BenchConfig()
    p.add_argument("--registry", type=Path, default=None,
                   help="registry to serve (default: generate one with --tasks random tasks, speed only)")
    p.add_argument("--tasks", type=int, default=d.tasks, help="tasks of the generated registry (default %(default)s)")
    p.add_argument("--batch-sizes", type=_ints, default=d.batch_sizes, help="comma-separated (default 1,8,32)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds; figure = median (default %(default)s)")
    p.add_argument("--iters", type=int, default=d.iters, help="calls per case per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for torch and onnxruntime (default: the faster of 1 and the physical cores, "
                        "measured at --target-batch before the run)")
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="graphs for this backbone: reused when present, else exported there (default: a temp dir)")
    p.add_argument("--variants", default=",".join(d.variants),
                   help="ONNX variants to time, of fp32,opt,int8 (default all; '' = torch only)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default=d.exporter)
    p.add_argument("--agreement-images", type=int, default=d.agreement_images)
    p.add_argument("--agreement-root", type=Path, default=None,
                   help="real images <root>/<task>/.../*.png for the agreement check (default: synthetic)")
    p.add_argument("--target-batch", type=int, default=d.target_batch)
    p.add_argument("--no-http", action="store_true", help="skip the end-to-end HTTP section")
    p.add_argument("--http-runtime", default=d.http_runtime, choices=("torch", "onnx-fp32", "onnx-opt", "onnx-int8"))
    p.add_argument("--http-concurrency", type=_ints, default=d.http_concurrency)
    p.add_argument("--http-requests", type=int, default=d.http_requests, help="requests per load run")
    p.add_argument("--http-runs", type=int, default=d.http_runs, help="runs per HTTP figure (median)")
    p.add_argument("--http-max-batch", type=int, default=d.http_max_batch)
    p.add_argument("--out", type=Path, default=d.out, help="JSON report path (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed `mmserve bench` arguments."""
    return BenchConfig(batch_sizes=tuple(args.batch_sizes), rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                       tasks=args.tasks, registry=args.registry, onnx_dir=args.onnx_dir,
                       variants=tuple(v for v in args.variants.split(",") if v), exporter=args.exporter,
                       threads=args.threads, agreement_images=args.agreement_images,
                       agreement_root=args.agreement_root, target_batch=args.target_batch,
                       http=not args.no_http, http_runtime=args.http_runtime,
                       http_concurrency=tuple(args.http_concurrency), http_requests=args.http_requests,
                       http_runs=args.http_runs, http_max_batch=args.http_max_batch, out=args.out, seed=args.seed)


def run_from_args(args: argparse.Namespace) -> int:
    """`mmserve bench`: load the backbone, run, print the table, write the JSON."""
    from mmserve.cli import load_backbone_from_args

    config = config_from_args(args)
    bad = set(config.variants) - {"fp32", "opt", "int8"}
    if bad:
        print(f"mmserve bench: unknown ONNX variant(s) {sorted(bad)}", file=sys.stderr)
        return 2
    backbone, note = load_backbone_from_args(args)
    print(f"backbone {backbone.spec.model}: {note}", flush=True)
    report = run_bench(config, backbone, note, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"\nJSON report: {config.out}")
    return 0
