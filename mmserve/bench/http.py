"""The end-to-end HTTP section: the real BentoML server on loopback under the bounded load generator."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from PIL import Image

from mmserve.backbone import Backbone
from mmserve.bench.config import BenchConfig
from mmserve.bench.inputs import synthetic_images


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
    with bentoml_server_process(env, log_path, ready_timeout) as (url, _):
        yield url


@contextmanager
def bentoml_server_process(env: dict[str, str], log_path: Path, ready_timeout: float,
                           target: str = "mmserve.service:MmServe") -> Iterator[tuple[str, subprocess.Popen]]:
    """As `bentoml_server`, yielding (URL, the `bentoml serve` process) so callers can watch its workers;
    `target` is the service to serve (the bench also serves its web floor, `mmserve.bench.web_floor:WebFloor`)."""
    import httpx

    bentoml_bin = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml_bin is None:
        raise RuntimeError("the bentoml executable is not installed")
    port = _free_port()
    root = Path(__file__).resolve().parents[2]  # the project root: mmserve/bench/http.py
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([bentoml_bin, "serve", target, "--host", "127.0.0.1", "--port",
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
        yield url, proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (start_new_session), SIGKILL after 30 s; a group already gone (the
    server exited during start-up) is no error, so the start-up failure stays the one reported."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def server_roles(pid: int) -> dict[int, str]:
    """The `bentoml serve` process tree by role: 'front' (the MmServe worker, or the web floor's), 'engine'
    (MmServeEngine) or 'supervisor' (BentoML's arbiter and anything else it started)."""
    import psutil

    from mmserve.bench.web_floor import WEB_FLOOR_NAME  # imports bentoml: only where a server runs

    roles: dict[int, str] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return roles
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        name = cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd[:-1] else None
        roles[p.pid] = {"mmserve-engine": "engine", "mmserve": "front", WEB_FLOOR_NAME: "front"}.get(name or "",
                                                                                                  "supervisor")
    return roles


def server_cpu_s(roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role of the server's process tree."""
    import psutil

    out = {role: 0.0 for role in roles.values()}
    for pid, role in roles.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[role] += t.user + t.system
    return out


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


def measured_load(url: str, make: Callable[[int], Any], n: int, concurrency: int, roles: dict[int, str]
                  ) -> tuple[Any, float, dict[str, float]]:
    """One load run and the CPU seconds it cost: (result, load generator, each server role)."""
    from mmserve.loadgen import run_load

    cpu, before = time.process_time(), server_cpu_s(roles)
    result = run_load(url, make, n, concurrency)
    cpu, after = time.process_time() - cpu, server_cpu_s(roles)
    return result, cpu, {role: used - before.get(role, 0.0) for role, used in after.items()}


def _decode_cpu_ms(backbone: Backbone, uploads: list[bytes], reps: int = 8) -> float:
    """CPU ms to decode and preprocess one upload in-process (ImageDecoder, as the server does), mean over reps."""
    from mmserve.images import ImageDecoder, preprocess_config, preprocess_from_config

    decoder = ImageDecoder(preprocess_from_config(preprocess_config(backbone)))
    decoder(uploads[0])  # warm-up
    started = time.process_time()
    for _ in range(reps):
        for data in uploads:
            decoder(data)
    return 1e3 * (time.process_time() - started) / (reps * len(uploads))


def web_floor_section(config: BenchConfig, env: dict[str, str], work: Path, make: Callable[[int], Any],
                      decode_cpu_ms: float) -> dict[str, Any]:
    """The web floor (`mmserve.bench.web_floor`) under the same uploads at the top concurrency: BentoML's own CPU
    per request, server and load generator, beside `decode_cpu_ms`: what no BentoML server here can avoid."""
    from mmserve.loadgen import run_load

    conc = max(config.http_concurrency)
    out: dict[str, Any] = {"concurrency": conc, "decode_cpu_ms": decode_cpu_ms}
    try:
        with bentoml_server_process(env, work / "web_floor.log", config.http_ready_timeout,
                                    "mmserve.bench.web_floor:WebFloor") as (url, proc):
            run_load(url, make, 64, min(8, conc))  # warm-up
            roles = server_roles(proc.pid)
            results, server_s, client_s = [], 0.0, 0.0
            for _ in range(config.http_runs):
                result, client, server = measured_load(url, make, config.http_requests, conc, roles)
                results.append(result)
                client_s, server_s = client_s + client, server_s + sum(server.values())
    except RuntimeError as exc:
        return {**out, "skipped": str(exc)}
    sent = sum(r.requests for r in results)
    return {**out, "throughput": statistics.median(r.throughput for r in results), "ok": sum(r.ok for r in results),
            "sent": sent, "server_cpu_ms_per_request": 1e3 * server_s / sent,
            "client_cpu_ms_per_request": 1e3 * client_s / sent}


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
        "MMSERVE_ONNX_SPINNING": "1" if config.onnx_spinning else "0",
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
        with bentoml_server_process(env, work / "server.log", config.http_ready_timeout) as (url, proc):
            warm = run_load(url, maker(True), max(8, config.http_max_batch), min(8, config.http_max_batch))
            if warm.ok == 0:
                return {"skipped": f"server answered no request during warm-up: {warm.errors}"}
            roles = server_roles(proc.pid)  # after the warm-up: every worker is up
            results["served_runtime"] = _served_runtime(url)
            runs: dict[tuple[str, int], list] = {}
            batches: dict[tuple[str, int], dict[str, float]] = {}
            # interleaved: every (traffic, concurrency) once per run, concurrency ascending with both traffics at
            # each level, so neither traffic inherits the other's congestion (see `after_load` below)
            for _ in range(config.http_runs):
                for conc in config.http_concurrency:
                    for traffic in ("single", "mixed"):
                        before = _engine_batches(url)
                        res, cpu, server = measured_load(url, maker(traffic == "mixed"), config.http_requests,
                                                         conc, roles)
                        after = _engine_batches(url)
                        runs.setdefault((traffic, conc), []).append(res)
                        acc = batches.setdefault((traffic, conc), {})
                        acc["client_cpu_s"] = acc.get("client_cpu_s", 0.0) + cpu
                        for role, used in server.items():
                            acc[f"{role}_cpu_s"] = acc.get(f"{role}_cpu_s", 0.0) + used
                        for k in after:
                            acc[k] = acc.get(k, 0.0) + after[k] - before.get(k, 0.0)
            # BentoML's adaptive dispatcher holds a lone request while `n * (wait_n + tick + o_a)` is below 0.95x
            # the mean first-request wait of its last 50 batches; after high concurrency that mean is large, so
            # concurrency-1 latency rises until ~50 new batches flush it: measure it once right after the load
            low = min(config.http_concurrency)
            res = run_load(url, maker(False), config.http_requests, low)
            results["after_load"] = {"traffic": "single", "concurrency": low, "throughput": res.throughput,
                                     "p50_ms": res.p50_ms, "p99_ms": res.p99_ms, "ok": res.ok, "sent": res.requests}
        results["web_floor"] = web_floor_section(config, env, work, maker(False), _decode_cpu_ms(backbone, pngs))
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
        sent = max(1, sum(r.requests for r in rs))
        results["traffic"][traffic][str(conc)].update({  # from the server's /metrics: did requests coalesce?
            "engine_batch_mean": acc["mmserve_engine_batch_size_sum"] / n if n else None,
            "engine_tasks_per_batch_mean": acc.get("mmserve_engine_batch_tasks_sum", 0.0) / n if n else None,
            # the load generator shares the cores with the server: its CPU per request is overhead the engine
            # figure never pays
            "client_cpu_ms_per_request": 1e3 * acc.get("client_cpu_s", 0.0) / sent,
            # where the server's CPU goes per request: the front (upload parsing, decoding, the internal call)
            # and the engine (its HTTP handling plus the forward pass); see report.cpu_budget
            "server_cpu_ms_per_request": {role: 1e3 * acc.get(f"{role}_cpu_s", 0.0) / sent
                                          for role in ("front", "engine", "supervisor")}})
    if server_log is not None:
        results["server_log"] = str(server_log)
    return results
