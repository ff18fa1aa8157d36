"""The shipped default under models/: the backbone and registry load as the server loads them, every style is
servable, and the held-out examples still get the answers recorded when they were shipped (in process and over
HTTP with no MMSERVE_* variable set, i.e. the README's serve command)."""

from __future__ import annotations

import json
import os
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from mmserve.backbone import EMBEDDED_MODEL, BackboneSpec, load_backbone
from mmserve.bench import bentoml_server
from mmserve.config import ServeConfig
from mmserve.engine import ClassifyRequest, FuseRequest, InferenceEngine
from mmserve.images import ImageDecoder, preprocess_config, preprocess_from_config

MODELS = Path(__file__).resolve().parents[2] / "models"
EXAMPLES = MODELS / "examples"
pytestmark = pytest.mark.skipif(not (MODELS / "registry" / "manifest.json").is_file(),
                                reason="nothing shipped under models/ yet (mmserve-train ship)")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((EXAMPLES / "expected.json").read_text())


def _same_answer(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert abs(got["score"] - want["score"]) < 1e-4
    if "top_k" in want:
        assert [p["label"] for p in got["top_k"]] == [p["label"] for p in want["top_k"]]


def test_readme_shows_the_answers_the_shipped_examples_get(expected: dict) -> None:
    """The README's curl examples on models/examples/ are the recorded answers, so a re-ship cannot leave them stale."""
    lines = (MODELS.parent / "README.md").read_text().splitlines()
    shown = [(cmd, json.loads(reply.replace("[...]", "null"))) for cmd, reply in pairwise(lines)
             if cmd.startswith("$ curl -F image=@models/examples/")]
    assert len(shown) >= 2
    for cmd, reply in shown:
        want = expected["fuse"]["answer"] if "/fuse" in cmd else expected["classify"][reply["task"]]["answer"]
        if "/classify" in cmd:
            assert f"image=@models/examples/{expected['classify'][reply['task']]['file']} " in cmd
        else:
            fuse = expected["fuse"]
            assert f"image=@models/examples/{fuse['file']} -F 'text={fuse['text']}' " in cmd and fuse["task"] in cmd
        assert reply["registry_version"] == want["registry_version"]
        _same_answer(reply, want)


def test_default_config_points_at_the_shipped_files() -> None:
    cfg = ServeConfig.from_env({})
    assert cfg.registry == MODELS / "registry"
    assert Path(cfg.backbone_pretrained) == MODELS / "backbone" / f"{EMBEDDED_MODEL}.safetensors"


def test_shipped_examples_give_the_recorded_answers(expected: dict) -> None:
    backbone = load_backbone(BackboneSpec(EMBEDDED_MODEL, str(MODELS / "backbone" / f"{EMBEDDED_MODEL}.safetensors")))
    engine = InferenceEngine(backbone, MODELS / "registry", "torch")
    assert set(expected["classify"]) <= set(engine.snapshot.names("classify"))
    decode = ImageDecoder(preprocess_from_config(preprocess_config(backbone)))
    for style, rec in expected["classify"].items():
        out = engine.classify_requests([ClassifyRequest(decode((EXAMPLES / rec["file"]).read_bytes()), style, 3)])[0]
        assert out.ok, out.error
        _same_answer(out.result, rec["answer"])
    fuse = expected.get("fuse")
    if fuse:
        img = decode((EXAMPLES / fuse["file"]).read_bytes())
        out = engine.fuse_requests([FuseRequest(img, fuse["text"], fuse["task"])])[0]
        assert out.ok, out.error
        _same_answer(out.result, fuse["answer"])


def test_serve_command_with_no_variables_classifies_every_style(expected: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true", OMP_NUM_THREADS="1")
    with bentoml_server(env, tmp_path / "server.log", ready_timeout=180) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        tasks = {t["name"] for t in client.get("/tasks").json()["tasks"]}
        assert set(expected["classify"]) <= tasks
        for style, rec in expected["classify"].items():
            files = {"image": (rec["file"], (EXAMPLES / rec["file"]).read_bytes(), "image/png")}
            resp = client.post("/classify", params={"task": style, "top_k": 3}, files=files)
            assert resp.status_code == 200, resp.text
            _same_answer(resp.json(), rec["answer"])
        fuse = expected.get("fuse")
        if fuse:
            files = {"image": (fuse["file"], (EXAMPLES / fuse["file"]).read_bytes(), "image/png")}
            resp = client.post("/fuse", params={"task": fuse["task"]}, data={"text": fuse["text"]}, files=files)
            assert resp.status_code == 200, resp.text
            _same_answer(resp.json(), fuse["answer"])
