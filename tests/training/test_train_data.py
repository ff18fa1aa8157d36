"""Data layer of training/: discovery, bad-file policy, transparency, seeded disjoint k-shot splits."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.cli import main as cli_main
from training.config import SplitConfig
from training.data import (
    BadFileError,
    BadFiles,
    Item,
    discover_image_tasks,
    image_tensors,
    load_image,
    read_fusion_jsonl,
)
from training.splits import classify_split, fusion_split, read_split, validation_split, write_split
from training.synthetic import write_fusion_jsonl, write_image_task

CLASSES = {"red": "red", "blue": "blue", "green": "green"}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Two tasks over the same three classes, 10 images each."""
    root = tmp_path / "data"
    write_image_task(root, "clipart", CLASSES, 10, seed=1)
    write_image_task(root, "photo", CLASSES, 10, seed=2)
    return root


def test_bad_files_are_reported_with_their_path_and_skipped(tree: Path):
    (tree / "clipart" / "red" / "broken.png").write_bytes(b"not a png")
    (tree / "clipart" / "red" / "notes.txt").write_text("hello")
    (tree / "photo" / "yellow").mkdir()
    bad = BadFiles("skip")
    tasks = discover_image_tasks(tree, bad)
    reported = {Path(b["path"]).name: b["reason"] for b in bad.seen}
    assert "unreadable image" in reported["broken.png"]
    assert "not an image" in reported["notes.txt"]
    assert "empty class" in reported["yellow"]
    assert tasks["photo"].classes == ["blue", "green", "red"]  # the empty class is gone
    images = {it.image for t in tasks.values() for it in t.items}
    assert len(images) == 60 and not any("broken" in i or "notes" in i for i in images)


def test_bad_file_stop_raises_naming_the_file(tree: Path):
    broken = tree / "photo" / "green" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadFileError, match=str(broken)):
        discover_image_tasks(tree, BadFiles("stop"))


def test_unknown_labels_and_malformed_fusion_lines_are_reported(tmp_path: Path):
    path = write_fusion_jsonl(tmp_path / "f.jsonl", 8)
    with path.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"image": "f_images/0000.png", "text": "x", "label": "purple-cat"}) + "\n")
        f.write(json.dumps({"image": "missing.png", "text": "x", "label": "red-cat"}) + "\n")
    bad = BadFiles("skip")
    classes = ["blue-cat", "blue-dog", "red-cat", "red-dog"]
    items = read_fusion_jsonl(path, bad, classes=classes)
    assert len(items) == 8
    where = [b["path"] for b in bad.seen]
    assert where[0] == f"{path}:9" and where[1] == f"{path}:10" and "missing.png" in where[2]
    assert "unknown label" in bad.seen[1]["reason"]
    with pytest.raises(BadFileError, match=f"{path}:9"):
        read_fusion_jsonl(path, BadFiles("stop"), classes=classes)


