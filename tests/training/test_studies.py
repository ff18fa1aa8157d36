"""The two studies on a toy cache and the tiny backbone: base-to-new (issue 21) and leave-one-out (issue 20)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

import training.studies.leave_one_out as loo
from mmserve.backbone import TINY_MODEL
from training.cli import main
from training.results.tasks import emoji_split
from training.results.toy import write_toy_cache
from training.studies import missing_line
from training.studies.base_to_new import base_and_new, restrict

TINY = ["--pretrained", "none", "--model", TINY_MODEL, "--seeds", "0", "--shots", "2", "--epochs", "1",
        "--no-progress", "--source-rows", "2", "--source-cols", "8"]
COLOURS = {"red-thing": "red", "blue-thing": "blue", "green-thing": "green", "yellow-thing": "yellow",
           "crimson-thing": "red"}


def test_base_and_new_follow_cocoops_rule() -> None:
    assert base_and_new(list("abcde")) == (list("abc"), list("de"))
    assert base_and_new(list("abcd")) == (list("ab"), list("cd"))


def test_restrict_keeps_only_the_classes_asked_for(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "cache", classes=COLOURS)
    split = emoji_split(cache, 2, 0)
    base = restrict(split, ["red-thing", "blue-thing"])
    for task in base.tasks.values():
        assert task.classes == ["red-thing", "blue-thing"] and task.class_names == ["red thing", "blue thing"]
        assert {it.label for it in task.train + task.test} == {"red-thing", "blue-thing"}
        assert len(task.train) == 4


def test_base_to_new_scores_through_the_served_label_path(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "cache", classes=COLOURS)
    out = tmp_path / "b2n"
    assert main(["base-to-new", "--cache", str(cache), "--out", str(out), "--methods", "visual-only", "mmap-full",
                 *TINY]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["base"] == ["red-thing", "blue-thing", "green-thing"]
    assert report["new"] == ["yellow-thing", "crimson-thing"]
    for method in ("visual-only", "mmap-full"):
        rec = report["rows"][method]["0"]
        run = Path(report["runs_dir"]) / f"{method}-k2-s0"
        final = json.loads((run / "metrics.json").read_text())["final"]["tasks"]
        for style, acc in rec["base"].items():  # the served label path = the trainer's own test accuracy
            assert acc == pytest.approx(final[style]["accuracy"], abs=1e-6)
        b, n = rec["base_mean"], rec["new_mean"]
        assert rec["h"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    md = out.with_suffix(".md").read_text()
    assert "| MmAP full (computed grouping) |" in md and "yellow-thing, crimson-thing" in md


def test_mates_are_the_other_tasks_of_its_group() -> None:
    groups = [["a", "b"], ["c"]]
    assert loo.mates(groups, "a") == ["b"] and loo.mates(groups, "c") == []


def test_targets_say_met_or_missed() -> None:
    cell = {"delta_points": -1.0, "agrees": True, "speedup": 12.0}
    seeds = {"0": {"styles": {s: dict(cell) for s in "abcde"}}}
    t = loo.targets(seeds)
    assert t["accuracy"]["target"] == "|mean (added - joint)| <= 2.0 points"
    assert t["accuracy"]["met"] and t["agreement"]["value"] == [5] and t["agreement"]["met"] and t["speedup"]["met"]
    seeds["0"]["styles"]["a"] |= {"agrees": False, "delta_points": -20.0}
    seeds["0"]["styles"]["b"] |= {"agrees": False, "speedup": 1.0}
    t = loo.targets(seeds)
    assert t["agreement"]["value"] == [3] and not t["agreement"]["met"]
    assert t["accuracy"]["value"] == pytest.approx(-4.8) and not t["accuracy"]["met"]
    assert t["speedup"]["value"] == pytest.approx(9.8) and not t["speedup"]["met"]
    # a seed whose joint run of five is done but no style yet is not a seed that agreed for 0 styles
    seeds["1"] = {"styles": {}}
    assert loo.targets(seeds)["agreement"]["value"] == [3]
    seeds["1"] = {"styles": {"a": dict(cell)}}
    assert loo._per_seed(loo.targets(seeds)["agreement"]) == "3 of 5, 1 of 1 (per seed)"


def test_missing_line_counts_every_run_and_says_when_it_cuts_the_list() -> None:
    runs = [f"r{i}" for i in range(22)]
    assert missing_line(runs) == "- Missing: 22 run(s): " + "; ".join(runs[:20]) + "; ... (2 more)"
    assert missing_line(runs[:2]) == "- Missing: 2 run(s): r0; r1"
    assert missing_line([]) == "- Missing: 0 run(s)"


def test_leave_one_out_adds_each_style_to_the_others_resumes_and_restores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cache = write_toy_cache(tmp_path / "cache", styles=("noto", "twemoji", "fluent_mono"))
    out = tmp_path / "loo"
    assert main(["leave-one-out", "--cache", str(cache), "--out", str(out), *TINY]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    seed = report["seeds"]["0"]
    runs = Path(report["runs_dir"])
    for style, cell in seed["styles"].items():
        four = json.loads((runs / f"joint-without-{style}-s0" / "result.json").read_text())
        assert style not in {t for g in four["groups"] for t in g}
        target = json.loads((runs / f"add-{style}-s0" / "target-registry" / "manifest.json").read_text())
        assert sorted(t["name"] for t in target["tasks"]) == sorted(["noto", "twemoji", "fluent_mono"])
        assert cell["agrees"] == (cell["added_mates"] == loo.mates(seed["joint_groups"], style))
        assert cell["speedup"] == pytest.approx(seed["joint_wall_s"] / cell["add_wall_s"])
    assert "| target | value | verdict |" in out.with_suffix(".md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(loo, "train_multitask", no_training)
    monkeypatch.setattr(loo, "add_task", no_training)
    assert main(["leave-one-out", "--cache", str(cache), "--out", str(out), *TINY]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["seeds"] == report["seeds"]

    # a fresh machine past its budget starts nothing and lists what is missing
    assert main(["leave-one-out", "--cache", str(cache), "--out", str(tmp_path / "none"), *TINY,
                 "--runs-dir", str(tmp_path / "fresh0"), "--budget-minutes", "0"]) == 0
    nothing = json.loads((tmp_path / "none.json").read_text())
    assert nothing["seeds"] == {} and nothing["targets"] == {} and len(nothing["missing"]) == 1 + 2 * 3
    assert "Missing: 7 run(s): joint-all-s0; joint-without-noto-s0; add-noto-s0;" in (tmp_path / "none.md").read_text()
    assert "no style has run yet" in (tmp_path / "none.md").read_text()

    # ... and with --restore the published page alone gives the same page, training nothing
    page = out.with_suffix(".json")
    assert main(["leave-one-out", "--cache", str(cache), "--out", str(tmp_path / "again"), *TINY,
                 "--runs-dir", str(tmp_path / "fresh1"), "--restore", str(page)]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["seeds"] == report["seeds"] and again["targets"] == report["targets"] and again["missing"] == []
    assert len(again["runs"]) == 1 + 2 * 3
    assert all(r["restored_from"] == str(page) for r in again["runs"].values())

    # refused, naming the file, when its split of a seed is not this cache's
    page.write_text(json.dumps({**report, "data": {"splits": {"0": "0" * 64}}}))
    with pytest.raises(SystemExit) as exited:
        main(["leave-one-out", "--cache", str(cache), "--out", str(tmp_path / "bad"), *TINY,
              "--runs-dir", str(tmp_path / "fresh2"), "--restore", str(page)])
    assert exited.value.code == 2 and "split of seed 0 differs" in capsys.readouterr().err
    assert not (tmp_path / "fresh2" / "joint-all-s0").exists()


def test_leave_one_out_publishes_after_every_style_so_a_lost_machine_loses_only_the_one_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_add, real_joint, adds, joints, lost = loo.add_task, loo.train_multitask, [], [], []

    def machine_lost_in_the_second_add(*args, **kwargs):
        adds.append(1)
        if len(adds) == 2 and not lost:
            lost.append(1)
            raise KeyboardInterrupt  # the session's machine goes away mid-run
        return real_add(*args, **kwargs)

    def counted(*args, **kwargs):
        joints.append(1)
        return real_joint(*args, **kwargs)

    monkeypatch.setattr(loo, "add_task", machine_lost_in_the_second_add)
    monkeypatch.setattr(loo, "train_multitask", counted)
    cache = write_toy_cache(tmp_path / "cache", styles=("noto", "twemoji", "fluent_mono"))
    out = tmp_path / "loo"
    with pytest.raises(KeyboardInterrupt):
        main(["leave-one-out", "--cache", str(cache), "--out", str(out), *TINY])
    page = json.loads(out.with_suffix(".json").read_text())  # written after the first style, before the second
    first = list(page["seeds"]["0"]["styles"])
    assert len(first) == 1 and sorted(page["runs"]) == sorted(["joint-all-s0", f"joint-without-{first[0]}-s0",
                                                               f"add-{first[0]}-s0"])

    adds.clear()
    joints.clear()
    assert main(["leave-one-out", "--cache", str(cache), "--out", str(tmp_path / "fresh"), *TINY,
                 "--runs-dir", str(tmp_path / "fresh-runs"), "--restore", str(out.with_suffix(".json"))]) == 0
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert len(adds) == 2 and len(joints) == 2 and fresh["missing"] == []  # only the two styles not yet published
    assert fresh["seeds"]["0"]["styles"][first[0]] == page["seeds"]["0"]["styles"][first[0]]


def test_method_grid_chooses_on_validation_then_tests_the_best_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import training.studies.method_grid as grid_module
    from training.studies.method_grid import GridConfig, Point, run_grid

    cache = write_toy_cache(tmp_path / "cache", classes=COLOURS, per_class=8)
    grid = (Point("sgd", 0.0035, 1, "small"), Point("adamw", 0.05, 1, "small"))
    published = tmp_path / "results.json"
    published.write_text(json.dumps({"cells": [{"method": "visual-only", "family": "classify", "shots": 2,
                                                "complete": True, "mean": {"mean": 0.25}}]}))
    cfg = GridConfig(str(cache), "none", TINY_MODEL, str(tmp_path / "methods"), methods=("visual-only", "mmap-all"),
                     seeds=(0,), shots=(2,), grid=grid, paper=str(published), progress=False)
    report = run_grid(cfg)
    runs = Path(report["runs_dir"])
    val = json.loads((runs / "splits" / "validation.json").read_text())
    test = json.loads((runs / "splits" / "classify-k2-s0.json").read_text())
    for task in val["tasks"]:  # the choice never reads a test image
        seen = {it["image"] for it in val["tasks"][task]["train"] + val["tasks"][task]["test"]}
        assert not seen & {it["image"] for it in test["tasks"][task]["test"]}
    assert set(report["chosen"]) == {"visual-only", "mmap-full"}  # an ablation is not chosen: MmAP full is
    for method, chosen_by in (("visual-only", "visual-only"), ("mmap-all", "mmap-full")):
        c = report["chosen"][chosen_by]
        assert c["complete"] and c["best"] == max(c["validation"], key=c["validation"].get)
        rec = report["tested"][method]["2/0"]
        assert Point(**rec["point"]).key == c["best"]
    assert "mmap-full" not in report["tested"]  # chosen to give its ablation a point, not tested
    md = (tmp_path / "methods.md").read_text()
    assert "| visual-only prompts (VPT-style) |" in md and "| 25.0 |" in md and "(mmap-full's) |" in md
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(grid_module, "train_multitask", no_training)
    again = run_grid(cfg)  # resumed from the run dirs
    assert again["chosen"] == report["chosen"] and again["tested"] == report["tested"]


    # a fresh machine: the published page alone restores every run, and nothing trains again
    page = tmp_path / "methods.json"
    fresh = run_grid(replace(cfg, runs_dir=str(tmp_path / "fresh"), restore=str(page)))
    assert fresh["restored"] == {"from": str(page), "runs": 6, "data_checked": True}  # 4 choices, 2 tests
    assert fresh["data"] == report["data"] and fresh["missing"] == []
    for method, c in report["chosen"].items():
        assert fresh["chosen"][method]["validation"] == c["validation"] and fresh["chosen"][method]["best"] == c["best"]
        for key, run in c["runs"].items():
            assert fresh["chosen"][method]["runs"][key] == {**run, "restored_from": str(page)}
    assert fresh["tested"]["mmap-all"]["2/0"] == {**report["tested"]["mmap-all"]["2/0"], "restored_from": str(page)}
    assert "6 run(s) restored from" in (tmp_path / "methods.md").read_text()

    # an older page (choice means only, no data digest) restores the means and says its data were not checked
    old = json.loads(page.read_text())
    old.pop("data")
    for c in old["chosen"].values():
        c.pop("runs")
    page.write_text(json.dumps(old))
    older = run_grid(replace(cfg, runs_dir=str(tmp_path / "older"), restore=str(page)))
    assert older["restored"]["data_checked"] is False
    assert {m: c["validation"] for m, c in older["chosen"].items()} == \
        {m: c["validation"] for m, c in report["chosen"].items()}
    assert "data were not checked" in (tmp_path / "methods.md").read_text()

    # refused, with nothing written, when the settings or the validation data differ
    for field, value, says in (("settings", {**old["settings"], "template": "a {}"}, "differs in ['template']"),
                               ("data", {"validation_digest": "0" * 64}, "validation split differs")):
        page.write_text(json.dumps({**old, field: value}))
        with pytest.raises(ValueError, match=re.escape(says)):
            run_grid(replace(cfg, runs_dir=str(tmp_path / field), restore=str(page)))
        assert not (tmp_path / field / "choose").exists()
    page.write_text("{}")  # the command: one line naming the file, no stack trace
    with pytest.raises(SystemExit) as exited:
        main(["method-grid", "--cache", str(cache), "--pretrained", "none", "--model", TINY_MODEL,
              "--runs-dir", str(tmp_path / "bad"), "--restore", str(page), "--no-progress"])
    assert exited.value.code == 2 and f"{page}: not a method-grid page" in capsys.readouterr().err


def test_method_grid_publishes_after_every_run_so_a_lost_machine_loses_only_the_run_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.studies.method_grid as grid_module
    from training.studies.method_grid import GridConfig, Point, run_grid

    real, started = grid_module.train_multitask, []

    def machine_lost_on_the_third_run(*args, **kwargs):
        started.append(1)
        if len(started) == 3:
            raise KeyboardInterrupt  # the session's machine goes away mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(grid_module, "train_multitask", machine_lost_on_the_third_run)
    cache = write_toy_cache(tmp_path / "cache", classes=COLOURS, per_class=8)
    grid = (Point("sgd", 0.0035, 1, "small"), Point("adamw", 0.05, 1, "small"))
    cfg = GridConfig(str(cache), "none", TINY_MODEL, str(tmp_path / "methods"), methods=("visual-only",),
                     seeds=(0,), shots=(2,), grid=grid, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg)
    page = json.loads((tmp_path / "methods.json").read_text())  # written after the second run, before the third
    c = page["chosen"]["visual-only"]
    assert c["complete"] and sorted(c["runs"]) == sorted(p.key for p in grid)
    assert page["tested"] == {} and page["missing"] == [f"test visual-only at {c['best']}, k=2 seed=0"]
    best = next(p for p in grid if p.key == c["best"])  # an untested row names its recipe as a tested one does
    assert f"| visual-only prompts (VPT-style) | {best.label()} | — | 0 |" in (tmp_path / "methods.md").read_text()

    started.clear()
    fresh = run_grid(replace(cfg, runs_dir=str(tmp_path / "fresh"), restore=str(tmp_path / "methods.json")))
    assert len(started) == 1 and fresh["missing"] == [] and list(fresh["tested"]["visual-only"]) == ["2/0"]


def test_method_grid_tests_seed_major_so_a_budget_leaves_every_method_a_comparable_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.studies.method_grid as grid_module
    from training.studies.method_grid import GridConfig, Point

    order: list[tuple[str, int, int]] = []

    def fake_point(cfg, backbone, method, point, split_file, run_dir, shots, seed, tensors):
        order.append((method, shots, seed))
        return {"mean": {"sgd": 0.2, "adamw": 0.3}[point.optimizer]}

    monkeypatch.setattr(grid_module, "train_point", fake_point)
    monkeypatch.setattr(grid_module, "emoji_split", lambda *a: None)
    monkeypatch.setattr(grid_module, "write_split", lambda *a: None)
    grid = (Point("sgd", 0.0035, 1, "small"), Point("adamw", 0.05, 1, "small"))
    cfg = GridConfig(str(tmp_path), "none", TINY_MODEL, methods=("visual-only", "mmap-all"), seeds=(0, 1),
                     shots=(4, 16), grid=grid)
    chosen, tested, missing = grid_module._sweep(cfg, None, tmp_path, tmp_path / "val.json", ["a"], lambda: True,
                                                 lambda: None)
    assert missing == [] and chosen["mmap-full"]["best"] == grid[1].key
    assert order[4:] == [(m, k, seed) for seed in (0, 1) for m in ("visual-only", "mmap-all") for k in (4, 16)]


def test_without_takes_a_task_out_of_a_partition() -> None:
    assert loo.without([["a", "b"], ["c"]], "c") == [["a", "b"]]
    assert loo.without([["b", "a"], ["c", "d"]], "a") == [["b"], ["c", "d"]]


def test_method_grid_command_passes_its_options_to_the_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.studies.method_grid as grid_module

    seen = {}

    def fake_grid(cfg):
        seen["cfg"] = cfg
        return {"settings": {"model": cfg.model, "backbone_fingerprint": "f", "template": "{}", "grid": []},
                "command": cfg.command, "machine": "m", "missing": [], "shots": [], "chosen": {}, "methods": [],
                "tested": {}, "paper": {}}

    monkeypatch.setattr(grid_module, "run_grid", fake_grid)
    assert main(["method-grid", "--cache", str(tmp_path), "--pretrained", "none", "--methods", "visual-only",
                 "mmap-all", "--shots", "4", "--budget-minutes", "30", "--seeds", "1"]) == 0
    cfg = seen["cfg"]
    assert cfg.methods == ("visual-only", "mmap-all") and cfg.shots == (4,) and cfg.seeds == [1]
    assert cfg.budget_minutes == 30 and cfg.grid == grid_module.GRID


def test_split_digest_follows_the_image_bytes_not_where_the_cache_lives(tmp_path: Path) -> None:
    import shutil

    from training.splits import split_digest

    cache = write_toy_cache(tmp_path / "cache", classes=COLOURS)
    digest = split_digest(emoji_split(cache, 2, 0))
    moved = shutil.copytree(cache, tmp_path / "elsewhere")
    assert split_digest(emoji_split(moved, 2, 0)) == digest
    split = emoji_split(moved, 2, 0)
    image = Path(split.root) / next(iter(split.tasks.values())).train[0].image
    image.write_bytes(image.read_bytes() + b"\0")
    assert split_digest(split) != digest
