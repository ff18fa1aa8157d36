"""onnxruntime behind the ImageRuntime protocol: the exported prompted image tower, prompts fed per call.

Session settings are deliberate: on CPU, intra-op threads = physical cores (SMT siblings share one core's FMA
units), one inter-op thread with sequential execution (a transformer's ops form a chain: nothing to run in
parallel), ORT_ENABLE_ALL graph optimisation, and thread spinning off by default (a server shares its cores
with HTTP workers and preprocessing; spinning threads steal them and collapse under contention). The CUDA
provider is chosen automatically when onnxruntime-gpu is installed and a GPU is visible.

Fusion (/fuse): a task's exported fusion graph (prompts + tower + head, psi as input) is used when its sidecar's
weights digest equals the FusionModel the engine passes; otherwise (task added or retrained after the export)
the task's prompts and head run in torch around the shared image graph for that prompt shape.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmserve.backbone import Backbone, weights_digest
from mmserve.config import read_device
from mmserve.encoders import PromptedImageEncoder
from mmserve.errors import PromptConfigError
from mmserve.fusion import FusionModel
from mmserve.onnx.catalogue import (
    ENV_DIR,
    VARIANTS,
    Catalogue,
    GraphInfo,
    OnnxGraphError,
    check_graph,
    default_onnx_dir,
)
from mmserve.onnx.export import ExportOptions, export_image_graph

log = logging.getLogger(__name__)

ENV_VARIANT = "MMSERVE_ONNX_VARIANT"
ENV_THREADS = "MMSERVE_ONNX_THREADS"
ENV_SPINNING = "MMSERVE_ONNX_SPINNING"
VARIANT_CHOICES = ("auto", *VARIANTS)  # auto: opt when exported, else fp32 (int8 only when asked for)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def select_providers(device: str | None = None) -> list[str]:
    """CUDA execution provider first when onnxruntime-gpu sees a GPU (and device is not 'cpu'), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available and _cuda_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        return torch.cuda.is_available()
    except Exception:  # a CUDA build of torch without a driver
        return False


@dataclass
class OnnxOptions:
    """Where the graphs are and how onnxruntime runs them."""

    onnx_dir: Path | None = None  # None: default_onnx_dir()
    variant: str = "auto"  # auto | fp32 | opt | int8
    intra_op_threads: int | None = None  # None: physical cores
    spinning: bool = False
    device: str | None = None  # "cpu" forces the CPU provider; None/"cuda": CUDA when available
    export_missing: bool = True  # export an image graph for a prompt shape that has none (seconds, logged)
    verify_hash: bool = True  # check each graph's sha256 against its sidecar before loading it

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OnnxOptions:
        """MMSERVE_ONNX_DIR, MMSERVE_ONNX_VARIANT, MMSERVE_ONNX_THREADS, MMSERVE_ONNX_SPINNING."""
        env = dict(os.environ) if env is None else env
        variant = (env.get(ENV_VARIANT) or "auto").strip().lower()
        if variant not in VARIANT_CHOICES:
            raise OnnxGraphError(f"{ENV_VARIANT}={variant!r}: expected one of {', '.join(VARIANT_CHOICES)}")
        threads = env.get(ENV_THREADS)
        try:
            n_threads = int(threads) if threads else None
        except ValueError:
            raise OnnxGraphError(f"{ENV_THREADS}={threads!r}: expected an integer") from None
        spinning = (env.get(ENV_SPINNING) or "0").strip().lower()
        if spinning not in ("0", "1", "false", "true"):
            raise OnnxGraphError(f"{ENV_SPINNING}={spinning!r}: expected 0 or 1")
        return cls(onnx_dir=Path(env[ENV_DIR]) if env.get(ENV_DIR) else None, variant=variant,
                   intra_op_threads=n_threads, spinning=spinning in ("1", "true"),
                   device=read_device(env, default=None))  # None: CUDA when available


