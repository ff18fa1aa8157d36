"""Trainer robustness: the split actually used is recorded, bad input is a one-line error naming the file or option,
outputs are written atomically."""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from mmserve.backbone import TINY_MODEL
from mmserve.prompts.mope import MoPEConfig
from training.classify import Towers
from training.cli import main
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.data import BadFiles, discover_image_tasks, load_class_names, read_fusion_jsonl
from training.evaluate import EvalReport, write_report
from training.grouping import GroupingConfig, read_groups_file, task_affinity
from training.mmap_trainer import MultiTaskConfig, train_multitask
from training.mope_trainer import FuseConfig, train_mope
from training.multitask import Batcher
from training.splits import classify_split, fusion_split, read_split, write_split
from training.synthetic import write_fusion_jsonl, write_image_task

ONE_EPOCH = OptimConfig(epochs=1, batch_size=4)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors") / "data"
    write_image_task(root, "t", {"red": "red", "blue": "blue"}, 4)
    return root


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    for needle in needles:
        assert needle in err, err


# 1. a reused split file decides the data: its shots and seed are what the run records


def test_reused_classify_split_records_its_own_shots_and_seed(data_root: Path, tmp_path: Path, tiny_backbone):
    split_file = tmp_path / "split.json"
    found = discover_image_tasks(data_root, BadFiles())
    write_split(split_file, classify_split(data_root, found, SplitConfig(shots=2, seed=7)))
    cfg = MultiTaskConfig(split_file=str(split_file), run_dir=str(tmp_path / "run"),  # cfg.split: shots 16, seed 0
                          backbone=BackboneConfig(TINY_MODEL), optim=ONE_EPOCH, grouping=GroupingConfig("all"),
                          progress=False)
    train_multitask(cfg, tiny_backbone)
    run = tmp_path / "run"
    recorded = json.loads((run / "metrics.json").read_text())["final"]["tasks"]["t"]
    (entry,) = json.loads((run / "registry" / "manifest.json").read_text())["tasks"]
    config = json.loads((run / "config.json").read_text())
    for record in (recorded, entry["metrics"]):
        assert (record["shots"], record["split_seed"]) == (2, 7)
    assert (config["split"]["shots"], config["split"]["seed"]) == (2, 7)


def test_reused_fusion_split_is_what_config_json_records(tmp_path: Path, tiny_backbone):
    items = read_fusion_jsonl(write_fusion_jsonl(tmp_path / "f.jsonl", 16), BadFiles())
    split_file = tmp_path / "split.json"
    write_split(split_file, fusion_split("f", items, SplitConfig(shots=2, test_fraction=0.25, seed=7)))
    cfg = FuseConfig(split_file=str(split_file), run_dir=str(tmp_path / "run"), backbone=BackboneConfig(TINY_MODEL),
                     mope=MoPEConfig(prompt_len=2, n_experts=2, mapper_hidden=8), optim=ONE_EPOCH, progress=False)
    train_mope(cfg, tiny_backbone)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["split"]["shots"], config["split"]["seed"], config["split"]["test_fraction"]) == (2, 7, 0.25)


def test_multilabel_split_records_that_shots_are_not_used(tmp_path: Path):
    items = read_fusion_jsonl(write_fusion_jsonl(tmp_path / "m.jsonl", 12, multilabel=True), BadFiles())
    split = fusion_split("m", items, SplitConfig(shots=1, test_fraction=0.25))
    assert split.config.shots is None and len(split.tasks["m"].train) == 9


# 2. prepare and pretrain errors are one line too


