"""Graphs on disk: file names, variants, the JSON sidecar next to each graph, and finding the graph for a key.

Graphs and their sidecars, in one directory (default `models/onnx/`, or MMSERVE_ONNX_DIR):

    image-k{K}-p{P}.{variant}.onnx  inputs images (B, 3, S, S), prompts (B, K, P, d_v) -> features (B, E), normalised
    image-k0-p0.{variant}.onnx      the unprompted tower (open_clip's encode_image, normalised): images -> features
    fuse-{task}.{variant}.onnx      one fusion task, prompts + tower + head: images, psi (B, d_psi) -> logits, routing
    <graph>.json                    sidecar: backbone fingerprint, K, P, shapes, sha256 of the graph, parity

A runtime looks a graph up by key, ("image", K, P) or ("fusion", task), and variant; it refuses any graph whose
sidecar names another backbone fingerprint.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmserve.errors import MmserveError
from mmserve.fileio import atomic_write_bytes, sha256_file
from mmserve.strict import from_dict

if TYPE_CHECKING:
    from mmserve.backbone import Backbone

SIDECAR_FORMAT = 1
VARIANTS = ("fp32", "opt", "int8")
DEFAULT_OPSET = 18
EXPORT_BATCH = 2  # >= 2: a batch-1 example lets the exporter specialise the batch axis to 1
ENV_DIR = "MMSERVE_ONNX_DIR"


class OnnxGraphError(MmserveError):
    """An exported graph cannot be used: wrong backbone, wrong prompt shape, corrupt or missing file."""


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
        info = from_dict(cls, data, str(path), OnnxGraphError)
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


def default_onnx_dir() -> Path:
    """MMSERVE_ONNX_DIR, else models/onnx next to the package (the repository or a built bento), else ./models/onnx."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    root = Path(__file__).resolve().parents[2]  # above mmserve/onnx/
    return (root if (root / "models").is_dir() else Path.cwd()) / "models" / "onnx"


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


@dataclass(frozen=True)
class Graph:
    """A graph's sidecar and the directory it lives in."""

    info: GraphInfo
    directory: Path


class Catalogue:
    """The graphs a runtime may use, by key and variant."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, dict[str, Graph]] = {}

    def scan(self, directory: Path, backbone: Backbone) -> None:
        """Index the sidecars of `directory`, refusing any graph exported from another backbone."""
        for info in read_sidecars(directory):
            check_graph(info, directory, backbone, verify_hash=False)  # fingerprint: refuse at start
            self.add(info, directory)

    def add(self, info: GraphInfo, directory: Path) -> None:
        """Index one graph (a later one of the same key and variant replaces the earlier)."""
        self._by_key.setdefault(info.key, {})[info.variant] = Graph(info, directory)

    @property
    def graphs(self) -> list[GraphInfo]:
        """Every graph indexed."""
        return [g.info for by_variant in self._by_key.values() for g in by_variant.values()]

    def image_shapes(self) -> list[tuple[int, int]]:
        """The (K, P) of every image graph, sorted."""
        return sorted({(g.depth, g.prompt_tokens) for g in self.graphs if g.kind == "image"})

    def pick(self, key: tuple, variant: str) -> Graph | None:
        """The graph for `key` in `variant`; "auto" is opt when exported, else fp32 (int8 only when asked for)."""
        by_variant = self._by_key.get(key, {})
        if variant == "auto":
            return by_variant.get("opt") or by_variant.get("fp32")
        return by_variant.get(variant)
