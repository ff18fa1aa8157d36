"""`mmserve bench` smoke tests on the tiny backbone: every section and ratio is there. Never asserts speed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmserve.backbone import EMBEDDED_MODEL, TINY_MODEL, BackboneSpec, load_backbone
from mmserve.bench import BenchConfig, Case, format_report, measure, run_bench, token_cost
from mmserve.bench.report import cpu_budget
from mmserve.cli import main
from mmserve.loadgen import RequestSpec, run_load

SECTIONS = ("meta", "floor", "engine", "mixed", "agreement", "http", "ratios", "tokens", "targets")
RATIOS = ("mixed_over_single", "engine_over_floor", "onnx_over_torch", "http_over_engine", "http_p99_over_p50")


def _positive(value) -> bool:
    return isinstance(value, float) and value > 0


def _cpu_ceiling_ms(throughput: float, requests: int = 4) -> float:
    """Most server CPU ms per request a load run can show: every core busy for its whole wall time (2x slack for
    the measuring window), plus a 10 ms tick of error for each of up to 8 server processes."""
    return 2 * (os.cpu_count() or 1) * 1e3 / throughput + 8 * 10 / requests


def test_bench_cli_writes_every_section_and_ratio(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", TINY_MODEL, "--pretrained", "none", "--batch-sizes", "1,2", "--rounds", "1",
                 "--iters", "1", "--warmup", "0", "--tasks", "3", "--agreement-images", "6", "--target-batch", "2",
                 "--exporter", "legacy", "--no-http", "--onnx-spinning", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["meta"]["config"]["onnx_spinning"] is True
    assert {v: d["spinning"] for v, d in report["meta"]["onnx"].items()} == dict.fromkeys(("fp32", "opt", "int8"), True)
    assert set(SECTIONS) <= set(report) and set(RATIOS) <= set(report["ratios"])
    assert "random" in report["meta"]["backbone"]["note"] and "speed only" in report["meta"]["registry"]["note"]
    for batch in ("1", "2"):
        assert _positive(report["floor"][batch]["floor/torch"]["images_per_s"])
        for rt in ("torch", "onnx-fp32", "onnx-opt", "onnx-int8"):
            assert _positive(report["engine"][batch][f"single/{rt}"]["images_per_s"])
            assert _positive(report["mixed"][batch][f"mixed/{rt}"]["images_per_s"])
            assert _positive(report["engine"][batch][f"single/{rt}"]["cpu_ms_per_image"])
            assert _positive(report["ratios"]["mixed_over_single"][batch][rt])
        assert _positive(report["ratios"]["engine_over_floor"][batch]["torch"])
        for rt in ("onnx-fp32", "onnx-opt", "onnx-int8"):
            assert _positive(report["ratios"]["onnx_over_torch"][batch][rt])
    assert report["agreement"]["int8_vs_fp32"] >= 0.5  # random tiny weights: int8 mostly agrees, no 99% claim
    diff = report["agreement"]["max_abs_feature_diff_vs_torch"]
    assert diff["fp32"] < 1e-4 and diff["opt"] < 1e-4  # float graphs reproduce torch's features
    assert diff["int8"] > 1e-5  # and the int8 runtime really ran quantized (not fp32 under the int8 name)
    assert report["agreement"]["pairs"]["onnx-fp32 vs torch"] == 1.0  # fp32 graphs give torch's labels
    assert "skipped" in report["http"]
    calibration = report["meta"]["machine"]["thread_calibration"]
    assert report["meta"]["machine"]["torch_threads"] >= 1 and "torch" in calibration and "onnx-int8" in calibration
    assert 0 < report["tokens"]["predicted_engine_over_floor"] < 1
    assert {t["target"] for t in report["targets"]} >= {"mixed/single >= 0.95", "onnx int8 >= 1.8x torch"}
    printed = capsys.readouterr().out
    assert "ratios" in printed and "targets:" in printed and "prompt tokens" in printed


def test_bench_http_section_against_the_real_server(tiny_backbone, tmp_path: Path) -> None:
    """The real BentoML server, serving with runtime=onnx (the torch runtime is covered by test_service.py)."""
    config = BenchConfig(batch_sizes=(2,), rounds=1, iters=1, warmup=0, tasks=3, classes=3, variants=("opt",),
                         exporter="legacy", agreement_images=4, target_batch=2, http_runtime="onnx-opt",
                         http_concurrency=(1, 2), http_requests=4, http_runs=1, http_max_batch=2,
                         out=tmp_path / "bench.json")
    report = run_bench(config, tiny_backbone, "random weights: speed only", log=lambda m: None)
    http = report["http"]
    assert "traffic" in http, http
    assert http["served_runtime"] == "onnx"
    server_cpu: dict[str, float] = {}
    for traffic in ("single", "mixed"):
        for conc in ("1", "2"):
            case = http["traffic"][traffic][conc]
            assert case["ok"] == case["sent"] == 4
            assert _positive(case["throughput"]) and case["p99_ms"] >= case["p50_ms"] > 0
            assert case["engine_batch_mean"] is not None and 1 <= case["engine_batch_mean"] <= 2  # from /metrics
            assert 1 <= case["engine_tasks_per_batch_mean"] <= case["engine_batch_mean"]
            assert case["client_cpu_ms_per_request"] > 0
            for role, ms in case["server_cpu_ms_per_request"].items():
                server_cpu[role] = server_cpu.get(role, 0.0) + ms
            # per-request deltas over the load, not CPU since the server started: at most every core for the
            # whole run (2x slack, plus 10 ms ticks of a few processes spread over 4 requests)
            assert sum(case["server_cpu_ms_per_request"].values()) <= _cpu_ceiling_ms(case["throughput"])
        assert _positive(report["ratios"]["http_over_engine"][traffic])
        assert _positive(report["ratios"]["http_p99_over_p50"][traffic])
        budget = report["cpu_budget"][traffic]
        assert budget["model_ms"] > 0 and budget["total_ms"] == pytest.approx(
            budget["client_ms"] + budget["front_ms"] + budget["engine_ms"] + budget["supervisor_ms"])
        top = http["traffic"][traffic]["2"]  # the budget splits the top concurrency's measured CPU, every role
        assert budget["client_ms"] == top["client_cpu_ms_per_request"]
        assert {r: budget[f"{r}_ms"] for r in ("front", "engine", "supervisor")} == top["server_cpu_ms_per_request"]
    # the front and the engine workers were found and used CPU (summed over the cases: Linux counts process CPU in
    # 10 ms ticks, more than 4 tiny requests may use)
    assert server_cpu["front"] > 0 and server_cpu["engine"] > 0
    after = http["after_load"]
    assert after["concurrency"] == 1 and after["ok"] == after["sent"] == 4 and after["p99_ms"] >= after["p50_ms"] > 0
    assert "HTTP on loopback" in format_report(report) and "right after the load" in format_report(report)
    assert "CPU ms per request (single" in format_report(report)
    # the web floor: BentoML's own per-request CPU under the same uploads, and the decode, bound http/engine
    floor = http["web_floor"]
    assert floor["ok"] == floor["sent"] == 4 and floor["concurrency"] == 2, floor
    assert floor["server_cpu_ms_per_request"] <= _cpu_ceiling_ms(floor["throughput"])  # a delta, not since start
    assert floor["client_cpu_ms_per_request"] > 0 and floor["decode_cpu_ms"] > 0
    bound = report["cpu_budget"]["single"]["bound"]
    assert bound["web_floor_ms"] == floor["server_cpu_ms_per_request"]
    assert bound["least_overhead_ms"] == pytest.approx(
        floor["server_cpu_ms_per_request"] + floor["client_cpu_ms_per_request"] + floor["decode_cpu_ms"])
    assert 0 < bound["best_http_over_engine"] < 1
    assert "web floor (BentoML, same uploads, no model" in format_report(report)


def test_cpu_budget_splits_a_request_into_model_and_overhead() -> None:
    config = BenchConfig(http_runtime="torch", http_concurrency=(1, 32), http_max_batch=32)
    http = {"traffic": {"single": {"32": {"client_cpu_ms_per_request": 1.5, "server_cpu_ms_per_request":
                                          {"front": 3.5, "engine": 12.0, "supervisor": 0.0}}},
                        "mixed": {"32": {"client_cpu_ms_per_request": 1.5}}}}  # no server figures: left out
    timings = {"32": {"single/torch": {"cpu_ms_per_image": 10.0}, "mixed/torch": {"cpu_ms_per_image": 10.0}}}
    budget = cpu_budget(timings, http, config)
    single = budget["single"]
    assert single["total_ms"] == pytest.approx(17.0) and single["engine_web_ms"] == pytest.approx(2.0)
    assert single["overhead_ms"] == pytest.approx(7.0)
    assert single["predicted_http_over_engine"] == pytest.approx(10.0 / 17.0)
    assert "mixed" not in budget and budget["concurrency"] == 32 and budget["engine_batch"] == 32
    assert "bound" not in single  # no web floor measured
    assert cpu_budget(timings, {"skipped": "disabled"}, config) == {}
    http["web_floor"] = {"concurrency": 32, "throughput": 900.0, "server_cpu_ms_per_request": 1.0,
                         "client_cpu_ms_per_request": 0.5, "decode_cpu_ms": 1.0}
    bound = cpu_budget(timings, http, config)["single"]["bound"]
    assert bound["least_overhead_ms"] == pytest.approx(2.5)
    assert bound["best_http_over_engine"] == pytest.approx(10.0 / 12.5)  # model / (model + least overhead)


def test_measure_interleaves_rounds_and_takes_the_median() -> None:
    calls: list[str] = []
    durations = {"a": iter([0.001, 0.001, 0.05, 0.001]), "b": iter([0.002] * 4)}

    def fn(name: str):
        def call() -> None:
            calls.append(name)
            time.sleep(next(durations[name]))
        return call

    result = measure([Case("a", fn("a"), 4), Case("b", fn("b"), 4)], rounds=3, iters=1, warmup=1)
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]  # rotated order per round, after one warm-up each
    assert result["a"].median_s < 0.02 < result["a"].max_s  # one slow round does not move the median
    assert result["a"].images_per_s == pytest.approx(4 / result["a"].median_s)


def test_loadgen_bounds_concurrency_and_counts_statuses() -> None:
    state = {"in_flight": 0, "peak": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            with lock:
                state["in_flight"] += 1
                state["peak"] = max(state["peak"], state["in_flight"])
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(0.01)
            with lock:
                state["in_flight"] -= 1
            self.send_response(500 if "bad" in self.path else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = run_load(url, lambda i: RequestSpec("/bad" if i % 5 == 0 else "/ok",
                                                     files={"image": ("x.png", b"123", "image/png")}), 20, 3)
    finally:
        server.shutdown()
    assert result.requests == 20 and result.ok == 16 and result.errors == {500: 4}
    assert state["peak"] == 3  # bounded at the concurrency asked for, and reaching it
    assert result.p99_ms >= result.p50_ms > 0 and result.throughput > 0


def test_loadgen_counts_transport_errors_as_status_zero() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_load(f"http://127.0.0.1:{port}", lambda i: RequestSpec("/classify?task=a", data={"text": "x"}), 4, 2)
    assert result.ok == 0 and result.errors == {0: 4} and result.throughput == 0
    assert sum(result.failures.values()) == 4 and all("Connect" in name for name in result.failures)


def test_token_cost_of_the_embedded_model() -> None:
    backbone = load_backbone(BackboneSpec(EMBEDDED_MODEL))
    cost = token_cost(backbone, 8)
    assert cost["tokens_floor"] == 1 + 64 and cost["tokens_prompted"] == 1 + 8 + 64
    assert 65 / 73 * 0.98 < cost["predicted_engine_over_floor"] < 65 / 73  # attention adds a little on top


def test_agreement_inputs_take_the_task_from_the_folder(tmp_path: Path) -> None:
    from PIL import Image

    from mmserve.bench import agreement_inputs

    for task, n in (("noto", 3), ("twemoji", 2), ("other", 2)):
        for i in range(n):
            (tmp_path / task / "cls").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / task / "cls" / f"{i}.png")
    files, tasks = agreement_inputs(tmp_path, 100, ["noto", "twemoji"], seed=0)
    assert len(files) == 7
    for f, t in zip(files, tasks, strict=True):
        folder = f.relative_to(tmp_path).parts[0]
        assert t == folder if folder in ("noto", "twemoji") else t in ("noto", "twemoji")
    few, _ = agreement_inputs(tmp_path, 4, ["noto"], seed=0)
    assert len(few) == 4 and few == agreement_inputs(tmp_path, 4, ["noto"], seed=0)[0]


def test_stopping_a_server_that_already_exited_is_no_error() -> None:
    """A server that died during start-up must leave its own error as the one reported, not ProcessLookupError."""
    from mmserve.bench.http import _stop_group

    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(30)
    _stop_group(proc)  # its process group is gone
    assert proc.returncode == 0


def test_registry_scale_section_reports_every_target(tmp_path: Path, capsys) -> None:
    """`mmserve bench --registry-scale` on the tiny backbone: every figure and target is in the JSON and table (the
    issue's numbers come from the shipped backbone: docs/performance.md)."""
    out = tmp_path / "scale.json"
    code = main(["bench", "--model", TINY_MODEL, "--pretrained", "none", "--registry-scale", "12",
                 "--registry-resident", "40:5", "--registry-workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())["registry_scale"]
    (row,) = report["scales"]
    assert row["tasks"] == 12 and all(_positive(row[k]) for k in (
        "ready_s", "follower_ready_s", "add_s", "follow_add_s", "remove_s", "follow_remove_s", "mixed_over_8",
        "served_bytes_per_task"))
    resident = report["resident"]
    assert resident["registered"] == 40 and resident["residency"]["resident"] == 5
    assert resident["residency"]["evictions"] > 0 and resident["cold_requests"] == 35
    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 6 and all(t["met"] in (True, False) for t in targets.values())
    printed = capsys.readouterr().out
    assert "Registry scale" in printed and all(t in printed for t in targets)
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # the stores are gone
    assert main(["bench", "--model", TINY_MODEL, "--pretrained", "none", "--registry-scale", "4"]) == 2
