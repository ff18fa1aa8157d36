"""Export of the prompted image tower (prompts are a graph input) and of fusion tasks to checked ONNX graphs.

Prompts are an input, so ONE image graph serves every classification task whose prompts have that (K, P) and every
mixed-task batch. The batch axis is dynamic (exported with batch 2: a batch-1 example would freeze it). K and P are
fixed per graph because they set the sequence length. The tower exported is the copy of `exportable_encoder`;
every variant written (fp32, and `opt` / `int8` from mmserve.onnx.passes) is compared with torch on random inputs.
File names and the sidecar are mmserve.onnx.catalogue's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

import mmserve
from mmserve.backbone import Backbone, weights_digest
from mmserve.encoders import PromptedImageEncoder
from mmserve.errors import MmserveError
from mmserve.fileio import atomic_write_bytes, sha256_file
from mmserve.fusion import FusionModel
from mmserve.onnx.attention import exportable_encoder, num_heads
from mmserve.onnx.catalogue import DEFAULT_OPSET, EXPORT_BATCH, GraphInfo, fusion_graph_stem, image_graph_stem
from mmserve.onnx.passes import op_counts, optimize_graph, quantize_graph

if TYPE_CHECKING:
    from mmserve.registry import Registry

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max abs diff of normalised features (fp32 / opt graphs vs torch) accepted at export


class OnnxExportError(MmserveError):
    """The export failed or produced a graph that does not match torch."""


class ImageGraph(nn.Module):
    """What the image graph computes: normalised features of images with per-sample prompts (B, K, P, d_v)."""

    def __init__(self, encoder: PromptedImageEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, E)."""
        return self.encoder(images, prompts)


class FusionGraph(nn.Module):
    """What a fusion graph computes: one task's prompts from psi, the prompted tower and its head."""

    def __init__(self, encoder: PromptedImageEncoder, model: FusionModel):
        super().__init__()
        self.encoder = encoder
        self.model = model

    def forward(self, images: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and routing scores (B, K, k)."""
        out = self.model(self.encoder, images, psi)
        return out.logits, out.routing


@dataclass
class ExportOptions:
    """How graphs are exported: which variants, which exporter, which opset."""

    optimize: bool = True  # also write the fused `opt` variant
    int8: bool = False  # also write the dynamic int8 variant (quantised from `opt` when present)
    exporter: str = "dynamo"  # "dynamo" (torch.export) or "legacy" (TorchScript tracing)
    opset: int = DEFAULT_OPSET
    check_parity: bool = True  # compare with torch on random inputs and refuse a graph beyond PARITY_TOLERANCE

    def variants(self) -> list[str]:
        """The variants these options produce, in order."""
        return ["fp32"] + (["opt"] if self.optimize else []) + (["int8"] if self.int8 else [])


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    """Check, then write atomically (single file; external data only past protobuf's 2 GB limit)."""
    if model.ByteSize() < 1_800_000_000:
        onnx.checker.check_model(model)
        atomic_write_bytes(path, model.SerializeToString())
        return
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    onnx.checker.check_model(str(path))


def _versions() -> dict[str, str]:
    import onnxruntime
    import open_clip

    return {"mmserve": mmserve.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "open_clip": open_clip.__version__}


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The fused MHA fast path off (the legacy tracer records it as one opaque op) and exporter chatter muted."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _torch_export(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], options: ExportOptions) -> onnx.ModelProto:
    """torch.onnx.export with a dynamic batch axis on every input and output."""
    module = module.eval()
    if options.exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic = {name: {0: batch} for name in input_names}
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic, dynamo=True, opset_version=options.opset,
                                        verbose=False)
        return program.model_proto
    if options.exporter == "legacy":
        buf = io.BytesIO()
        axes = {name: {0: "batch"} for name in input_names + output_names}
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, dynamo=False, opset_version=options.opset)
        return onnx.load_from_string(buf.getvalue())
    raise OnnxExportError(f"unknown exporter {options.exporter!r} (dynamo or legacy)")


