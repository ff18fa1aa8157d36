"""Embeddings in process: open_clip parity without a task, a task's prompts with one, batches of mixed requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _registry_fixture import Registries, color_image

from mmserve.backbone import Backbone
from mmserve.embed import EmbedRequest, classify_entry, embed_requests, embed_texts
from mmserve.engine import InferenceEngine
from mmserve.errors import UnknownTaskError, WrongTaskKindError

TEXTS = ["a photo of a red square.", "a cat", "x" * 400]  # the last one is longer than the context: truncated


@pytest.fixture(scope="module")
def engine(tiny_backbone: Backbone, demo_registries: Registries) -> InferenceEngine:
    return InferenceEngine(tiny_backbone, demo_registries.v1)


def images(backbone: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([backbone.preprocess(color_image(c, rng)) for c in ["red", "green", "blue"][:n]])


def test_no_task_is_open_clips_own_encoders_normalised(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    model, pics = tiny_backbone.model, images(tiny_backbone, 3)
    with torch.inference_mode():
        want_image = torch.nn.functional.normalize(model.encode_image(pics), dim=-1)
        want_text = torch.nn.functional.normalize(model.encode_text(tiny_backbone.tokenizer(TEXTS)), dim=-1)
    got_image = engine.encode_images(pics, [None] * 3)
    got_text = embed_texts(engine, TEXTS)
    assert (got_image - want_image).abs().max() < 1e-5 and (got_text - want_text).abs().max() < 1e-5
    assert torch.allclose(got_image.norm(dim=-1), torch.ones(3)) and torch.allclose(got_text.norm(dim=-1),
                                                                                    torch.ones(3))


def test_a_task_embeds_through_its_prompts(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    """Through task T the text of a class is T's own class feature, and the image the one T classifies with."""
    snap = engine.snapshot
    entry = classify_entry(snap, "colors")
    assert entry is not None and entry.text_prompts is not None and entry.vision_prompts is not None
    classes = [entry.info.template.format(c) for c in entry.info.classes]
    assert (embed_texts(engine, classes, entry) - entry.text_features).abs().max() < 1e-5
    assert (embed_texts(engine, classes) - entry.text_features).abs().max() > 1e-3  # the prompts matter
    pics = images(tiny_backbone, 3)
    through = engine.encode_images(pics, [entry] * 3)
    assert (through - engine.runtime.encode(pics, entry.vision_prompts)).abs().max() < 1e-5
    assert (through - engine.encode_images(pics, [None] * 3)).abs().max() > 1e-3
    labels = [r.label for r in engine.classify(pics, ["colors"] * 3)]
    assert [entry.info.classes[int(i)] for i in (through @ entry.text_features.T).argmax(-1)] == labels


def test_a_batch_of_mixed_requests_equals_each_alone(engine: InferenceEngine, tiny_backbone: Backbone) -> None:
    pics = images(tiny_backbone, 3, seed=5)
    requests = [EmbedRequest(pics[0], "a red thing", "colors"), EmbedRequest(pics[1]),
                EmbedRequest(text="a cat", task="warmth"), EmbedRequest(pics[2], task="brightness"),
                EmbedRequest(pics[0], task="nope"), EmbedRequest(text="x", task="tags"), EmbedRequest(),
                EmbedRequest(text="   ")]
    together = embed_requests(engine, requests)
    alone = [embed_requests(engine, [r])[0] for r in requests]
    assert [o.ok for o in together] == [True] * 4 + [False] * 4
    for a, b in zip(together[:4], alone[:4], strict=True):
        assert set(a.result) == set(b.result)
        for key in ("image_embedding", "text_embedding"):
            if key in a.result:
                assert np.abs(np.array(a.result[key]) - np.array(b.result[key])).max() < 1e-5
    assert set(together[0].result) == {"task", "dim", "image_embedding", "text_embedding", "registry_version"}
    assert together[1].result["task"] is None and "text_embedding" not in together[1].result
    assert len(together[1].result["image_embedding"]) == together[1].result["dim"] == tiny_backbone.embed_dim
    assert isinstance(together[4].exception(), UnknownTaskError)
    assert isinstance(together[5].exception(), WrongTaskKindError)
    assert "image, a text or both" in together[6].error and "must not be empty" in together[7].error
