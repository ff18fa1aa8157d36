"""The inference engine in-process: trained labels, one forward pass for mixed tasks, snapshots and hot reload."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _registry_fixture import (
    ANIMALS,
    COLORS,
    Registries,
    brightness_image,
    color_image,
    fusion_sample,
    warmth_image,
)
from PIL import Image

from mmserve import config as config_mod
from mmserve.answers import FuseResult, Prediction
from mmserve.backbone import EMBEDDED_MODEL, Backbone
from mmserve.config import ConfigError, ServeConfig
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.errors import RegistryError, RuntimeUnavailableError, UnknownTaskError, WrongTaskKindError
from mmserve.images import preprocess_from_config
from mmserve.registry import MANIFEST, content_version
from mmserve.runtime import make_runtime
from mmserve.serving.statuses import outcome_status, status_for

MAKERS = {"colors": color_image, "warmth": warmth_image, "brightness": brightness_image}


@pytest.fixture(scope="module")
def engine(tiny_backbone: Backbone, demo_registries: Registries) -> InferenceEngine:
    return InferenceEngine(tiny_backbone, demo_registries.v1)


def labelled(tiny_backbone: Backbone, task: str, seed: int, per_class: int = 3) -> tuple[torch.Tensor, list[str]]:
    """Fresh synthetic images of every class of `task` (never seen in training) and their labels."""
    rng = np.random.default_rng(seed)
    classes = {"colors": list(COLORS), "warmth": ["warm", "cool"], "brightness": ["dark", "light"]}[task]
    labels = [c for c in classes for _ in range(per_class)]
    return torch.stack([tiny_backbone.preprocess(MAKERS[task](c, rng)) for c in labels]), labels


def test_trained_registry_predicts_every_class(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    for task in MAKERS:
        images, labels = labelled(tiny_backbone, task, seed=1000)
        results = engine.classify(images, [task] * len(labels), top_k=2)
        assert [r.label for r in results] == labels, task
        for r in results:
            assert r.task == task and r.registry_version == engine.snapshot.version
            assert len(r.top_k) == 2 and r.top_k[0].label == r.label and r.score == r.top_k[0].score
            assert r.top_k[0].score >= r.top_k[1].score and r.score > 0.5


def test_fusion_tasks_use_image_and_text(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    data = fusion_sample(np.random.default_rng(1234), 8)
    images = torch.stack([tiny_backbone.preprocess(d[0]) for d in data])
    tags = engine.fuse(images, [d[1] for d in data], "tags")
    assert [{p.label for p in r.labels} for r in tags] == [{d[2], d[3]} for d in data]
    assert all(r.head == "multilabel" and r.threshold == 0.5 and len(r.scores) == 5 for r in tags)
    pets = engine.fuse(images, [d[1] for d in data], "pet")
    assert [r.labels[0].label for r in pets] == [d[3] for d in data]
    assert pets[0].to_dict()["label"] in ANIMALS and "labels" not in pets[0].to_dict()
    assert "label" not in tags[0].to_dict() and tags[0].to_dict()["labels"]


def test_mixed_task_batch_is_one_pass_per_prompt_shape_and_matches_single_task(
        engine: InferenceEngine, tiny_backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs, tasks = [], []
    for task in ("colors", "warmth", "brightness"):
        x, labels = labelled(tiny_backbone, task, seed=7, per_class=2)
        imgs.append(x)
        tasks += [task] * len(labels)
    order = np.random.default_rng(0).permutation(len(tasks))  # interleave the tasks in the batch
    images = torch.cat(imgs)[torch.as_tensor(order)]
    tasks = [tasks[i] for i in order]
    alone = [engine.classify(images[i:i + 1], [t])[0] for i, t in enumerate(tasks)]

    calls: list[tuple[int, tuple | None]] = []
    encode = engine.runtime.encode

    def counting(images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        calls.append((images.shape[0], None if prompts is None else tuple(prompts.shape)))
        return encode(images, prompts)

    monkeypatch.setattr(engine.runtime, "encode", counting)
    mixed = engine.classify(images, tasks)
    # colors + warmth share one group prompt + task prompt (4 tokens): one pass; brightness has 2 tokens: another
    assert sorted(calls) == [(4, (4, 2, 2, 64)), (10, (10, 2, 4, 64))]
    calls.clear()
    same_shape = [i for i, t in enumerate(tasks) if t != "brightness"]
    engine.classify(images[same_shape], [tasks[i] for i in same_shape])
    assert len(calls) == 1, "tasks with one prompt shape must share a single forward pass"
    for a, m in zip(alone, mixed, strict=True):
        assert a.label == m.label and a.task == m.task
        assert m.score == pytest.approx(a.score, abs=1e-5)


def test_class_text_features_are_computed_once_at_load(engine: InferenceEngine, tiny_backbone: Backbone,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_text_tower(*args, **kwargs):
        raise AssertionError("the text tower ran during a request")

    monkeypatch.setattr(engine.text_encoder, "forward", no_text_tower)
    images, labels = labelled(tiny_backbone, "colors", seed=5, per_class=1)
    assert [r.label for r in engine.classify(images, ["colors"] * 3)] == labels
    feats = engine.snapshot.classify["colors"].text_features
    assert feats.shape == (3, tiny_backbone.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_multilabel_threshold_is_applied_as_stored() -> None:
    scores = (Prediction("a", 0.6), Prediction("b", 0.3), Prediction("c", 0.05))

    def labels(threshold: float | None) -> list[str]:
        return [p.label for p in FuseResult("t", "multilabel", scores, "v1", threshold).labels]

    assert labels(0.0) == ["a", "b", "c"]  # a threshold of 0 is a threshold, not "unset"
    assert labels(0.5) == ["a"] and labels(None) == ["a"] and labels(0.2) == ["a", "b"]
    assert FuseResult("t", "multiclass", scores, "v1").labels == scores[:1]


def test_unknown_and_wrong_kind_tasks_are_refused(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    image = labelled(tiny_backbone, "colors", seed=3, per_class=1)[0][:1]
    with pytest.raises(UnknownTaskError) as err:
        engine.classify(image, ["nope"])
    assert status_for(err.value) == 404 and err.value.details["known_tasks"] == ["colors", "warmth", "brightness"]
    with pytest.raises(WrongTaskKindError, match="POST /fuse"):
        engine.classify(image, ["tags"])
    with pytest.raises(WrongTaskKindError, match="POST /classify"):
        engine.fuse(image, ["a cat"], "colors")


def test_a_bad_request_fails_alone_in_its_batch(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    images, labels = labelled(tiny_backbone, "colors", seed=11, per_class=1)
    good = [ClassifyRequest(images[i].numpy(), "colors", 1) for i in range(3)]
    batch = [good[0], ClassifyRequest(images[0], "nope"), good[1], ClassifyRequest(images[0], "pet"),
             ClassifyRequest(torch.zeros(3, 5, 5), "colors"), good[2]]
    out = engine.classify_requests(batch)
    assert [outcome_status(o) for o in out] == [200, 404, 200, 400, 400, 200]
    assert [out[i].result["label"] for i in (0, 2, 5)] == labels
    assert out[1].details["known_tasks"] and "(3, 32, 32)" in out[4].error
    data = fusion_sample(np.random.default_rng(5), 2)
    pixels = [tiny_backbone.preprocess(d[0]) for d in data]
    fused = engine.fuse_requests([FuseRequest(pixels[0], data[0][1], "tags"), FuseRequest(pixels[1], " ", "tags"),
                                  FuseRequest(pixels[1], data[1][1], "pet"), FuseRequest(pixels[1], "x", "colors")])
    assert [outcome_status(o) for o in fused] == [200, 400, 200, 400]
    assert {p["label"] for p in fused[0].result["labels"]} == {data[0][2], data[0][3]}
    assert fused[2].result["label"] == data[1][3]


def test_reload_swaps_atomically_and_in_flight_snapshots_finish_on_their_version(
        tiny_backbone: Backbone, demo_registries: Registries, tmp_path: Path) -> None:
    engine = InferenceEngine(tiny_backbone, demo_registries.v1)
    images, _ = labelled(tiny_backbone, "colors", seed=21, per_class=1)  # red, green, blue
    old = engine.snapshot
    result = engine.reload(demo_registries.v2)
    assert result.changed and result.previous_version == old.version and engine.snapshot.version == result.version
    assert [r.label for r in engine.classify(images, ["colors"] * 3)] == ["crimson", "lime", "navy"]
    # a request that took the old snapshot before the swap still answers on it
    assert [r.label for r in engine.classify(images, ["colors"] * 3, snapshot=old)] == ["red", "green", "blue"]
    assert engine.reload().version == result.version and not engine.reload().changed  # re-read current path

    corrupt = tmp_path / "corrupt"
    shutil.copytree(demo_registries.v1, corrupt)
    weights = next((corrupt / "tasks").glob("colors-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    served = engine.snapshot
    with pytest.raises(RegistryError, match=r"colors-.*sha256"):
        engine.reload(corrupt)
    assert engine.snapshot is served and engine.registry_path == demo_registries.v2

    bad_template = tmp_path / "bad-template"
    shutil.copytree(demo_registries.v1, bad_template)
    manifest = json.loads((bad_template / MANIFEST).read_text())
    manifest["tasks"][0]["template"] = "a photo without a placeholder"
    manifest["version"] = content_version(manifest)  # consistent, so the template check is what refuses it
    (bad_template / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"manifest.json: tasks\[colors\]: .*placeholder"):
        engine.reload(bad_template)
    assert engine.snapshot is served


def test_reload_while_classifying_never_mixes_versions(tiny_backbone: Backbone, demo_registries: Registries) -> None:
    engine = InferenceEngine(tiny_backbone, demo_registries.v1)
    images, _ = labelled(tiny_backbone, "colors", seed=31, per_class=1)
    expected = {}
    v1, v2 = demo_registries.v1, demo_registries.v2
    for path, names in ((v2, ["crimson", "lime", "navy"]), (v1, ["red", "green", "blue"])):
        expected[engine.reload(path).version] = names
    seen: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        try:
            while not stop.is_set():
                out = engine.classify(images, ["colors"] * 3)
                seen.append((out[0].registry_version, [r.label for r in out]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    deadline = time.monotonic() + 60
    reloads = 0
    while reloads < 3 or ({v for v, _ in seen} != set(expected) and time.monotonic() < deadline):
        engine.reload((v2, v1)[reloads % 2])  # until traffic has run under both versions
        reloads += 1
    stop.set()
    thread.join()
    assert not errors and {version for version, _ in seen} == set(expected)
    assert all(labels == expected[version] for version, labels in seen)


def test_runtime_is_pluggable(tiny_backbone: Backbone, demo_registries: Registries, tmp_path, monkeypatch) -> None:
    assert make_runtime("torch", tiny_backbone).name == "torch"
    monkeypatch.setenv("MMSERVE_ONNX_DIR", str(tmp_path / "onnx"))  # graphs are exported there on first use
    assert make_runtime("onnx", tiny_backbone).name == "onnx"  # parity with torch: tests/mmserve/test_onnx.py
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime"):
        make_runtime("tensorrt", tiny_backbone)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    with pytest.raises(RuntimeUnavailableError, match="needs onnxruntime"):  # refused before loading anything
        InferenceEngine.from_config(ServeConfig(registry=demo_registries.v1, runtime="onnx"))


def test_preprocess_rebuilt_from_config_matches_the_backbone(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    rebuilt = preprocess_from_config(json.loads(json.dumps(engine.describe()["preprocess"])))
    assert torch.equal(rebuilt(img), tiny_backbone.preprocess(img))


def test_config_from_env(tmp_path: Path) -> None:
    cfg = ServeConfig.from_env({})
    assert cfg.registry.parts[-2:] == ("models", "registry") and cfg.runtime == "torch" and cfg.device == "cpu"
    assert cfg.backbone_pretrained.endswith("models/backbone/mmserve-vit-p12-96.safetensors")
    assert cfg.max_body_bytes == 10 * 1024 * 1024
    cfg = ServeConfig.from_env({"MMSERVE_REGISTRY": str(tmp_path), "MMSERVE_BACKBONE_PRETRAINED": "none",
                                "MMSERVE_DEVICE": "cuda:1", "MMSERVE_MAX_BATCH_SIZE": "8"})
    assert cfg.registry == tmp_path and cfg.backbone_pretrained is None and cfg.max_batch_size == 8
    assert cfg.backbone_spec().device == "cuda:1"
    for env, match in (({"MMSERVE_DEVICE": "tpu"}, "MMSERVE_DEVICE"), ({"MMSERVE_RUNTIME": "tf"}, "MMSERVE_RUNTIME"),
                       ({"MMSERVE_MAX_BATCH_SIZE": "1"}, "MMSERVE_MAX_BATCH_SIZE=1: must be >= 2"),
                       ({"MMSERVE_MAX_BODY_BYTES": "10MB"}, "MMSERVE_MAX_BODY_BYTES='10MB': expected an integer")):
        with pytest.raises(ConfigError, match=match):
            ServeConfig.from_env(env)


def test_config_rejects_malformed_cuda_devices() -> None:
    for device in ("cuda:abc", "cuda:", "cuda:1x", "cuda:-1", "cpu:0", "cudax"):
        with pytest.raises(ConfigError, match=f"MMSERVE_DEVICE={device!r}: expected cpu, cuda or cuda:N"):
            ServeConfig.from_env({"MMSERVE_DEVICE": device})
    for device, read in (("cuda", "cuda"), (" CUDA:0 ", "cuda:0"), ("cuda:12", "cuda:12"), ("CPU", "cpu")):
        assert ServeConfig.from_env({"MMSERVE_DEVICE": device}).device == read


def test_backbone_checkpoint_defaults_to_the_named_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "project_root", lambda: tmp_path)
    embedded = ServeConfig.from_env({})
    assert embedded.backbone_pretrained == str(tmp_path / "models" / "backbone" / f"{EMBEDDED_MODEL}.safetensors")
    with pytest.raises(ConfigError, match="MMSERVE_BACKBONE_MODEL='ViT-B-32' without MMSERVE_BACKBONE_PRETRAINED"):
        ServeConfig.from_env({"MMSERVE_BACKBONE_MODEL": "ViT-B-32"})
    tagged = ServeConfig.from_env({"MMSERVE_BACKBONE_MODEL": "ViT-B-32", "MMSERVE_BACKBONE_PRETRAINED": "openai"})
    assert tagged.backbone_pretrained == "openai"
    checkpoint = tmp_path / "models" / "backbone" / "ViT-B-32.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    cfg = ServeConfig.from_env({"MMSERVE_BACKBONE_MODEL": "ViT-B-32"})
    assert cfg.backbone_model == "ViT-B-32" and cfg.backbone_pretrained == str(checkpoint)


def test_admin_token_must_be_sendable_in_a_header() -> None:
    assert ServeConfig.from_env({}).admin_token is None and ServeConfig.from_env({"MMSERVE_ADMIN_TOKEN": ""}) \
        .admin_token is None
    assert ServeConfig.from_env({"MMSERVE_ADMIN_TOKEN": "s3cr3t-TOKEN_1"}).admin_token == "s3cr3t-TOKEN_1"
    for token in ("   ", "pass word", "mot-de-passé", "tab\there"):  # never matchable: refused at start
        with pytest.raises(ConfigError, match="MMSERVE_ADMIN_TOKEN: use printable ASCII without spaces"):
            ServeConfig.from_env({"MMSERVE_ADMIN_TOKEN": token})
