"""ONNX export and the onnxruntime runtime: parity with torch on the tiny backbone, dynamic batch, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.builders import classify_prompt_module, fusion_module, load_classify_prompts, load_fusion, load_registry
from mmserve.complementary import ClipTextComplement
from mmserve.encoders import PromptedImageEncoder
from mmserve.engine import InferenceEngine
from mmserve.errors import PromptConfigError
from mmserve.onnx.catalogue import GraphInfo, OnnxGraphError, read_sidecars, sidecar_name
from mmserve.onnx.export import ExportOptions, OnnxExportError, export_all, export_image_graph
from mmserve.onnx.runtime import OnnxImageRuntime, OnnxOptions, physical_cores, select_providers
from mmserve.prompts import MmAPConfig, count_params
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import (
    BackboneRef,
    GroupEntry,
    Manifest,
    RegistryError,
    TaskEntry,
    save_registry,
)

MMAP = MmAPConfig(n_tokens=2, source_rows=1, source_cols=8).to_dict()  # group 2 + task 2 = P 4, K 2 (every layer)
MOPE = MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=16).to_dict()  # P = 2 + 2 + 1 = 5
TOL = 1e-4


def _build_registry(root: Path, backbone) -> Path:
    torch.manual_seed(0)
    group = classify_prompt_module(MMAP, backbone)
    tasks = {n: classify_prompt_module(MMAP, backbone) for n in ("clipart", "photo", "sketch")}
    comp = ClipTextComplement(backbone)
    fuse = TaskEntry(name="pairs", kind="fuse", classes=["x", "y", "z"], prompt_config=MOPE, trainable_params=0,
                     head="multiclass", complementary=comp.spec, psi_dim=comp.dim)
    fusion = fusion_module(fuse, backbone)
    fuse.trainable_params = count_params(fusion)
    classes = ["cat", "dog", "bird", "fish", "tree"]
    manifest = Manifest(
        backbone=BackboneRef(backbone.spec.model, backbone.fingerprint),
        groups=[GroupEntry("animals", list(tasks), MMAP, count_params(group))],
        tasks=[TaskEntry(n, "classify", classes, MMAP, count_params(m), group="animals") for n, m in tasks.items()]
        + [fuse],
    )
    save_registry(root, manifest, {"animals": group.state_dict()},
                  {**{n: m.state_dict() for n, m in tasks.items()}, "pairs": fusion.state_dict()})
    return root


@pytest.fixture(scope="module")
def registry_dir(tiny_backbone, tmp_path_factory) -> Path:
    return _build_registry(tmp_path_factory.mktemp("registry"), tiny_backbone)


@pytest.fixture(scope="module")
def onnx_dir(tiny_backbone, registry_dir, tmp_path_factory) -> Path:
    """Every graph the registry needs, in all three variants (dynamo exporter, the default)."""
    out = tmp_path_factory.mktemp("onnx")
    export_all(tiny_backbone, out, load_registry(registry_dir, tiny_backbone),
               options=ExportOptions(optimize=True, int8=True))
    return out


def _runtime(backbone, onnx_dir: Path, variant: str = "fp32", **kw) -> OnnxImageRuntime:
    return OnnxImageRuntime(backbone, OnnxOptions(onnx_dir=onnx_dir, variant=variant, export_missing=False, **kw))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _task_prompts(registry_dir: Path, backbone) -> dict[str, torch.Tensor]:
    registry = load_registry(registry_dir, backbone)
    with torch.no_grad():
        return {n: load_classify_prompts(registry, n, backbone)().vision for n in ("clipart", "photo", "sketch")}


def test_export_writes_checked_graphs_and_sidecars(onnx_dir: Path, tiny_backbone) -> None:
    infos = {(g.kind, g.depth, g.prompt_tokens, g.task, g.variant): g for g in read_sidecars(onnx_dir)}
    for variant in ("fp32", "opt", "int8"):
        assert ("image", 2, 4, None, variant) in infos  # MmAP group + task
        assert ("image", 2, 5, None, variant) in infos  # MoPE prompt shape (fallback fusion path)
        assert ("image", 0, 0, None, variant) in infos  # unprompted
        assert ("fusion", 2, 5, "pairs", variant) in infos
    for g in infos.values():
        onnx.checker.check_model(str(onnx_dir / g.file))
        assert g.fingerprint == tiny_backbone.fingerprint and g.export_batch >= 2
        assert all(dims[0] == "batch" for dims in list(g.inputs.values()) + list(g.outputs.values()))
        assert g.parity_max_abs_diff is not None  # measured at export for every variant
        if g.variant != "int8":
            assert g.parity_max_abs_diff <= TOL
    image = infos[("image", 2, 4, None, "opt")]
    assert image.inputs["prompts"] == ["batch", 2, 4, tiny_backbone.vision_width]
    assert image.fused_ops.get("Attention") == tiny_backbone.vision_layers
    assert image.fused_ops.get("SkipLayerNormalization") and image.fused_ops.get("BiasGelu")
    assert infos[("image", 2, 4, None, "int8")].fused_ops.get("QAttention") == tiny_backbone.vision_layers


@pytest.mark.parametrize("variant", ["fp32", "opt"])
def test_mixed_task_batch_features_match_torch(onnx_dir: Path, registry_dir: Path, tiny_backbone, variant) -> None:
    prompts = _task_prompts(registry_dir, tiny_backbone)
    tasks = ["clipart", "photo", "sketch", "photo", "clipart", "sketch", "sketch"]
    per_sample = torch.stack([prompts[t] for t in tasks])  # (B, K, P, d_v): a different task per sample
    images = _images(len(tasks))
    runtime = _runtime(tiny_backbone, onnx_dir, variant)
    with torch.no_grad():
        reference = PromptedImageEncoder(tiny_backbone)(images, per_sample)
    got = runtime.encode(images, per_sample)
    assert (got - reference).abs().max().item() <= TOL
    for name in ("clipart", "sketch"):  # each task alone (shared (K, P, d) prompts) = its rows of the mixed batch
        rows = [i for i, t in enumerate(tasks) if t == name]
        alone = runtime.encode(images[rows], prompts[name])
        assert (alone - got[rows]).abs().max().item() <= TOL


def test_unprompted_graph_matches_encode_image(onnx_dir: Path, tiny_backbone) -> None:
    images = _images(3, 1)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(tiny_backbone.model.encode_image(images), dim=-1)
    assert (_runtime(tiny_backbone, onnx_dir, "opt").encode(images, None) - reference).abs().max().item() <= TOL


def test_dynamic_batch_axis(onnx_dir: Path, registry_dir: Path, tiny_backbone) -> None:
    prompts = _task_prompts(registry_dir, tiny_backbone)["photo"]
    runtime = _runtime(tiny_backbone, onnx_dir, "opt")
    encoder = PromptedImageEncoder(tiny_backbone)
    for batch in (1, 5):  # the graphs were exported at batch 2
        images = _images(batch, batch)
        with torch.no_grad():
            reference = encoder(images, prompts)
        got = runtime.encode(images, prompts)
        assert got.shape == (batch, tiny_backbone.embed_dim)
        assert (got - reference).abs().max().item() <= TOL


def test_engine_on_onnx_gives_identical_top1_labels(onnx_dir: Path, registry_dir: Path, tiny_backbone) -> None:
    torch_engine = InferenceEngine(tiny_backbone, registry_dir, "torch")
    tasks = ["clipart", "photo", "sketch"] * 8
    images = _images(len(tasks), 7)
    expected = torch_engine.classify(images, tasks)
    for variant in ("fp32", "opt"):
        engine = InferenceEngine(tiny_backbone, registry_dir, "torch")
        engine.runtime = _runtime(tiny_backbone, onnx_dir, variant)
        got = engine.classify(images, tasks)
        assert [r.label for r in got] == [r.label for r in expected]
        assert max(abs(a.score - b.score) for a, b in zip(got, expected, strict=True)) < 1e-4


def test_int8_agreement_is_measured_and_sane(onnx_dir: Path, registry_dir: Path, tiny_backbone) -> None:
    prompts = _task_prompts(registry_dir, tiny_backbone)["clipart"]
    images = _images(64, 3)
    fp32 = _runtime(tiny_backbone, onnx_dir, "fp32").encode(images, prompts)
    int8_runtime = _runtime(tiny_backbone, onnx_dir, "int8")
    int8 = int8_runtime.encode(images, prompts)
    assert torch.isfinite(int8).all() and int8.shape == fp32.shape
    # the int8 graph really served the request: the only session opened is the int8 file, quantized ops inside
    (slot,) = int8_runtime._sessions
    session, info = int8_runtime.session(("image", 2, 4))
    assert slot == (("image", 2, 4), "int8") and info.variant == "int8"
    assert Path(session._model_path).resolve() == (onnx_dir / info.file).resolve()
    assert any(n.op_type in ("QAttention", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul")
               for n in onnx.load(str(onnx_dir / info.file)).graph.node)
    assert (int8 - fp32).abs().max().item() > 1e-4  # quantized: not fp32 served under the int8 name
    cosine = (fp32 * int8).sum(-1)  # both normalised
    assert cosine.min().item() > 0.9  # int8 is close to fp32, not equal (random tiny model: no 99% claim here)
    text = torch.nn.functional.normalize(torch.randn(10, tiny_backbone.embed_dim,
                                                     generator=torch.Generator().manual_seed(0)), dim=-1)
    agreement = ((fp32 @ text.T).argmax(-1) == (int8 @ text.T).argmax(-1)).float().mean().item()
    assert agreement >= 0.8


def test_fusion_graph_and_fallback_match_torch(onnx_dir: Path, registry_dir: Path, tiny_backbone) -> None:
    registry = load_registry(registry_dir, tiny_backbone)
    model = load_fusion(registry, "pairs", tiny_backbone)
    runtime = _runtime(tiny_backbone, onnx_dir, "opt")
    images = _images(4, 5)
    psi = ClipTextComplement(tiny_backbone).encode(["a red one", "two dogs", "a tree at night", "fish"])
    encoder = PromptedImageEncoder(tiny_backbone)
    with torch.no_grad():
        reference = model(encoder, images, psi)
    assert runtime.fusion_graph("pairs", model) is not None  # exported from exactly these weights: the fused graph
    logits, routing = runtime.fuse("pairs", model, images, psi)
    assert (logits - reference.logits).abs().max().item() <= TOL
    assert (routing - reference.routing).abs().max().item() <= TOL
    retrained = fusion_module(registry.manifest.task("pairs"), tiny_backbone).eval()  # other weights: fallback
    assert runtime.fusion_graph("pairs", retrained) is None
    with torch.no_grad():
        reference = retrained(encoder, images, psi)
    logits, routing = runtime.fuse("pairs", retrained, images, psi)
    assert (logits - reference.logits).abs().max().item() <= TOL
    assert (routing - reference.routing).abs().max().item() <= TOL


def test_graph_of_another_backbone_is_refused(onnx_dir: Path) -> None:
    other = load_backbone(BackboneSpec(TINY_MODEL, seed=1))  # same architecture, other weights
    with pytest.raises(OnnxGraphError, match="fingerprint|exported from backbone"):
        OnnxImageRuntime(other, OnnxOptions(onnx_dir=onnx_dir))


def test_edited_sidecar_and_corrupt_graph_are_refused(onnx_dir: Path, tiny_backbone, tmp_path: Path) -> None:
    copy_dir = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy_dir)
    sidecar = copy_dir / sidecar_name("image-k2-p4.fp32.onnx")
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "fingerprint": "0" * 32}))
    with pytest.raises(OnnxGraphError, match="mmserve export-onnx"):
        OnnxImageRuntime(tiny_backbone, OnnxOptions(onnx_dir=copy_dir))
    sidecar.write_text(json.dumps(data))
    graph = copy_dir / "image-k2-p4.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    runtime = _runtime(tiny_backbone, copy_dir, "fp32")
    with pytest.raises(OnnxGraphError, match="sha256"):
        runtime.encode(_images(2), torch.zeros(2, 2, 4, tiny_backbone.vision_width))


def test_prompt_shape_without_graph_is_refused_or_exported(onnx_dir: Path, tiny_backbone, tmp_path: Path) -> None:
    runtime = _runtime(tiny_backbone, onnx_dir, "fp32")
    with pytest.raises(OnnxGraphError, match=r"no fp32 ONNX graph .* \(K, P\) = \[.*\(2, 4\)"):
        runtime.encode(_images(2), torch.zeros(2, 1, 3, tiny_backbone.vision_width))
    with pytest.raises(PromptConfigError):
        runtime.encode(_images(2), torch.zeros(2, 2, 4, tiny_backbone.vision_width + 1))
    lazy = OnnxImageRuntime(tiny_backbone, OnnxOptions(onnx_dir=tmp_path / "lazy", variant="fp32",
                                                       export_missing=True))
    prompts = 0.1 * torch.randn(3, 1, 3, tiny_backbone.vision_width)
    images = _images(3)
    with torch.no_grad():
        reference = PromptedImageEncoder(tiny_backbone)(images, prompts)
    assert (lazy.encode(images, prompts) - reference).abs().max().item() <= TOL
    assert (tmp_path / "lazy" / "image-k1-p3.fp32.onnx").is_file()


def test_graphs_exported_to_a_temp_dir_go_with_the_runtime(tiny_backbone, tmp_path: Path, monkeypatch) -> None:
    import gc

    from mmserve.onnx import runtime as onnx_runtime

    monkeypatch.setattr(onnx_runtime.os, "access", lambda *args: False)  # the graph directory is not writable
    lazy = OnnxImageRuntime(tiny_backbone, OnnxOptions(onnx_dir=tmp_path / "read-only", variant="fp32",
                                                       export_missing=True))
    with torch.no_grad():
        reference = tiny_backbone.model.encode_image(_images(2), normalize=True)
    assert (lazy.encode(_images(2), None) - reference).abs().max().item() <= TOL
    export_dir = lazy._export_dir
    assert export_dir is not None and list(export_dir.glob("image-k0-p0.fp32.onnx"))
    assert not list((tmp_path / "read-only").glob("*.onnx"))
    del lazy
    gc.collect()
    assert not export_dir.exists()


def test_legacy_exporter_parity(tiny_backbone, tmp_path: Path) -> None:
    infos = export_image_graph(tiny_backbone, tmp_path, 1, 3, ExportOptions(optimize=False, exporter="legacy"))
    assert [g.variant for g in infos] == ["fp32"] and infos[0].exporter == "legacy"
    prompts = 0.1 * torch.randn(5, 1, 3, tiny_backbone.vision_width)
    images = _images(5, 9)
    with torch.no_grad():
        reference = PromptedImageEncoder(tiny_backbone)(images, prompts)
    got = _runtime(tiny_backbone, tmp_path, "fp32").encode(images, prompts)
    assert (got - reference).abs().max().item() <= TOL


def test_export_rejects_bad_shapes(tiny_backbone, tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError):
        export_image_graph(tiny_backbone, tmp_path, tiny_backbone.vision_layers + 1, 2)
    with pytest.raises(OnnxExportError):
        export_image_graph(tiny_backbone, tmp_path, 0, 2)


def test_sidecar_validation(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(OnnxGraphError, match="format"):
        GraphInfo.load(tmp_path / "x.json")


def test_options_from_the_environment() -> None:
    assert OnnxOptions.from_env({}) == OnnxOptions()  # auto variant, physical cores, no spinning
    opts = OnnxOptions.from_env({"MMSERVE_ONNX_DIR": "/g", "MMSERVE_ONNX_VARIANT": "INT8", "MMSERVE_ONNX_THREADS": "3",
                                 "MMSERVE_ONNX_SPINNING": "1", "MMSERVE_DEVICE": "cpu"})
    assert (opts.onnx_dir, opts.variant, opts.intra_op_threads, opts.spinning, opts.device) == (
        Path("/g"), "int8", 3, True, "cpu")
    assert OnnxOptions.from_env({"MMSERVE_DEVICE": " CPU "}).device == "cpu"  # read as ServeConfig reads it
    for env, name in (({"MMSERVE_ONNX_VARIANT": "fp16"}, "MMSERVE_ONNX_VARIANT"),
                      ({"MMSERVE_ONNX_THREADS": "two"}, "MMSERVE_ONNX_THREADS"),
                      ({"MMSERVE_ONNX_SPINNING": "yes"}, "MMSERVE_ONNX_SPINNING")):
        with pytest.raises(OnnxGraphError, match=name):
            OnnxOptions.from_env(env)


def test_session_settings_and_provider_selection(onnx_dir: Path, tiny_backbone, monkeypatch) -> None:
    runtime = _runtime(tiny_backbone, onnx_dir, "opt")
    assert runtime.threads == physical_cores() >= 1
    so = runtime._session_options()
    import onnxruntime as ort

    assert so.intra_op_num_threads == physical_cores() and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # the server shares its cores
    spinning = _runtime(tiny_backbone, onnx_dir, "opt", spinning=True)._session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_providers() == ["CPUExecutionProvider"]  # a GPU but the CPU-only onnxruntime package
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_providers() == ["CPUExecutionProvider"]


def test_cli_export_onnx(registry_dir: Path, tmp_path: Path, capsys) -> None:
    from mmserve.cli import main

    out = tmp_path / "graphs"
    code = main(["export-onnx", "--out", str(out), "--model", TINY_MODEL, "--pretrained", "none", "--registry",
                 str(registry_dir), "--no-unprompted", "--exporter", "legacy"])
    assert code == 0
    files = sorted(p.name for p in out.glob("*.onnx"))
    assert files == ["fuse-pairs.fp32.onnx", "image-k2-p4.fp32.onnx", "image-k2-p5.fp32.onnx"]
    assert "max|diff| vs torch" in capsys.readouterr().out
    code = main(["export-onnx", "--out", str(out), "--model", TINY_MODEL, "--pretrained", "none", "--seed", "1",
                 "--registry", str(registry_dir)])
    assert code == 2  # the registry was trained on seed 0's weights: a clear error, no stack trace
    assert "fingerprint" in capsys.readouterr().err


def test_runtime_output_is_numpy_free_torch(onnx_dir: Path, tiny_backbone) -> None:
    out = _runtime(tiny_backbone, onnx_dir, "fp32").encode(_images(2), None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert np.allclose(out.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_registry_load_opens_every_session_or_refuses(onnx_dir: Path, registry_dir: Path, tiny_backbone,
                                                      tmp_path: Path, monkeypatch) -> None:
    import mmserve.runtime as runtime_module

    monkeypatch.setitem(runtime_module.RUNTIMES, "onnx", lambda bb: _runtime(bb, onnx_dir, "fp32"))
    engine = InferenceEngine(tiny_backbone, registry_dir, "onnx")
    opened = {key for key, _variant in engine.runtime._sessions}  # before any request
    shapes = {t.prompt_shape for t in engine.snapshot.classify.values()}
    assert {("image", k, p) for k, p in shapes} | {("fusion", "pairs")} <= opened
    # no graph for the registry's prompt shapes and no export allowed: the load fails as a registry error
    empty = tmp_path / "no-graphs"
    empty.mkdir()
    monkeypatch.setitem(runtime_module.RUNTIMES, "onnx", lambda bb: _runtime(bb, empty, "fp32"))
    with pytest.raises(RegistryError, match="runtime onnx: no fp32 ONNX graph"):
        InferenceEngine(tiny_backbone, registry_dir, "onnx")


def test_fusion_graph_of_the_paper_head_matches_torch(tiny_backbone, tmp_path: Path) -> None:
    """head_input 'image' (the head reads no psi): the exported graph and the fallback path still match torch."""
    from mmserve.onnx.export import export_fusion_graph

    torch.manual_seed(1)
    cfg = MoPEConfig.from_dict({**MOPE, "head_input": "image"})
    entry = TaskEntry(name="paper", kind="fuse", classes=["x", "y", "z"], prompt_config=cfg.to_dict(),
                      trainable_params=0, head="multiclass", complementary={"kind": "clip_text"},
                      psi_dim=tiny_backbone.embed_dim)
    model = fusion_module(entry, tiny_backbone).eval()
    assert model.head.in_features == tiny_backbone.embed_dim
    export_fusion_graph(tiny_backbone, tmp_path, "paper", model, ExportOptions(optimize=False))
    runtime = _runtime(tiny_backbone, tmp_path)
    images = _images(3, 7)
    psi = ClipTextComplement(tiny_backbone).encode(["a red one", "two dogs", "fish"])
    with torch.no_grad():
        reference = model(PromptedImageEncoder(tiny_backbone), images, psi)
    assert runtime.fusion_graph("paper", model) is not None
    logits, routing = runtime.fuse("paper", model, images, psi)
    assert (logits - reference.logits).abs().max().item() <= TOL
    assert (routing - reference.routing).abs().max().item() <= TOL
