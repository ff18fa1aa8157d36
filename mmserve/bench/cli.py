"""`mmserve bench` arguments and entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmserve.bench.config import BenchConfig
from mmserve.bench.report import format_report
from mmserve.bench.run import run_bench
from mmserve.cli_args import positive_int


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())



def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `mmserve bench` (the backbone ones are added by the CLI)."""
    d = BenchConfig()
    p.add_argument("--registry", type=Path, default=None,
                   help="registry to serve (default: generate one with --tasks random tasks, speed only)")
    p.add_argument("--tasks", type=int, default=d.tasks, help="tasks of the generated registry (default %(default)s)")
    p.add_argument("--batch-sizes", type=_ints, default=d.batch_sizes, help="comma-separated (default 1,8,32)")
    p.add_argument("--rounds", type=positive_int, default=d.rounds,
                   help="rounds; figure = median (default %(default)s)")
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
    p.add_argument("--onnx-spinning", action="store_true",
                   help="let onnxruntime's intra-op threads spin between ops, as torch's OpenMP threads do (the "
                        "server's default is off: MMSERVE_ONNX_SPINNING)")
    p.add_argument("--http-runtime", default=d.http_runtime, choices=("torch", "onnx-fp32", "onnx-opt", "onnx-int8"))
    p.add_argument("--http-concurrency", type=_ints, default=d.http_concurrency)
    p.add_argument("--http-requests", type=positive_int, default=d.http_requests, help="requests per load run")
    p.add_argument("--http-runs", type=positive_int, default=d.http_runs, help="runs per HTTP figure (median)")
    p.add_argument("--http-max-batch", type=int, default=d.http_max_batch)
    p.add_argument("--registry-scale", type=_ints, default=None, metavar="N,N",
                   help="run only the registry-scale section at these task counts (e.g. 1000,10000)")
    p.add_argument("--registry-resident", default="100000:1000", metavar="REGISTERED:RESIDENT",
                   help="with --registry-scale: tasks registered and MMSERVE_MAX_RESIDENT_TASKS for the bounded "
                        "case (default %(default)s; 'none' skips it)")
    p.add_argument("--registry-workdir", type=Path, default=None,
                   help="with --registry-scale: where the stores are written (default: the temp dir)")
    p.add_argument("--out", type=Path, default=d.out, help="JSON report path (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed `mmserve bench` arguments."""
    return BenchConfig(batch_sizes=tuple(args.batch_sizes), rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                       tasks=args.tasks, registry=args.registry, onnx_dir=args.onnx_dir,
                       variants=tuple(v for v in args.variants.split(",") if v), exporter=args.exporter,
                       threads=args.threads, agreement_images=args.agreement_images,
                       agreement_root=args.agreement_root, target_batch=args.target_batch,
                       onnx_spinning=args.onnx_spinning,
                       http=not args.no_http, http_runtime=args.http_runtime,
                       http_concurrency=tuple(args.http_concurrency), http_requests=args.http_requests,
                       http_runs=args.http_runs, http_max_batch=args.http_max_batch, out=args.out, seed=args.seed)


def run_from_args(args: argparse.Namespace) -> int:
    """`mmserve bench`: load the backbone, run, print the table, write the JSON."""
    from mmserve.cli_args import load_backbone_from_args

    config = config_from_args(args)
    bad = set(config.variants) - {"fp32", "opt", "int8"}
    if bad:
        print(f"mmserve bench: unknown ONNX variant(s) {sorted(bad)}", file=sys.stderr)
        return 2
    backbone, note = load_backbone_from_args(args)
    print(f"backbone {backbone.spec.model}: {note}", flush=True)
    if args.registry_scale:
        return _registry_scale(args, backbone, note)
    report = run_bench(config, backbone, note, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"\nJSON report: {config.out}")
    return 0


def _registry_scale(args: argparse.Namespace, backbone, note: str) -> int:
    """`mmserve bench --registry-scale N,...`: that section alone, its table and JSON."""
    from mmserve.bench.registry_scale import format_registry_scale, run_registry_scale
    from mmserve.fileio import atomic_write_json

    if min(args.registry_scale) < 8:
        print("mmserve bench: --registry-scale: every task count must be >= 8 (throughput is judged against 8 "
              "tasks)", file=sys.stderr)
        return 2
    resident = None
    if args.registry_resident.strip().lower() != "none":
        try:
            registered, kept = (int(v) for v in args.registry_resident.split(":"))
        except ValueError:
            print(f"mmserve bench: --registry-resident {args.registry_resident!r}: expected REGISTERED:RESIDENT "
                  f"(e.g. 100000:1000) or none", file=sys.stderr)
            return 2
        resident = (registered, kept)
    if args.threads:
        torch_threads(args.threads)
    result = run_registry_scale(backbone, tuple(args.registry_scale), resident, args.registry_workdir,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    result["backbone"] = {"model": backbone.spec.model, "note": note}
    print(format_registry_scale(result))
    atomic_write_json(args.out, {"registry_scale": result})
    print(f"\nJSON report: {args.out}")
    return 0


def torch_threads(n: int) -> None:
    """Intra-op threads for the section's forward passes."""
    import torch

    torch.set_num_threads(n)
