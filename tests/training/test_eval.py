"""`mmserve-train eval` and `zeroshot`: per-task scores through the registry, zero-shot reference, JSON + Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.cli import main
from training.evaluate import evaluate_registry
from training.splits import read_split, write_split
from training.synthetic import write_fusion_jsonl, write_image_task
from training.zeroshot import zero_shot

TINY = ["--model", "mmserve-tiny", "--no-progress"]


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    """A split and a short MmAP run, both made through the command line."""
    work = tmp_path_factory.mktemp("eval")
    for i, task in enumerate(("clipart", "sketch")):
        write_image_task(work / "data", task, {"red_ball": "red", "blue_ball": "blue"}, 8, seed=i)
    split = str(work / "split.json")
    assert main(["split", "--root", str(work / "data"), "--out", split, "--shots", "4"]) == 0
    assert main(["classify", "--split", split, "--run-dir", str(work / "run"), "--epochs", "2", "--lr", "0.1",
                 "--group-steps", "4", "--group-every", "2", *TINY]) == 0
    return work


def test_eval_writes_json_and_markdown_matching_the_run(classify_run: Path, capsys):
    work = classify_run
    assert main(["eval", "--registry", str(work / "run" / "registry"), "--split", str(work / "split.json"),
                 "--out", str(work / "out")]) == 0
    report = json.loads((work / "out" / "eval.json").read_text())
    trained = json.loads((work / "run" / "metrics.json").read_text())["final"]["tasks"]
    manifest = json.loads((work / "run" / "registry" / "manifest.json").read_text())
    assert set(report["tasks"]) == {"clipart", "sketch"}
    for name, row in report["tasks"].items():
        assert row["metric"] == "accuracy" and row["n_test"] == 8
        assert row["score"] == pytest.approx(trained[name]["accuracy"])
        assert row["zero_shot"] == pytest.approx(trained[name]["zero_shot_accuracy"])
        entry = next(t for t in manifest["tasks"] if t["name"] == name)
        group = next((g for g in manifest["groups"] if g["name"] == entry["group"]), None)
        assert row["trainable_params"] == entry["trainable_params"]
        assert row["params_used"] == entry["trainable_params"] + (group["trainable_params"] if group else 0)
    md = (work / "out" / "eval.md").read_text()
    assert md.startswith("| task | kind | metric | score | zero-shot |") and "| **mean** |" in md
    assert f"| clipart | classify | accuracy | {report['tasks']['clipart']['score']:.4f} |" in md
    assert md in capsys.readouterr().out
    assert manifest["tasks"][0]["classes"] == ["blue ball", "red ball"]  # prompt names, not folder ids


def test_zeroshot_command_matches_the_reference_in_eval(classify_run: Path):
    work = classify_run
    out = work / "zs.json"
    assert main(["zeroshot", "--split", str(work / "split.json"), "--out", str(out), "--model", "mmserve-tiny"]) == 0
    zs = json.loads(out.read_text())
    trained = json.loads((work / "run" / "metrics.json").read_text())["final"]["tasks"]
    assert {k: v["accuracy"] for k, v in zs.items()} == pytest.approx(
        {k: v["zero_shot_accuracy"] for k, v in trained.items()})


def test_zero_shot_equals_textbook_clip_zero_shot(tiny_backbone, tmp_path: Path):
    """The reference written out: open_clip's encode_image / encode_text, cosine, argmax, accuracy."""
    classes = {"red_ball": "red", "green_leaf": "green", "blue_sky": "blue", "yellow_sun": "yellow",
               "small_cat": "red", "big_dog": "blue"}
    for i, (folder, colour) in enumerate(classes.items()):  # 2, 4, .., 12 images: a different test count each
        write_image_task(tmp_path / "data", "shapes", {folder: colour}, 2 * (i + 1), seed=i)
    split = str(tmp_path / "split.json")
    assert main(["split", "--root", str(tmp_path / "data"), "--out", split, "--shots", "1"]) == 0
    task = read_split(split).tasks["shapes"]
    got = zero_shot(tiny_backbone, read_split(split))["shapes"]  # its default template

    model = tiny_backbone.model
    with torch.no_grad():
        images = torch.stack([tiny_backbone.preprocess(Image.open(tmp_path / "data" / it.image).convert("RGB"))
                              for it in task.test])
        image_features = F.normalize(model.encode_image(images), dim=-1)
        prompts = [f"a photo of a {folder.replace('_', ' ')}." for folder in task.classes]
        text_features = F.normalize(model.encode_text(tiny_backbone.tokenizer(prompts)), dim=-1)
    similarity = image_features @ text_features.T
    labels = torch.tensor([task.classes.index(it.label) for it in task.test])
    expected = (similarity.argmax(dim=-1) == labels).float().mean().item()
    assert got["n_test"] == len(task.test) and len({it.label for it in task.test}) == 6
    assert got["accuracy"] == pytest.approx(expected, abs=1e-9)
    # the data can tell a right ranking from a wrong one (e.g. argmin), so the equality above means something (a
    # random tiny backbone may rank every image alike: the classes' distinct test counts still tell them apart)
    assert (similarity.argmin(dim=-1) == labels).float().mean().item() != pytest.approx(expected, abs=1e-9)


