"""Residency: classify tasks loaded from the store on first use, the least recently used evicted beyond
MMSERVE_MAX_RESIDENT_TASKS, answers equal to an engine holding every task; and the one file a stored task loads
from (class text features and visual prompts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _registry_fixture import color_image
from safetensors.torch import load_file, save_file

from mmserve.engine import ClassifyRequest, InferenceEngine
from mmserve.errors import RegistryError
from mmserve.features import FEATURES
from mmserve.snapshot import ClassifyTask, ResidentTasks, TaskInfo
from mmserve.store import Store
from mmserve.versions import add_tasks

CLASSIFY = ["colors", "warmth", "brightness"]


def _task(name: str) -> ClassifyTask:
    return ClassifyTask(TaskInfo(name, "classify", None, ("a",), {}), torch.zeros(1, 4), None, name)


def test_the_least_recently_used_task_is_evicted_and_counted() -> None:
    resident = ResidentTasks(capacity=2)
    loads: list[str] = []

    def get(key: str) -> ClassifyTask:
        return resident.get(key, lambda: loads.append(key) or _task(key))

    get("a"), get("b"), get("a"), get("c")  # c evicts b, the least recently used
    assert loads == ["a", "b", "c"] and resident.peek("b") is None and resident.peek("a") is not None
    get("b")
    assert loads[-1] == "b" and resident.peek("a") is None  # b back, a (used before c) out
    assert resident.stats() == {"resident": 2, "capacity": 2, "hits": 1, "misses": 4, "evictions": 2,
                                "bytes": 2 * 16}  # two (1, 4) float32 feature tensors
    with pytest.raises(ValueError, match=">= 1"):
        ResidentTasks(capacity=0)


def _images(backbone, n: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.stack([backbone.preprocess(color_image(c, rng)) for c in ("red", "blue", "green")[:n]])


def test_a_bounded_engine_answers_as_one_holding_every_task(tmp_path: Path, demo_registries, tiny_backbone) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1)
    full = InferenceEngine(tiny_backbone, url)
    bounded = InferenceEngine(tiny_backbone, url, max_resident=1)
    assert bounded.resident.stats()["resident"] == 0  # nothing loads before it is asked for
    images = _images(tiny_backbone)
    for tasks in (CLASSIFY, list(reversed(CLASSIFY)), ["colors"] * 3):
        want = full.classify(images, tasks, top_k=3)
        got = bounded.classify(images, tasks, top_k=3)
        for w, g in zip(want, got, strict=True):
            assert [p.label for p in w.top_k] == [p.label for p in g.top_k]
            np.testing.assert_allclose([p.score for p in w.top_k], [p.score for p in g.top_k],
                                       atol=1e-6)
    stats = bounded.resident.stats()
    assert stats["resident"] == 1 and stats["evictions"] >= 4 and stats["misses"] == stats["evictions"] + 1
    assert bounded.describe()["residency"]["capacity"] == 1


def test_a_bounded_engine_checks_the_tasks_a_change_brings(tmp_path: Path, demo_registries, tiny_backbone) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1, ["colors"])
    engine = InferenceEngine(tiny_backbone, url, max_resident=1)
    engine.change("add", str(demo_registries.v1), ["warmth"])
    assert engine._builder.rebuilt == 1 and engine.resident.stats()["misses"] == 0  # built by the change itself
    assert engine.classify(_images(tiny_backbone, 1), ["warmth"])[0].task == "warmth"
    assert engine.resident.stats()["hits"] == 1


def test_a_cold_task_the_store_cannot_give_fails_alone(tmp_path: Path, demo_registries, tiny_backbone) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1)
    InferenceEngine(tiny_backbone, url)  # stores every task's features and prompts
    engine = InferenceEngine(tiny_backbone, url, max_resident=1)
    for path in (url / FEATURES / tiny_backbone.fingerprint).iterdir():
        path.unlink()  # warmth will need its weights blob, which goes too
    manifest = Store.open(url).get_version(engine.snapshot.version)
    (url / manifest.task("warmth").weights).unlink()
    image = _images(tiny_backbone, 1)[0]
    outcomes = engine.classify_requests([ClassifyRequest(image, "colors"), ClassifyRequest(image, "warmth")])
    assert outcomes[0].ok and not outcomes[1].ok
    assert outcomes[1].error_type == "TaskUnavailableError" and "could not be loaded" in outcomes[1].error


def test_a_stored_task_loads_from_one_file_and_a_wrong_prompt_shape_is_refused(tmp_path: Path, demo_registries,
                                                                               tiny_backbone) -> None:
    url = tmp_path / "store"
    add_tasks(Store.open(url), demo_registries.v1, ["colors"])
    first = InferenceEngine(tiny_backbone, url)
    served = first.snapshot.classify["colors"]
    (path,) = (url / FEATURES / tiny_backbone.fingerprint).iterdir()
    stored = load_file(path)
    torch.testing.assert_close(stored["vision"], served.vision_prompts)
    manifest = Store.open(url).get_version(first.snapshot.version)
    (url / manifest.task("colors").weights).unlink()  # a stored task needs no weights to load
    second = InferenceEngine(tiny_backbone, url)
    torch.testing.assert_close(second.snapshot.classify["colors"].text_features, served.text_features)
    metadata = {"fingerprint": tiny_backbone.fingerprint, "key": path.name.split("-", 1)[1].split(".")[0]}
    save_file({"features": stored["features"], "vision": stored["vision"][:, :1].contiguous()}, path, metadata)
    with pytest.raises(RegistryError, match=rf"{path.name}: vision: shape"):
        InferenceEngine(tiny_backbone, url)
