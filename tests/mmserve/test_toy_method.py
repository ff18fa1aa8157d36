"""A prompt method defined in this file alone: registered, then trained, saved, loaded, served over HTTP and
exported to ONNX through the project's own commands, with no other file knowing it.

The toy is the simplest two-tower method there is: independent deep prompts in both towers (IVLP-style), one
(K, b, d) block per tower. The shared test server imports it through MMSERVE_METHODS (tests/_server_fixture.py),
as a user's server would import their own method.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from mmserve.backbone import TINY_MODEL
from mmserve.prompts import TowerPrompts, register_method, resolve_depth


@dataclass
class ToyConfig:
    """Independent deep prompts of n_tokens per layer in both towers."""

    n_tokens: int = 2
    depth: int | None = None
    init_std: float = 0.02
    type: str = "toy"

    def to_dict(self) -> dict:
        """Plain dict for the registry manifest."""
        return asdict(self)


class ToyPrompt(nn.Module):
    """A (K, b, d_l) text block and a (K, b, d_v) visual block, unrelated to each other."""

    def __init__(self, config: ToyConfig, text_width: int, vision_width: int, text_layers: int, vision_layers: int):
        super().__init__()
        self.config = config
        depth = resolve_depth(config.depth, text_layers, vision_layers)
        self.text = nn.Parameter(torch.randn(depth, config.n_tokens, text_width) * config.init_std)
        self.vision = nn.Parameter(torch.randn(depth, config.n_tokens, vision_width) * config.init_std)

    def forward(self) -> TowerPrompts:
        """Both towers' prompts."""
        return TowerPrompts(text=self.text, vision=self.vision)


register_method("toy", ToyConfig, ToyPrompt, summary="independent deep prompts in both towers (test only)")

TINY_ARGS = ["--model", TINY_MODEL, "--pretrained", "none"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`mmserve-train classify --prompt toy` on two synthetic colour tasks (the CLI reads the method table)."""
    from training.cli import main
    from training.synthetic import write_image_task

    base = tmp_path_factory.mktemp("toy")
    for i, task in enumerate(("clipart", "sketch")):
        write_image_task(base / "data", task, {"red": "red", "blue": "blue"}, 12, seed=i)
    code = main(["classify", "--root", str(base / "data"), "--run-dir", str(base / "run"), *TINY_ARGS,
                 "--prompt", "toy", "--sharing", "task", "--n-tokens", "3", "--grouping", "all", "--epochs", "15",
                 "--lr", "0.1", "--batch-size", "8", "--shots", "8", "--test-fraction", "0.3",
                 "--schedule", "constant", "--weight-decay", "0", "--no-progress"])
    assert code == 0
    return base / "run"


def test_trained_and_saved_with_its_own_config(run: Path) -> None:
    """The run trained the toy (n_tokens from --n-tokens) and beat zero-shot; the manifest names the method."""
    metrics = json.loads((run / "metrics.json").read_text())["final"]
    assert metrics["accuracy_mean"] >= 0.75 > metrics["zero_shot_accuracy_mean"]
    manifest = json.loads((run / "registry" / "manifest.json").read_text())
    assert {t["prompt_config"]["type"] for t in manifest["tasks"]} == {"toy"}
    assert all(t["prompt_config"]["n_tokens"] == 3 for t in manifest["tasks"])


def test_loaded_through_the_table(run: Path, tiny_backbone) -> None:
    """load_registry checks every tensor against a ToyPrompt; the loaded prompts are the trained ones."""
    from mmserve.builders import load_classify_prompts, load_registry

    registry = load_registry(run / "registry", tiny_backbone)
    prompts = load_classify_prompts(registry, "clipart", tiny_backbone)
    assert isinstance(prompts.task, ToyPrompt)
    assert torch.equal(prompts().vision, registry.task_weights["clipart"]["vision"])
    assert prompts().text.shape == (tiny_backbone.text_layers, 3, tiny_backbone.text_width)


def test_served_over_http(run: Path, server, tmp_path: Path) -> None:
    """The shared test server (started with MMSERVE_METHODS naming this file) reloads the toy registry and
    classifies with its prompts; then it goes back to the registry it served."""
    from training.synthetic import write_image_task

    write_image_task(tmp_path / "img", "probe", {"red": "red", "blue": "blue"}, 3, seed=5)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        swap = client.post("/admin/reload", json={"path": str(run / "registry")})
        assert swap.status_code == 200, swap.text
        try:
            tasks = client.get("/tasks").json()["tasks"]
            assert sorted(t["name"] for t in tasks) == ["clipart", "sketch"]
            right = 0
            for colour in ("red", "blue"):
                for image in sorted((tmp_path / "img" / "probe" / colour).iterdir()):
                    resp = client.post("/classify", params={"task": "clipart"},
                                       files={"image": (image.name, image.read_bytes(), "image/png")})
                    assert resp.status_code == 200, resp.text
                    right += resp.json()["label"] == colour
            assert right >= 5  # of 6: the trained prompts, not chance
        finally:
            assert client.post("/admin/reload", json={"path": str(server.registries.v1)}).status_code == 200


def test_exported_to_onnx_and_matches_torch(run: Path, tmp_path: Path, tiny_backbone, monkeypatch) -> None:
    """`mmserve export-onnx --registry` writes the toy's graph; the onnx engine answers as the torch one does."""
    from mmserve.cli import main
    from mmserve.engine import InferenceEngine

    out = tmp_path / "onnx"
    assert main(["export-onnx", *TINY_ARGS, "--registry", str(run / "registry"), "--out", str(out),
                 "--exporter", "legacy", "--no-unprompted"]) == 0  # the faster exporter; the dynamo one: test_onnx
    shapes = {(s["depth"], s["prompt_tokens"]) for s in map(json.loads, map(Path.read_text, out.glob("*.json")))}
    assert (tiny_backbone.vision_layers, 3) in shapes
    monkeypatch.setenv("MMSERVE_ONNX_DIR", str(out))
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size,
                         generator=torch.Generator().manual_seed(0))
    tasks = ["clipart", "sketch", "sketch", "clipart"]
    answers = {}
    for runtime in ("torch", "onnx"):
        engine = InferenceEngine(tiny_backbone, run / "registry", runtime)
        answers[runtime] = [[p.score for p in r.top_k] for r in engine.classify(images, tasks, top_k=2)]
    assert torch.allclose(torch.tensor(answers["onnx"]), torch.tensor(answers["torch"]), atol=1e-4)
