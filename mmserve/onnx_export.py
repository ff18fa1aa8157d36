"""ONNX export of the prompted image tower (prompts are a graph input) and of MoPE fusion tasks.

Graphs and their sidecars, in one directory (default `models/onnx/`):

    image-k{K}-p{P}.{variant}.onnx  inputs images (B, 3, S, S), prompts (B, K, P, d_v) -> features (B, E), normalised
    image-k0-p0.{variant}.onnx      the unprompted tower (open_clip's encode_image, normalised): images -> features
    fuse-{task}.{variant}.onnx      one fusion task, MoPE + tower + head: images, psi (B, d_psi) -> logits, routing
    <graph>.json                    sidecar: backbone fingerprint, K, P, shapes, sha256 of the graph, parity

Prompts are an input, so ONE image graph serves every classification task whose prompts have that (K, P) and every
mixed-task batch. The batch axis is dynamic (exported with batch 2: a batch-1 example would freeze it). K and P are
fixed per graph because they set the sequence length; a runtime refuses prompts of another shape, and refuses any
graph whose sidecar names another backbone fingerprint.

Variants: `fp32` is the plain export; `opt` fuses attention, skip-LayerNorm and bias-GELU into onnxruntime's
contrib ops; `int8` is dynamic int8 quantisation (weights int8, activations quantised per call) of `opt`.

Exporter details (see `exportable_encoder`): a COPY of the vision tower is exported whose nn.MultiheadAttention
modules are replaced by the same computation written with separate q/k/v projections and
`scaled_dot_product_attention`. The result is identical (parity is checked at export and in tests) but its graph
matches the attention patterns of onnxscript's onnxruntime fusions; nn.MultiheadAttention's packed in-projection
does not match onnxruntime's own optimizer, whose fusions also need a symbolic shape inference that fails on this
graph. The backbone itself is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
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

if TYPE_CHECKING:
    from mmserve.registry import Registry

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
VARIANTS = ("fp32", "opt", "int8")
DEFAULT_OPSET = 18
EXPORT_BATCH = 2  # >= 2: a batch-1 example lets the exporter specialise the batch axis to 1
PARITY_TOLERANCE = 1e-4  # max abs diff of normalised features (fp32 / opt graphs vs torch) accepted at export
FUSED_OPS = ("Attention", "MultiHeadAttention", "QAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu",
             "Gelu", "LayerNormalization", "DynamicQuantizeMatMul", "MatMulInteger")


class OnnxExportError(MmserveError):
    """The export failed or produced a graph that does not match torch."""


class OnnxGraphError(MmserveError):
    """An exported graph cannot be used: wrong backbone, wrong prompt shape, corrupt or missing file."""


# ---- sidecars ------------------------------------------------------------------------------------------------


@dataclass
class GraphInfo:
    """The JSON sidecar next to every exported graph: what it computes and for which backbone."""

    kind: str  # "image" or "fusion"
    variant: str  # "fp32", "opt" or "int8"
    file: str  # graph file name, relative to the sidecar's directory
    sha256: str
    backbone_model: str
    fingerprint: str
    image_size: int
    vision_width: int
    embed_dim: int
    depth: int  # K: prompted layers (0 = unprompted graph)
    prompt_tokens: int  # P: prompt tokens per layer, fixed per graph
    inputs: dict[str, list]
    outputs: dict[str, list]
    task: str | None = None  # fusion graphs: the fusion task
    task_digest: str | None = None  # fusion graphs: weights_digest of the task's FusionModel
    n_classes: int | None = None
    psi_dim: int | None = None
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    export_batch: int = EXPORT_BATCH
    parity_max_abs_diff: float | None = None  # vs torch on random inputs at export time
    fused_ops: dict[str, int] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format: int = SIDECAR_FORMAT

    @property
    def key(self) -> tuple:
        """What a runtime looks a graph up by: ("image", K, P) or ("fusion", task)."""
        return ("image", self.depth, self.prompt_tokens) if self.kind == "image" else ("fusion", self.task)

    def save(self, directory: Path) -> Path:
        """Write `<graph stem>.json` atomically."""
        path = directory / sidecar_name(self.file)
        atomic_write_bytes(path, (json.dumps(asdict(self), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: Path) -> GraphInfo:
        """Read and structurally validate a sidecar; raises OnnxGraphError naming the file."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OnnxGraphError(f"{path}: unreadable ONNX sidecar: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise OnnxGraphError(f"{path}: not an mmserve ONNX sidecar of format {SIDECAR_FORMAT}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise OnnxGraphError(f"{path}: unknown field(s) {sorted(unknown)}")
        try:
            info = cls(**data)
        except TypeError as exc:
            raise OnnxGraphError(f"{path}: {exc}") from None
        if info.kind not in ("image", "fusion") or info.variant not in VARIANTS:
            raise OnnxGraphError(f"{path}: kind {info.kind!r} / variant {info.variant!r} not understood")
        return info


def sidecar_name(graph_file: str) -> str:
    """`image-k6-p8.opt.onnx` -> `image-k6-p8.opt.json`."""
    return graph_file[: -len(".onnx")] + ".json" if graph_file.endswith(".onnx") else graph_file + ".json"


def image_graph_stem(depth: int, prompt_tokens: int) -> str:
    """File name, less `.<variant>.onnx`, of the image graph for prompts (K, P)."""
    return f"image-k{depth}-p{prompt_tokens}"


def fusion_graph_stem(task: str) -> str:
    """File name, less `.<variant>.onnx`, of the fusion graph of `task`."""
    return "fuse-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in task)


def read_sidecars(directory: str | Path) -> list[GraphInfo]:
    """Every sidecar in `directory` (no graph is opened)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [GraphInfo.load(p) for p in sorted(directory.glob("*.json"))]


def check_graph(info: GraphInfo, directory: Path, backbone: Backbone, verify_hash: bool = True) -> Path:
    """The graph file of `info` after checking its backbone fingerprint (and sha256); raises OnnxGraphError."""
    where = directory / sidecar_name(info.file)
    if info.fingerprint != backbone.fingerprint:
        raise OnnxGraphError(
            f"{where}: graph was exported from backbone {info.backbone_model} ({info.fingerprint}), but the loaded "
            f"backbone is {backbone.spec.model} ({backbone.fingerprint}); re-run `mmserve export-onnx` for this "
            f"backbone")
    if info.vision_width != backbone.vision_width or info.image_size != backbone.image_size:
        raise OnnxGraphError(f"{where}: width/image size {info.vision_width}/{info.image_size} do not match the "
                             f"backbone ({backbone.vision_width}/{backbone.image_size})")
    path = directory / info.file
    if not path.is_file():
        raise OnnxGraphError(f"{where}: graph file '{info.file}' is missing")
    if verify_hash and sha256_file(path) != info.sha256:
        raise OnnxGraphError(f"{path}: sha256 does not match its sidecar (corrupt or replaced); re-export it")
    return path


# ---- exportable modules --------------------------------------------------------------------------------------


class ExportAttention(nn.Module):
    """nn.MultiheadAttention self-attention rewritten with q/k/v projections + SDPA (same weights, same result)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        for i, proj in enumerate((self.q, self.k, self.v)):
            proj.weight.data.copy_(w[i * d:(i + 1) * d])
            proj.bias.data.copy_(b[i * d:(i + 1) * d])
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.requires_grad_(False)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Self-attention over `query` (key and value are the same tensor in open_clip's vision blocks)."""
        x = query if self.batch_first else query.transpose(0, 1)
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, s, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _swappable(mha: nn.Module) -> bool:
    return (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
            and mha.bias_k is None and not mha.add_zero_attn)


def exportable_encoder(backbone: Backbone) -> PromptedImageEncoder:
    """A prompted image encoder over a COPY of the vision tower whose attention is export-friendly."""
    encoder = PromptedImageEncoder(backbone)
    visual = copy.deepcopy(backbone.model.visual)
    for block in visual.transformer.resblocks:
        if _swappable(getattr(block, "attn", None)):
            block.attn = ExportAttention(block.attn)
    encoder.visual = visual.eval().requires_grad_(False)
    return encoder.eval()


class ImageGraph(nn.Module):
    """What the image graph computes: normalised features of images with per-sample prompts (B, K, P, d_v)."""

    def __init__(self, encoder: PromptedImageEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, E)."""
        return self.encoder(images, prompts)


class FusionGraph(nn.Module):
    """What a fusion graph computes: one task's MoPE prompts, the prompted tower and its head."""

    def __init__(self, encoder: PromptedImageEncoder, model: FusionModel):
        super().__init__()
        self.encoder = encoder
        self.model = model

    def forward(self, images: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and routing scores (B, K, k)."""
        out = self.model(self.encoder, images, psi)
        return out.logits, out.routing


# ---- export --------------------------------------------------------------------------------------------------


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


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


@contextlib.contextmanager
def _quiet_export():
    """The fused MHA fast path off (the legacy tracer records it as one opaque op) and exporter chatter muted."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _quiet_logging():
    """Silence warnings and log records below ERROR (onnxruntime's tools log "shape inference failed" hints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


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


def optimize_graph(model: onnx.ModelProto, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """Fuse attention, skip-LayerNorm and bias-GELU into onnxruntime contrib ops, then fold constants."""
    import onnx_ir as ir
    from onnxscript import optimizer as os_optimizer
    from onnxscript.rewriter import ort_fusions

    ir_model = ir.from_proto(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir_model, _stats = ort_fusions.optimize_for_ort(ir_model)
        # the fused Attention's packed QKV weight is a Concat of three initializers: fold it to one initializer
        os_optimizer.optimize(ir_model, input_size_limit=1 << 26, output_size_limit=1 << 26)
    fused = ir.to_proto(ir_model)
    try:  # onnxruntime's own transformer optimizer as a second pass: fuses what the first one left
        from onnxruntime.transformers.optimizer import optimize_model

        with _quiet_logging(), contextlib.redirect_stdout(io.StringIO()):
            ort_model = optimize_model(fused, model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=0)
        fused = ort_model.model
    except Exception as exc:  # the first pass already did the fusions that matter
        log.warning("onnxruntime transformer optimizer pass skipped: %s", exc)
    return fused


def quantize_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8: MatMul and fused Attention weights int8 (7-bit range, per channel), activations per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = copy.deepcopy(model)
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain == "com.microsoft":
            # onnxruntime skips Attention nodes that carry qkv_hidden_sizes (onnxruntime PR #9357); equal sizes
            # are the default, so drop the attribute and let them become QAttention
            for attr in list(node.attribute):
                if attr.name == "qkv_hidden_sizes" and len(set(attr.ints)) == 1:
                    node.attribute.remove(attr)
    with tempfile.TemporaryDirectory(prefix="mmserve-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        with _quiet_logging():  # the "run pre-processing" hint is not actionable here
            # reduce_range (7-bit weights): without AVX-512 VNNI the u8 x s8 kernels can saturate their 16-bit
            # pair sums; measured here it cut the max feature error 2.7x at no speed cost. Per-channel scales
            # shave a little more off.
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                             op_types_to_quantize=["MatMul", "Attention"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load_model(str(dst))


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
    heads = _num_heads(backbone)
    if options.optimize:
        models["opt"] = optimize_graph(base, heads, backbone.vision_width)
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
                          parity_max_abs_diff=diff, fused_ops=_op_counts(model),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=_versions(), **info)
        graph.save(out_dir)
        written.append(graph)
        log.info("wrote %s (parity %.2e)", path, diff or 0.0)
    return written


def _num_heads(backbone: Backbone) -> int:
    attn = getattr(backbone.model.visual.transformer.resblocks[0], "attn", None)
    return int(getattr(attn, "num_heads", 0) or max(1, backbone.vision_width // 64))


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
    """Export fusion task `task` (MoPE + prompted tower + head) with psi as an input."""
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    model = model.eval()
    module = FusionGraph(exportable_encoder(backbone), model)
    psi_dim = model.mope.psi_dim
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
    info = {"kind": "fusion", "depth": model.mope.depth, "prompt_tokens": model.mope.n_tokens, "task": task,
            "task_digest": weights_digest(model), "n_classes": int(model.head.out_features), "psi_dim": psi_dim}
    return _write_variants(base, fusion_graph_stem(task), out_dir, info, backbone, options, feeds,
                           [out.logits.numpy(), out.routing.numpy()], names + ["logits", "routing"])


def registry_prompt_shapes(registry: Registry, backbone: Backbone) -> dict[tuple[int, int], list[str]]:
    """(K, P) of the visual prompts of every task in a registry, with the tasks that have it.

    Classification tasks: their (group + task) visual prompts. Fusion tasks: their MoPE prompts (used by the
    runtime's fallback path when a fusion graph is missing or stale).
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
            mope = load_fusion(registry, entry.name, backbone).mope
            shape = (mope.depth, mope.n_tokens)
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