class OnnxImageRuntime:
    """onnxruntime engine for the prompted image tower and fusion tasks, same interface as TorchImageRuntime."""

    name = "onnx"

    def __init__(self, backbone: Backbone, options: OnnxOptions | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.backbone = backbone
        self.options = options or OnnxOptions.from_env()
        if self.options.variant not in VARIANT_CHOICES:
            raise OnnxGraphError(f"ONNX variant {self.options.variant!r}: expected one of {VARIANT_CHOICES}")
        self.onnx_dir = Path(self.options.onnx_dir or default_onnx_dir())
        self.providers = select_providers(self.options.device)
        self.threads = self.options.intra_op_threads or physical_cores()
        self._lock = threading.Lock()
        self._sessions: dict[tuple, object] = {}
        self._catalogue = Catalogue()
        self._export_dir: Path | None = None
        self._cpu_copy: Backbone | None = None
        self._digests: weakref.WeakKeyDictionary[FusionModel, str] = weakref.WeakKeyDictionary()
        self._torch_encoder = PromptedImageEncoder(backbone)  # embeddings for prompts that route on the image
        self._catalogue.scan(self.onnx_dir, backbone)  # refuses graphs of another backbone at start

    # ---- graphs and sessions -------------------------------------------------------------------------------

    @property
    def graphs(self) -> list[GraphInfo]:
        """Every graph this runtime can use."""
        return self._catalogue.graphs

    def _session_options(self):
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spinning else "0")
        so.log_severity_level = 3
        return so

    def _export_target(self) -> Path:
        """The graph directory if it can be written (e.g. not inside a read-only bento), else a temp directory."""
        try:
            self.onnx_dir.mkdir(parents=True, exist_ok=True)
            if os.access(self.onnx_dir, os.W_OK):
                return self.onnx_dir
        except OSError:
            pass
        if self._export_dir is None:
            import tempfile

            self._export_dir = Path(tempfile.mkdtemp(prefix="mmserve-onnx-"))
            weakref.finalize(self, shutil.rmtree, self._export_dir, ignore_errors=True)  # gone with the runtime
        return self._export_dir

    def _cpu_backbone(self) -> Backbone:
        """The backbone to export from: graphs are traced on CPU (the export's example inputs and parity check run
        there), so a backbone served from a GPU is exported from a CPU copy of its weights."""
        if self.backbone.device.type == "cpu":
            return self.backbone
        if self._cpu_copy is None:
            self._cpu_copy = replace(self.backbone, model=copy.deepcopy(self.backbone.model).to("cpu"),
                                     spec=replace(self.backbone.spec, device="cpu"))
        return self._cpu_copy

    def _export_image(self, depth: int, tokens: int) -> None:
        variant = self.options.variant
        opts = ExportOptions(optimize=variant in ("auto", "opt", "int8"), int8=variant == "int8")
        target = self._export_target()
        log.warning("no ONNX image graph for prompts (K=%d, P=%d) in %s: exporting one to %s (run `mmserve "
                    "export-onnx --registry ...` before serving to avoid this)", depth, tokens, self.onnx_dir, target)
        for info in export_image_graph(self._cpu_backbone(), target, depth, tokens, opts):
            self._catalogue.add(info, target)

    def session(self, key: tuple) -> tuple[Any, GraphInfo]:
        """The onnxruntime session for ("image", K, P) or ("fusion", task); exports missing image graphs."""
        graph = self._catalogue.pick(key, self.options.variant)
        if graph is not None and (key, graph.info.variant) in self._sessions:
            return self._sessions[(key, graph.info.variant)], graph.info
        with self._lock:
            graph = self._catalogue.pick(key, self.options.variant)
            if graph is None:
                if key[0] != "image" or not self.options.export_missing:
                    have = self._catalogue.image_shapes()
                    raise OnnxGraphError(
                        f"no {self.options.variant} ONNX graph for {key} in {self.onnx_dir} (image graphs for "
                        f"(K, P) = {have}); run `mmserve export-onnx --out {self.onnx_dir} ...`")
                self._export_image(key[1], key[2])
                graph = self._catalogue.pick(key, self.options.variant)
                if graph is None:
                    raise OnnxGraphError(f"exporting {key} did not produce a {self.options.variant} graph")
            slot = (key, graph.info.variant)
            if slot not in self._sessions:
                path = check_graph(graph.info, graph.directory, self.backbone, self.options.verify_hash)
                self._sessions[slot] = self._ort.InferenceSession(str(path), self._session_options(),
                                                                  providers=self.providers)
            return self._sessions[slot], graph.info

    # ---- ImageRuntime -------------------------------------------------------------------------------------

    def prepare(self, shapes: Iterable[tuple[int, int]], fusion: Mapping[str, tuple[FusionModel, int]]) -> None:
        """Open (export if allowed) every session a registry version needs, so that no request pays for it and
        a registry whose graphs are missing is refused at load / reload, not at its first request."""
        for depth, tokens in sorted(set(shapes)):
            self.session(("image", depth, tokens) if tokens else ("image", 0, 0))
        size = self.backbone.image_size
        for task, (model, psi_dim) in fusion.items():
            if self.fusion_graph(task, model) is not None:
                self.session(("fusion", task))
            else:  # torch prompts + the image graph of their shape: one tiny run finds and opens it
                device = self.backbone.device
                self.fuse(task, model, torch.zeros(2, 3, size, size, device=device), torch.zeros(2, psi_dim,
                                                                                             device=device))

    def _run(self, key: tuple, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        sess, _info = self.session(key)
        device = next(iter(feeds.values())).device
        arrays = {k: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()) for k, v in feeds.items()}
        return [torch.from_numpy(o).to(device) for o in sess.run(None, arrays)]

    def encode(self, images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """Normalised image features (B, E) for images (B, 3, H, W) with per-sample prompts (B, K, P, d_v)."""
        batch = images.shape[0]
        size = self.backbone.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise PromptConfigError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if prompts is None or prompts.shape[-2] == 0:
            return self._run(("image", 0, 0), {"images": images})[0]
        if prompts.dim() == 3:
            prompts = prompts.unsqueeze(0).expand(batch, -1, -1, -1)
        width = self.backbone.vision_width
        if prompts.dim() != 4 or prompts.shape[0] != batch or prompts.shape[-1] != width:
            raise PromptConfigError(
                f"visual prompts must be (K, P, {width}) or ({batch}, K, P, {width}), got {tuple(prompts.shape)}")
        depth, tokens = int(prompts.shape[1]), int(prompts.shape[2])
        if depth > self.backbone.vision_layers:
            raise PromptConfigError(f"visual prompts have depth {depth} but the image tower has "
                                    f"{self.backbone.vision_layers} layers")
        return self._run(("image", depth, tokens), {"images": images, "prompts": prompts})[0]

    def _digest(self, model: FusionModel) -> str:
        if model not in self._digests:
            self._digests[model] = weights_digest(model)
        return self._digests[model]

    def fusion_graph(self, task: str, model: FusionModel) -> GraphInfo | None:
        """The exported fusion graph of `task` if it was exported from exactly these weights."""
        graph = self._catalogue.pick(("fusion", task), self.options.variant)
        if graph is None or graph.info.task_digest != self._digest(model):
            return None
        return graph.info

    @torch.inference_mode()
    def fuse(self, task: str, model: FusionModel, images: torch.Tensor, psi: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion logits (B, C) and routing scores (B, K, k): the task's graph, else torch prompts + image graph."""
        if self.fusion_graph(task, model) is not None:
            logits, routing = self._run(("fusion", task), {"images": images, "psi": psi})
            return logits, routing
        embeds = self._torch_encoder.embed(images) if model.uses_image_summary else None
        prompts, routing = model.prompts(psi, embeds)
        return model.logits(self.encode(images, prompts), psi), routing

    def describe(self) -> dict:
        """Providers, threads, variant and the graphs found (for /tasks-style reporting and the benchmark)."""
        return {"providers": self.providers, "intra_op_threads": self.threads, "variant": self.options.variant,
                "spinning": self.options.spinning, "onnx_dir": str(self.onnx_dir),
                "graphs": sorted(g.file for g in self.graphs)}