def _fix_batch_axis(model: onnx.ModelProto, names: list[str]) -> None:
    """Name the first axis of every input and output 'batch' and fail if the exporter froze it."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in names:
            continue
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value") and value.name in [i.name for i in model.graph.input]:
            raise OnnxExportError(f"the exporter froze the batch axis of '{value.name}' to {dim.dim_value}")
        dim.Clear()
        dim.dim_param = "batch"


def _shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, list]]:
    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in model.graph.input}, {v.name: dims(v) for v in model.graph.output})


def _session(model_or_path: Any, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _parity(path: Path, feeds: dict[str, np.ndarray], expected: list[np.ndarray]) -> float:
    got = _session(path).run(None, feeds)
    return float(max(np.abs(g - e).max() for g, e in zip(got, expected, strict=True)))


def _write_variants(base: onnx.ModelProto, stem: str, out_dir: Path, info: dict[str, Any], backbone: Backbone,
                    options: ExportOptions, feeds: dict[str, np.ndarray], expected: list[np.ndarray],
                    names: list[str]) -> list[GraphInfo]:
    """Write fp32 (+ opt, int8) graphs and sidecars; check parity of each against torch."""
    _fix_batch_axis(base, names)
    models = {"fp32": base}
    if options.optimize:
        models["opt"] = optimize_graph(base, num_heads(backbone), backbone.vision_width)
    if options.int8:
        models["int8"] = quantize_graph(models.get("opt", base))
    written = []
    for variant, model in models.items():
        file = f"{stem}.{variant}.onnx"
        path = out_dir / file
        _save_model(model, path)
        diff = _parity(path, feeds, expected) if options.check_parity else None
        if diff is not None and variant != "int8" and diff > PARITY_TOLERANCE:
            path.unlink(missing_ok=True)
            raise OnnxExportError(f"{file}: max abs diff {diff:.2e} vs torch exceeds {PARITY_TOLERANCE:.0e}")
        inputs, outputs = _shapes(model)
        graph = GraphInfo(variant=variant, file=file, sha256=sha256_file(path), backbone_model=backbone.spec.model,
                          fingerprint=backbone.fingerprint, image_size=backbone.image_size,
                          vision_width=backbone.vision_width, embed_dim=backbone.embed_dim, inputs=inputs,
                          outputs=outputs, opset=options.opset, exporter=options.exporter,
                          parity_max_abs_diff=diff, fused_ops=op_counts(model),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=_versions(), **info)
        graph.save(out_dir)
        written.append(graph)
        log.info("wrote %s (parity %.2e)", path, diff or 0.0)
    return written


def _example_images(backbone: Backbone, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=g)


def export_image_graph(backbone: Backbone, out_dir: str | Path, depth: int, prompt_tokens: int,
                       options: ExportOptions | None = None) -> list[GraphInfo]:
    """Export the image tower for prompts (B, depth, prompt_tokens, d_v) (depth = prompt_tokens = 0: unprompted)."""
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    if (depth == 0) != (prompt_tokens == 0):
        raise OnnxExportError(f"depth {depth} and prompt tokens {prompt_tokens}: both or neither must be 0")
    if not 0 <= depth <= backbone.vision_layers:
        raise OnnxExportError(f"prompt depth {depth} must be between 1 and {backbone.vision_layers}")
    module = ImageGraph(exportable_encoder(backbone))
    images = _example_images(backbone, EXPORT_BATCH, 0)
    check_images = _example_images(backbone, EXPORT_BATCH + 1, 1)
    g = torch.Generator().manual_seed(2)
    if depth:
        prompts = 0.02 * torch.randn(EXPORT_BATCH, depth, prompt_tokens, backbone.vision_width, generator=g)
        check_prompts = torch.randn(EXPORT_BATCH + 1, depth, prompt_tokens, backbone.vision_width, generator=g)
        args, check_args, names = (images, prompts), (check_images, check_prompts), ["images", "prompts"]
    else:
        args, check_args, names = (images,), (check_images,), ["images"]
    base = _torch_export(module, args, names, ["features"], options)
    with torch.inference_mode():  # parity reference: the backbone's own encoder, not the exportable copy
        expected = [PromptedImageEncoder(backbone)(*check_args).numpy()]
    feeds = {n: a.numpy() for n, a in zip(names, check_args, strict=True)}
    info = {"kind": "image", "depth": depth, "prompt_tokens": prompt_tokens}
    return _write_variants(base, image_graph_stem(depth, prompt_tokens), out_dir, info, backbone, options, feeds,
                           expected, names + ["features"])


def export_fusion_graph(backbone: Backbone, out_dir: str | Path, task: str, model: FusionModel,
                        options: ExportOptions | None = None) -> list[GraphInfo]:
    """Export fusion task `task` (its prompts + prompted tower + head) with psi as an input."""
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    model = model.eval()
    module = FusionGraph(exportable_encoder(backbone), model)
    psi_dim = model.psi_dim
    g = torch.Generator().manual_seed(3)
    args = (_example_images(backbone, EXPORT_BATCH, 0), F.normalize(torch.randn(EXPORT_BATCH, psi_dim, generator=g),
                                                                    dim=-1))
    check = (_example_images(backbone, EXPORT_BATCH + 1, 1),
             F.normalize(torch.randn(EXPORT_BATCH + 1, psi_dim, generator=g), dim=-1))
    names = ["images", "psi"]
    base = _torch_export(module, args, names, ["logits", "routing"], options)
    with torch.inference_mode():
        out = model(PromptedImageEncoder(backbone), *check)
    feeds = {n: a.numpy() for n, a in zip(names, check, strict=True)}
    depth, tokens = model.prompt_shape
    info = {"kind": "fusion", "depth": depth, "prompt_tokens": tokens, "task": task,
            "task_digest": weights_digest(model), "n_classes": model.n_classes, "psi_dim": psi_dim}
    return _write_variants(base, fusion_graph_stem(task), out_dir, info, backbone, options, feeds,
                           [out.logits.numpy(), out.routing.numpy()], names + ["logits", "routing"])


def registry_prompt_shapes(registry: Registry, backbone: Backbone) -> dict[tuple[int, int], list[str]]:
    """(K, P) of the visual prompts of every task in a registry, with the tasks that have it.

    Classification tasks: their (group + task) visual prompts. Fusion tasks: the prompts their model makes (used
    by the runtime's fallback path when a fusion graph is missing or stale).
    """
    from mmserve.builders import load_classify_prompts, load_fusion

    shapes: dict[tuple[int, int], list[str]] = {}
    for entry in registry.manifest.tasks:
        if entry.kind == "classify":
            with torch.no_grad():
                vision = load_classify_prompts(registry, entry.name, backbone)().vision
            if vision is None:
                continue
            shape = (int(vision.shape[0]), int(vision.shape[1]))
        else:
            shape = load_fusion(registry, entry.name, backbone).prompt_shape
        shapes.setdefault(shape, []).append(entry.name)
    return shapes


def export_all(backbone: Backbone, out_dir: str | Path, registry: Registry | None = None,
               shapes: list[tuple[int, int]] | None = None, options: ExportOptions | None = None,
               unprompted: bool = True) -> list[GraphInfo]:
    """Export the image graphs for `shapes` and the registry's prompt shapes, plus a graph per fusion task."""
    from mmserve.builders import load_fusion

    options = options or ExportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[int, int]] = list(shapes or [])
    if registry is not None:
        wanted += list(registry_prompt_shapes(registry, backbone))
    if unprompted:
        wanted.append((0, 0))
    written: list[GraphInfo] = []
    for depth, tokens in dict.fromkeys(wanted):
        written += export_image_graph(backbone, out_dir, depth, tokens, options)
    if registry is not None:
        for entry in registry.manifest.tasks:
            if entry.kind == "fuse":
                written += export_fusion_graph(backbone, out_dir, entry.name,
                                               load_fusion(registry, entry.name, backbone), options)
    return written
