"""Open vocabulary in process: the caller's labels ranked through a task or zero-shot, the label cache, the limits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _registry_fixture import Registries, color_image
from hypothesis import given, settings
from hypothesis import strategies as st

from mmserve.backbone import Backbone
from mmserve.engine import InferenceEngine
from mmserve.errors import InvalidInputError, UnknownTaskError
from mmserve.registry import DEFAULT_TEMPLATE
from mmserve.snapshot import Snapshot, TaskInfo
from mmserve.vocab import (
    LABELS_PATTERN,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    LabelCache,
    LabelRequest,
    parse_labels,
    rank_label_requests,
)


@pytest.fixture(scope="module")
def engine(tiny_backbone: Backbone, demo_registries: Registries) -> InferenceEngine:
    return InferenceEngine(tiny_backbone, demo_registries.v1)


@pytest.fixture
def tower_calls(engine: InferenceEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of texts of every text-tower pass from now on."""
    calls: list[int] = []
    forward = engine.text_encoder.forward

    def counted(tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(int(tokens.shape[0]))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.text_encoder, "forward", counted)
    return calls


def pictures(backbone: Backbone, names: list[str], seed: int = 3) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [backbone.preprocess(color_image(c, rng)) for c in names]


def test_a_tasks_own_classes_as_labels_rank_as_classify_does(engine: InferenceEngine, tiny_backbone) -> None:
    pics = pictures(tiny_backbone, ["red", "green", "blue"])
    classes = engine.snapshot.require("colors", "classify").info.classes
    ranked = rank_label_requests(engine, LabelCache(), [LabelRequest(p, classes, "colors", 3) for p in pics])
    classified = engine.classify(torch.stack(pics), ["colors"] * 3, top_k=3)
    for outcome, want in zip(ranked, classified, strict=True):
        got = outcome.result
        assert got["task"] == "colors" and got["label"] == want.label
        assert [p["label"] for p in got["top_k"]] == [p.label for p in want.top_k]
        assert np.allclose([p["score"] for p in got["top_k"]], [p.score for p in want.top_k], atol=1e-5)


def test_zero_shot_template_is_the_one_the_classify_tasks_share() -> None:
    def snap(*templates: str | None) -> Snapshot:
        infos = tuple(TaskInfo(f"t{i}", "classify", None, ("a",), {}, t) for i, t in enumerate(templates))
        fuse = TaskInfo("f", "fuse", None, ("a",), {})
        return Snapshot("v", Path("."), "", (*infos, fuse), {}, {})

    assert snap("{}", "{}").zero_shot_template == "{}"
    assert snap("{}", "a drawing of {}.").zero_shot_template == DEFAULT_TEMPLATE  # they differ
    assert snap(None, DEFAULT_TEMPLATE).zero_shot_template == DEFAULT_TEMPLATE
    assert snap().zero_shot_template == DEFAULT_TEMPLATE  # no classification task


