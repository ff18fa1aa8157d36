"""Template choice: made on the k-shot train images only, the best mean train-part zero-shot wins."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from training.classify import Towers
from training.data import Item
from training.results import emoji_split, write_toy_cache
from training.templates import CANDIDATES, choose_template
from training.zeroshot import zero_shot


def test_choice_is_the_best_train_part_candidate_and_never_reads_test(tiny_backbone, tmp_path: Path):
    cache = write_toy_cache(tmp_path / "cache")
    split = emoji_split(cache, 2, 0)
    for name, task in split.tasks.items():  # a test image that does not exist: reading it would fail
        split.tasks[name] = replace(task, test=[Item("missing/none.png", task.classes[0])])
    choice = choose_template(Towers.of(tiny_backbone), split)
    assert set(choice.scores) == set(CANDIDATES)
    assert choice.scores[choice.template] == max(choice.scores.values())
    assert choice.n_images == sum(len(t.train) for t in split.tasks.values())
    # each candidate's score is the train-part zero-shot mean over tasks
    train_as_test = replace(split, tasks={n: replace(t, test=list(t.train)) for n, t in split.tasks.items()})
    ref = zero_shot(tiny_backbone, train_as_test, template=CANDIDATES[1])
    assert abs(choice.scores[CANDIDATES[1]] - sum(r["accuracy"] for r in ref.values()) / len(ref)) < 1e-12


def test_choice_is_stored_and_reused(tiny_backbone, tmp_path: Path, monkeypatch) -> None:
    import training.templates as templates

    cache = write_toy_cache(tmp_path / "cache")
    split = emoji_split(cache, 2, 0)
    first = choose_template(Towers.of(tiny_backbone), split, cache_dir=tmp_path / "t")
    monkeypatch.setattr(templates, "zero_shot", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    assert choose_template(Towers.of(tiny_backbone), split, cache_dir=tmp_path / "t") == first
    other = emoji_split(cache, 1, 0)  # other train images: measured again
    with pytest.raises(AssertionError, match="measured"):
        choose_template(Towers.of(tiny_backbone), other, cache_dir=tmp_path / "t")