def test_transparent_images_are_composited_on_white(tmp_path: Path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


def test_split_is_kshot_disjoint_and_seeded(tree: Path, tmp_path: Path):
    tasks = discover_image_tasks(tree, BadFiles())
    cfg = SplitConfig(shots=3, test_fraction=0.4, seed=7)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_split(a, classify_split(tree, tasks, cfg))
    write_split(b, classify_split(tree, discover_image_tasks(tree, BadFiles()), cfg))
    assert a.read_bytes() == b.read_bytes()  # same seed, same file
    split = read_split(a)
    for t in split.tasks.values():
        train, test = {i.image for i in t.train}, {i.image for i in t.test}
        assert not train & test
        for c in t.classes:
            assert sum(i.label == c for i in t.train) == 3
            assert sum(i.label == c for i in t.test) == 4
    other = classify_split(tree, tasks, SplitConfig(shots=3, test_fraction=0.4, seed=8))
    assert [i.image for i in other.tasks["photo"].test] != [i.image for i in split.tasks["photo"].test]


def test_split_by_stem_holds_an_identity_out_in_every_task(tmp_path: Path):
    root = tmp_path / "data"
    for task in ("noto", "twemoji"):  # the same identities (file stems) drawn in two styles
        write_image_task(root, task, CLASSES, 8, seed=zlib.crc32(task.encode()) % 100)
    tasks = discover_image_tasks(root, BadFiles())
    split = classify_split(root, tasks, SplitConfig(shots=None, test_fraction=0.5, split_by="stem"))
    stems = {name: ({Path(i.image).stem for i in t.train}, {Path(i.image).stem for i in t.test})
             for name, t in split.tasks.items()}
    assert stems["noto"][1] == stems["twemoji"][1] and len(stems["noto"][1]) == 12
    assert not stems["noto"][0] & stems["twemoji"][1]  # no task trains on another task's test identity


def test_validation_split_holds_out_train_identities_in_every_task(tmp_path: Path):
    root = tmp_path / "data"
    for task in ("noto", "twemoji"):
        write_image_task(root, task, CLASSES, 8, seed=zlib.crc32(task.encode()) % 100)
    split = classify_split(root, discover_image_tasks(root, BadFiles()),
                           SplitConfig(shots=None, test_fraction=0.5, split_by="stem"))
    write_split(tmp_path / "split.json", split)
    assert cli_main(["split", "--validation-of", str(tmp_path / "split.json"), "--out", str(tmp_path / "val.json"),
                     "--seed", "3"]) == 0
    val = read_split(tmp_path / "val.json")  # read_split checks train and test share no image
    test_stems = {Path(i.image).stem for t in split.tasks.values() for i in t.test}
    fit = {n: {Path(i.image).stem for i in t.train} for n, t in val.tasks.items()}
    held = {n: {Path(i.image).stem for i in t.test} for n, t in val.tasks.items()}
    assert held["noto"] == held["twemoji"] and not held["noto"] & (fit["noto"] | fit["twemoji"])
    assert not (held["noto"] | fit["noto"]) & test_stems  # the real test part is never used
    for name, t in split.tasks.items():
        assert sorted(i.image for i in t.train) == sorted(i.image for i in val.tasks[name].train + val.tasks[name].test)
        assert {i.label for i in val.tasks[name].test} == set(t.classes)  # every class validated
    assert validation_split(split, 0.25, 3).tasks["noto"].test == val.tasks["noto"].test  # seeded
    assert validation_split(split, 0.25, 4).tasks["noto"].test != val.tasks["noto"].test
    with pytest.raises(ValueError, match="fraction"):
        validation_split(split, 1.0)


def test_validation_never_takes_a_class_last_train_identity(tmp_path: Path):
    root = tmp_path / "data"
    for task in ("noto", "twemoji"):
        write_image_task(root, task, CLASSES, 8, seed=zlib.crc32(task.encode()) % 100)
    tasks = discover_image_tasks(root, BadFiles())
    for shots in (1, 2):
        split = classify_split(root, tasks, SplitConfig(shots=shots, test_fraction=0.5, split_by="stem"))
        val = validation_split(split, 0.25, 0)
        held: Counter[str] = Counter()
        for name, t in val.tasks.items():
            assert {i.label for i in t.train} == set(t.classes), (shots, name)  # every class still trains
            held.update(i.label for i in t.test)
        if shots == 1:  # nothing to spare: every task keeps its one identity of each class
            assert not held
        else:  # two per task: each class is still validated somewhere
            assert set(held) == set(CLASSES), held


def test_split_file_rejects_overlap_and_foreign_files(tree: Path, tmp_path: Path):
    split = classify_split(tree, discover_image_tasks(tree, BadFiles()), SplitConfig(shots=2))
    split.tasks["photo"].test.append(split.tasks["photo"].train[0])
    write_split(tmp_path / "s.json", split)
    with pytest.raises(ValueError, match="share 1 image"):
        read_split(tmp_path / "s.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a mmserve-split"):
        read_split(tmp_path / "x.json")


def test_fusion_split_heads(tmp_path: Path):
    single = read_fusion_jsonl(write_fusion_jsonl(tmp_path / "s.jsonl", 16), BadFiles())
    multi = read_fusion_jsonl(write_fusion_jsonl(tmp_path / "m.jsonl", 16, multilabel=True), BadFiles())
    s = fusion_split("s", single, SplitConfig(shots=2, test_fraction=0.25)).tasks["s"]
    m = fusion_split("m", multi, SplitConfig(shots=None, test_fraction=0.25)).tasks["m"]
    assert s.head == "multiclass" and len(s.classes) == 4 and len(s.train) == 8 and len(s.test) == 4
    assert m.head == "multilabel" and m.classes == ["blue", "cat", "dog", "red"] and len(m.test) == 4
    with pytest.raises(ValueError, match="multilabel"):
        fusion_split("m", multi, SplitConfig(), head="multiclass")


def test_image_tensors_are_cached_on_disk(tree: Path, tmp_path: Path, monkeypatch):
    items = [Item(f"photo/red/red00{i}.png", "red") for i in range(3)]

    def preprocess(img):
        return torch.tensor(list(img.getpixel((16, 16))), dtype=torch.float32)

    first, kept = image_tensors(tree, items, preprocess, BadFiles(), tmp_path / "cache")
    assert len(kept) == 3 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    monkeypatch.setattr("training.data.load_image", lambda path: 1 / 0)  # a second run must not decode
    again, _ = image_tensors(tree, items, preprocess, BadFiles(), tmp_path / "cache")
    assert torch.equal(first, again)
    (tree / items[0].image).touch()  # a changed file invalidates the cache
    with pytest.raises(BadFileError, match="ZeroDivisionError"):
        image_tensors(tree, items, preprocess, BadFiles("stop"), tmp_path / "cache")


def test_fusion_lines_can_be_selected_by_field(tmp_path: Path):
    path = write_fusion_jsonl(tmp_path / "f.jsonl", 6)
    rows = [json.loads(line) | {"task": "noto" if i % 3 else "twemoji"} for i, line in enumerate(path.open())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_fusion_jsonl(path, BadFiles("stop"), select={"task": "twemoji"})
    assert [Path(it.image).name for it in items] == ["0000.png", "0003.png"]
    with pytest.raises(ValueError, match="no usable lines"):
        read_fusion_jsonl(path, BadFiles(), select={"task": "fluent"})