def test_unknown_test_labels_are_reported_then_skipped_or_stop(classify_run: Path, tiny_backbone, capsys):
    work = classify_run
    split = read_split(work / "split.json")
    odd = split.tasks["sketch"].test[0]
    odd.label = "green_ball"  # a class the registry never saw
    write_split(work / "odd.json", split)
    report = evaluate_registry(work / "run" / "registry", work / "odd.json", backbone=tiny_backbone)
    assert report.tasks["sketch"]["n_test"] == 7 and report.tasks["clipart"]["n_test"] == 8
    (skipped,) = report.skipped_files
    assert skipped["path"].endswith(odd.image) and "unknown label" in skipped["reason"]
    code = main(["eval", "--registry", str(work / "run" / "registry"), "--split", str(work / "odd.json"),
                 "--on-bad-file", "stop", "--out", str(work / "odd")])
    assert code == 2 and odd.image in capsys.readouterr().err


def test_eval_of_a_fusion_registry(tmp_path: Path):
    write_fusion_jsonl(tmp_path / "tags.jsonl", 24, multilabel=True)
    assert main(["fuse", "--train", str(tmp_path / "tags.jsonl"), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                 "--experts", "2", "--prompt-len", "2", "--mapper-hidden", "16", "--batch-size", "8", *TINY]) == 0
    assert main(["eval", "--registry", str(tmp_path / "run" / "registry"),
                 "--split", str(tmp_path / "run" / "split.json")]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    row = report["tasks"]["tags"]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["tasks"]["tags"]
    assert row["kind"] == "fuse" and row["metric"] == "f1_micro"
    assert row["score"] == pytest.approx(final["f1_micro"]) and row["f1_macro"] == pytest.approx(final["f1_macro"])
    assert row["zero_shot"] == pytest.approx(final["zero_shot_f1_micro"])


def test_compare_puts_ablations_side_by_side(classify_run: Path, capsys):
    work = classify_run
    assert main(["classify", "--split", str(work / "split.json"), "--run-dir", str(work / "text-only"),
                 "--epochs", "1", "--prompt", "text", "--sharing", "task", *TINY]) == 0
    capsys.readouterr()
    assert main(["compare", str(work / "run"), str(work / "text-only"), "--out", str(work / "compare.md")]) == 0
    table = (work / "compare.md").read_text()
    assert table == capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    text_only = json.loads((work / "text-only" / "metrics.json").read_text())["final"]
    assert rows["text-only"][1] == "text / task" and rows["text-only"][7] == str(text_only["trainable_params"])
    assert rows["text-only"][7] == str(2 * 2 * 4 * 64)  # two tasks x K=2 layers x 4 tokens x d_l=64
    assert rows["run"][1] == "mmap / group+task" and rows["run"][2] == "auto"
    assert float(rows["text-only"][4]) == pytest.approx(text_only["accuracy_mean"], abs=1e-4)
    assert main(["compare", str(work / "split.json")]) == 2  # not a run dir: a clear error, no traceback