def test_zero_shot_uses_the_registrys_template_and_no_prompts(engine: InferenceEngine, tiny_backbone,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pic = pictures(tiny_backbone, ["red"])[0]
    labels = ("red", "green", "a cat")
    template = "{} drawn."
    monkeypatch.setattr(type(engine.snapshot), "zero_shot_template", property(lambda self: template))
    (outcome,) = rank_label_requests(engine, LabelCache(), [LabelRequest(pic, labels, None, 3)])
    model = tiny_backbone.model
    with torch.inference_mode():
        image = torch.nn.functional.normalize(model.encode_image(pic[None]), dim=-1)
        texts = tiny_backbone.tokenizer([template.format(label) for label in labels])
        text = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
        probs = (tiny_backbone.logit_scale * image @ text.T).softmax(-1)[0]
    assert outcome.result["task"] is None
    assert {p["label"]: round(p["score"], 5) for p in outcome.result["top_k"]} == {
        label: round(float(p), 5) for label, p in zip(labels, probs, strict=True)}


def _without_scores(result: dict) -> dict:
    """A ranked result with every score dropped: what must match exactly."""
    return {key: [{k: v for k, v in p.items() if k != "score"} for p in value] if key == "top_k" else value
            for key, value in result.items() if key != "score"}


def _scores(result: dict) -> list[float]:
    """A ranked result's scores, the top one first: what must match within a tolerance."""
    return [result["score"], *(p["score"] for p in result["top_k"])]


def test_a_repeated_label_list_runs_the_text_tower_once(engine: InferenceEngine, tiny_backbone,
                                                        tower_calls: list[int]) -> None:
    cache = LabelCache()
    pic = pictures(tiny_backbone, ["green"])[0]
    labels = ("grass", "sky", "fire", "grass")
    first = rank_label_requests(engine, cache, [LabelRequest(pic, labels, "colors")])
    assert tower_calls == [3] and cache.computed == 3  # the repeated label once
    again = rank_label_requests(engine, cache, [LabelRequest(pic, labels, "colors")] * 2)
    assert tower_calls == [3]
    for other in again:  # a batch of two may round differently from a batch of one (float kernels)
        assert _without_scores(other.result) == _without_scores(first[0].result)
        assert _scores(other.result) == pytest.approx(_scores(first[0].result), abs=1e-5)
    rank_label_requests(engine, cache, [LabelRequest(pic, ("grass", "moss"), "colors")])
    assert tower_calls == [3, 1]  # only the new label
    rank_label_requests(engine, cache, [LabelRequest(pic, ("grass",), "warmth"), LabelRequest(pic, ("grass",))])
    assert tower_calls == [3, 1, 1, 1]  # other tasks, other prompts: their own features
    assert len(cache) == 6


def test_the_label_cache_is_bounded_least_recently_used_first(engine: InferenceEngine, tiny_backbone,
                                                              tower_calls: list[int]) -> None:
    cache = LabelCache(size=3)
    pic = pictures(tiny_backbone, ["blue"])[0]
    for labels in (("a", "b", "c"), ("a",), ("d",)):  # "a" used again: "b" is the oldest when "d" comes
        rank_label_requests(engine, cache, [LabelRequest(pic, labels)])
    assert len(cache) == 3 and tower_calls == [3, 1]
    rank_label_requests(engine, cache, [LabelRequest(pic, ("a", "c", "d"))])
    assert tower_calls == [3, 1]
    rank_label_requests(engine, cache, [LabelRequest(pic, ("b",))])
    assert tower_calls == [3, 1, 1]


def test_a_bad_request_fails_alone(engine: InferenceEngine, tiny_backbone) -> None:
    pic = pictures(tiny_backbone, ["red"])[0]
    outcomes = rank_label_requests(engine, LabelCache(), [
        LabelRequest(pic, ("a", "b"), "nope"), LabelRequest(pic, ()), LabelRequest(pic, ("a", "b"), top_k=9),
        LabelRequest(pic, ("x" * (MAX_LABEL_CHARS + 1),)), LabelRequest(torch.zeros(3, 2, 2), ("a",))])
    assert [o.ok for o in outcomes] == [False, False, True, False, False]
    assert isinstance(outcomes[0].exception(), UnknownTaskError) and len(outcomes[2].result["top_k"]) == 2


def test_parse_labels_limits() -> None:
    assert parse_labels(" cat , big dog,x") == ["cat", "big dog", "x"]
    assert parse_labels("1.50,\"quoted\"") == ["1.50", '"quoted"']
    for raw, fragment in ((",".join(["a"] * (MAX_LABELS + 1)), f"at most {MAX_LABELS} labels"),
                          ("cat,,dog", "label 2 is empty"), ("cat, ", "label 2 is empty"),
                          ("x" * (MAX_LABEL_CHARS + 1), f"at most {MAX_LABEL_CHARS}")):
        with pytest.raises(InvalidInputError, match=re.escape(fragment)):
            parse_labels(raw)
    assert parse_labels(",".join(["a" * MAX_LABEL_CHARS] * MAX_LABELS))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.one_of(st.text(max_size=80), st.from_regex(LABELS_PATTERN, fullmatch=True),
                 st.lists(st.text(st.sampled_from("ab ,\t\u00a0\u3000x"), max_size=70), max_size=70).map(",".join)))
def test_the_schema_pattern_accepts_exactly_what_the_parser_does(raw: str) -> None:
    """The schema's `labels` pattern (/docs.json) and the server's parser never disagree."""
    try:
        parse_labels(raw)
        parsed = True
    except InvalidInputError:
        parsed = False
    assert parsed == bool(re.fullmatch(LABELS_PATTERN, raw)), repr(raw)
