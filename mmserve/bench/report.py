"""The ratios and target verdicts of a bench run, and its printed table."""

from __future__ import annotations

from typing import Any

from mmserve.bench.config import TARGETS, BenchConfig


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compute_ratios(throughput: dict[str, dict[str, float]], http: dict[str, Any],
                   config: BenchConfig) -> dict[str, Any]:
    """The ratios the issue names (mixed/single, engine/floor, onnx/torch, http/engine, p99/p50) per batch size."""
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


def cpu_budget(timings: dict[str, dict[str, Any]], http: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """Where the CPU of one HTTP request goes at the top concurrency, beside the in-process engine's CPU per image.

    When the cores are saturated, throughput is CPU available / CPU per request, so HTTP/engine is about
    model / (client + front + engine + supervisor): the share of a request's CPU that is the forward pass.
    With the web floor measured, `bound` is that share for a server that pays nothing beyond BentoML's own
    per-request CPU (the floor's server and load generator) and the decode: no BentoML server here does better.
    """
    if "traffic" not in http:
        return {}
    b, top = str(config.http_max_batch), str(max(config.http_concurrency))
    out: dict[str, Any] = {"concurrency": int(top), "engine_batch": int(b)}
    floor = http.get("web_floor", {})
    for traffic, cases in http["traffic"].items():
        case = cases.get(top, {})
        server = case.get("server_cpu_ms_per_request")
        model = timings.get(b, {}).get(f"{traffic}/{config.http_runtime}", {}).get("cpu_ms_per_image")
        if not server or model is None:
            continue
        client = case.get("client_cpu_ms_per_request", 0.0)
        total = client + sum(server.values())
        out[traffic] = {"client_ms": client, **{f"{role}_ms": v for role, v in server.items()},
                        "total_ms": total, "model_ms": model,
                        "engine_web_ms": server.get("engine", 0.0) - model,
                        "overhead_ms": total - model, "predicted_http_over_engine": _ratio(model, total)}
        if "server_cpu_ms_per_request" in floor:
            least = (floor["server_cpu_ms_per_request"] + floor["client_cpu_ms_per_request"]
                     + floor["decode_cpu_ms"])
            out[traffic]["bound"] = {"web_floor_ms": floor["server_cpu_ms_per_request"],
                                     "web_floor_client_ms": floor["client_cpu_ms_per_request"],
                                     "decode_ms": floor["decode_cpu_ms"], "least_overhead_ms": least,
                                     "best_http_over_engine": _ratio(model, model + least)}
    return out


def judge_targets(ratios: dict[str, Any], agreement: dict[str, Any], config: BenchConfig) -> list[dict[str, Any]]:
    """Each target of the issue with its measured value and whether it is met (None: not measured)."""
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
        budget = report.get("cpu_budget") or {}
        for traffic in ("single", "mixed"):
            c = budget.get(traffic)
            if c:
                lines.append(f"CPU ms per request ({traffic}, concurrency {budget['concurrency']}): client "
                             f"{c['client_ms']:.1f} + front {c['front_ms']:.1f} + engine {c['engine_ms']:.1f} "
                             f"+ supervisor {c['supervisor_ms']:.1f} = {c['total_ms']:.1f}; the in-process engine "
                             f"spends {c['model_ms']:.1f} per image at batch {budget['engine_batch']}, so "
                             f"{c['overhead_ms']:.1f} is web stack and load generator and CPU shares predict "
                             f"http/engine {_fmt(c['predicted_http_over_engine'])}")
        floor = http.get("web_floor", {})
        bound = (budget.get("single") or {}).get("bound")
        if bound:
            lines.append(f"web floor (BentoML, same uploads, no model, concurrency {floor['concurrency']}): "
                         f"{floor['throughput']:.0f} req/s, server {bound['web_floor_ms']:.2f} + client "
                         f"{bound['web_floor_client_ms']:.2f} ms CPU per request; decode + preprocess "
                         f"{bound['decode_ms']:.2f} ms per upload; a BentoML server paying only these reaches at "
                         f"most http/engine {_fmt(bound['best_http_over_engine'])}")
        elif floor.get("skipped"):
            lines.append(f"web floor: skipped ({floor['skipped']})")
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