def test_pretrain_errors_are_one_line_naming_the_file(tmp_path: Path, capsys):
    assert main(["pretrain", "--cache", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, str(tmp_path / "nowhere"))
    missing = tmp_path / "missing.pt"
    assert main(["pretrain", "export", "--checkpoint", str(missing), "--out", str(tmp_path / "w.safetensors")]) == 2
    _one_line_error(capsys, "missing.pt")


def test_prepare_errors_are_one_line(monkeypatch, capsys):
    def fail(argv):
        raise FileNotFoundError("/cache/x.json: not found")

    monkeypatch.setitem(sys.modules, "training.prepare.__main__", types.SimpleNamespace(main=fail))
    assert main(["prepare"]) == 2
    _one_line_error(capsys, "mmserve-train prepare: error: /cache/x.json")


# 3. malformed input files name the file and the field


@pytest.mark.parametrize(("text", "needle"), [("[[", "not valid JSON"), ('[["a", "b"], "c"]', "groups[1]"),
                                              ('[[1, 2], ["c"]]', "groups[0]"), ('[["a", "b", "c"], []]', "groups[1]")])
def test_bad_groups_file_names_the_file_and_group(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "groups.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        read_groups_file(path, ["a", "b", "c"])
    assert str(path) in str(info.value)


def _split_json(tmp_path: Path, data_root: Path) -> tuple[Path, dict]:
    path = tmp_path / "split.json"
    write_split(path, classify_split(data_root, discover_image_tasks(data_root, BadFiles()), SplitConfig(shots=2)))
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: d.pop("root"), "field root is missing"),
    (lambda d: d["config"].update(colour="red"), "unknown field(s) ['colour']"),
    (lambda d: d["config"].update(shots="4"), "field config.shots: expected int"),
    (lambda d: d["tasks"]["t"].pop("classes"), "field tasks.t.classes is missing"),
    (lambda d: d["tasks"]["t"]["train"][0].pop("label"), "field tasks.t.train[0].label is missing"),
])
def test_bad_split_file_names_the_file_and_field(tmp_path: Path, data_root: Path, capsys, change, needle: str):
    path, data = _split_json(tmp_path, data_root)
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        read_split(path)
    assert str(info.value).startswith(f"{path}: ")
    assert main(["split", "--validation-of", str(path), "--out", str(tmp_path / "v.json")]) == 2
    _one_line_error(capsys, str(path), needle)
    assert not (tmp_path / "v.json").exists()


@pytest.mark.parametrize(("text", "needle"), [('{"classes": [{"name": "red"}]}', "classes[0]"),
                                              ("{bad", "not valid JSON")])
def test_bad_class_names_file_names_the_file(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        load_class_names(tmp_path, path)
    assert str(path) in str(info.value)


# 4. counts and periods must be >= 1


@pytest.mark.parametrize("option", ["--group-every", "--group-steps", "--batch-size"])
def test_zero_counts_are_refused_naming_the_option(option: str, data_root: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["group", "--root", str(data_root), "--run-dir", str(tmp_path / "run"), option, "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ">= 1" in err and "Traceback" not in err


def test_library_refuses_zero_batch_size_and_grouping_steps(tiny_backbone):
    with pytest.raises(ValueError, match="batch"):
        Batcher([4], 0, 0)
    for cfg, option in ((GroupingConfig(steps=0), "--group-steps"), (GroupingConfig(every=0), "--group-every")):
        with pytest.raises(ValueError, match=option):
            task_affinity(Towers.of(tiny_backbone), [], None, cfg, 0.1, 4, "a photo of a {}.")


# 5. outputs are replaced atomically: a failed write leaves the old file whole and no partial file


def test_failed_report_write_keeps_the_old_file(tmp_path: Path, monkeypatch):
    old = "| the old table |\n"
    (tmp_path / "eval.md").write_text(old)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "eval.md":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    task = {"kind": "classify", "metric": "accuracy", "score": 0.5, "zero_shot": 0.4, "trainable_params": 1,
            "params_used": 1, "n_test": 2}
    with pytest.raises(OSError, match="disk full"):
        write_report(EvalReport("reg", "split", {}, {"t": task}), tmp_path)
    assert (tmp_path / "eval.md").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]


# 6. --select needs FIELD=VALUE


def test_select_without_equals_names_the_option(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fuse", "--train", str(tmp_path / "f.jsonl"), "--select", "task"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--select" in err and "FIELD=VALUE" in err and "'task'" in err
