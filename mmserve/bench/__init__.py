"""`mmserve bench`: the serving stack held against the backbone's own speed, every figure measured in one process.

Sections: the floor (open_clip's plain `encode_image`), the prompted engine (InferenceEngine.classify: prompt
gather, image tower, class logits, top-k) with one task per batch and with every sample from a different task,
torch and onnxruntime (fp32, fused, int8), int8 top-1 agreement, and end-to-end HTTP against the real BentoML
server on loopback with a bounded load generator.

Timing method: the cases compared with each other are INTERLEAVED: every round runs each case `iters` times, in
a rotated order, and a figure is the median over rounds of the per-call time. Noise from other processes then
hits every case of a comparison alike, so ratios hold on a shared machine even when absolute figures drift.
"""

from mmserve.bench.cli import add_bench_arguments, config_from_args, run_from_args
from mmserve.bench.config import TARGETS, BenchConfig
from mmserve.bench.http import bentoml_server, http_section
from mmserve.bench.inputs import agreement_inputs, make_random_registry, synthetic_images
from mmserve.bench.report import format_report
from mmserve.bench.run import run_bench
from mmserve.bench.timing import Case, Timing, measure, token_cost

__all__ = ["TARGETS", "BenchConfig", "Case", "Timing", "add_bench_arguments", "agreement_inputs", "bentoml_server",
           "config_from_args", "format_report", "http_section", "make_random_registry", "measure", "run_bench",
           "run_from_args", "synthetic_images", "token_cost"]
