"""`mmserve-train results` on a toy prepared cache and the tiny backbone: every row of the table is present
(missing cells marked, not omitted), Markdown/JSON/PNG are written, and a second invocation skips finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmserve.backbone import TINY_MODEL
from training.cli import main
from training.results import METHODS, emoji_split, fusion_task_split, grouping_verdict, style_of, write_toy_cache

TINY = ["--model", TINY_MODEL, "--pretrained", "none", "--seeds", "0", "--shots", "2", "--epochs", "1",
        "--fuse-epochs", "1", "--group-steps", "2", "--group-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> Path:
    """Two styles (one colour, one monochrome) x 3 classes x 6 identities, in prepare's layout."""
    return write_toy_cache(tmp_path_factory.mktemp("results") / "cache")


def test_emoji_split_tests_on_the_heldout_identities(toy_cache: Path):
    held = json.loads((toy_cache / "tasks" / "heldout_emoji.json").read_text())["classes"]
    split = emoji_split(toy_cache, 2, 0)
    assert list(split.tasks) == ["noto", "fluent_mono"]
    for task in split.tasks.values():
        for cid, parts in held.items():
            test = sorted(Path(it.image).stem for it in task.test if it.label == cid)
            train = [Path(it.image).stem for it in task.train if it.label == cid]
            assert test == sorted(parts["test"])
            assert len(train) == 2 and set(train) <= set(parts["train"])
    again = emoji_split(toy_cache, 2, 0)
    assert {n: t.train for n, t in again.tasks.items()} == {n: t.train for n, t in split.tasks.items()}
    fusion = fusion_task_split(toy_cache, 2, 0, styles=["noto"]).tasks["emoji_subgroup"]
    assert {style_of(it.image) for it in fusion.train + fusion.test} == {"noto"}
    assert sorted(it.label for it in fusion.train) == sorted(list(held) * 2)  # k drawn after the style filter
    assert {Path(it.image).stem for it in fusion.test} == {h for p in held.values() for h in p["test"]}


def test_grouping_verdict_names_colour_vs_monochrome():
    styles = ["noto", "twemoji", "fluent_flat", "openmoji_line", "fluent_mono"]
    assert grouping_verdict([["noto", "twemoji", "fluent_flat"], ["fluent_mono", "openmoji_line"]],
                            styles).startswith("yes")
    assert grouping_verdict([["noto", "fluent_mono"], ["twemoji", "fluent_flat", "openmoji_line"]],
                            styles).startswith("no")
    assert grouping_verdict([["noto", "twemoji", "fluent_flat"], ["openmoji_line"], ["fluent_mono"]], styles) == (
        "partly: no group mixes them; the colour styles share one group, the monochrome ones are split")
    assert grouping_verdict([["noto"], ["twemoji", "fluent_flat"], ["openmoji_line"], ["fluent_mono"]],
                            styles).startswith("partly: no group mixes colour and monochrome, but both")
    assert grouping_verdict([["a", "b"]], ["a", "b"]).startswith("n/a")


def test_results_writes_every_row_and_a_rerun_skips_finished_runs(toy_cache: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "docs" / "results"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
            "--methods", "mmap-full", "mope-k4-clip", *TINY]
    assert main(argv) == 0
    md = out.with_suffix(".md").read_text()
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "mmserve-train results --cache" in md and report["command"].startswith("mmserve-train results")
    cells = {(c["method"], c["shots"]): c for c in report["cells"]}
    assert set(cells) == {(m, 2) for m in METHODS}  # every row, measured or not
    for m in METHODS.values():
        assert f"| {m.label} |" in md
    full, mope = cells[("mmap-full", 2)], cells[("mope-k4-clip", 2)]
    assert full["complete"] and set(full["scores"]) == {"noto", "fluent_mono"} and full["trainable_params"] > 0
    assert mope["complete"] and set(mope["scores"]) == {"all", "noto", "fluent_mono"}
    assert 0 < mope["routing_entropy"]["mean"] <= mope["routing_entropy"]["max"] + 1e-6
    assert f"{100 * full['scores']['noto']['mean']:.1f}" in md
    # rows not run are present and marked missing, and listed
    text_only = next(line for line in md.splitlines() if line.startswith("| text-only prompts"))
    assert "—" in text_only and "(missing)" in text_only
    assert "text-only k=2 seed=0" in report["missing"] and "- text-only k=2 seed=0" in md
    assert "mmap-full k=2 seed=0" not in report["missing"]
    assert report["groupings"][0]["groups"] == full["runs"]["0"]["groups"]
    assert report["session"]["ran"] == ["mmap-full k=2 seed=0", "mope-k4-clip k=2 seed=0"]

    import training.results as results

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(results, "train_multitask", must_not_train)
    monkeypatch.setattr(results, "train_mope", must_not_train)
    assert main(argv) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["session"]["ran"] == [] and again["session"]["failed"] == []
    assert again["session"]["skipped"] == ["mmap-full k=2 seed=0", "mope-k4-clip k=2 seed=0"]
    assert again["cells"] == report["cells"]


def test_a_failed_cell_is_reported_and_other_settings_refuse_the_runs_dir(toy_cache: Path, tmp_path: Path,
                                                                          monkeypatch, capsys):
    import training.results as results

    def broken(*args, **kwargs):
        raise RuntimeError("no luck")

    monkeypatch.setattr(results, "run_linear", broken)
    out = tmp_path / "r"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
            "--methods", "image-only", "zero-shot", *TINY]
    assert main(argv) == 1  # the table is still written
    md = out.with_suffix(".md").read_text()
    assert "image-only k=2 seed=0: RuntimeError: no luck" in md
    zero = next(line for line in md.splitlines() if line.startswith("| zero-shot |"))
    assert "—" not in zero.split("|")[2]
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_grouping_scored_another_way_is_set_aside_with_the_cells_trained_on_it(toy_cache: Path, tmp_path: Path):
    runs, out = tmp_path / "runs", tmp_path / "r"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(runs),
            "--methods", "mmap-full", "mmap-all", *TINY]
    assert main(argv) == 0
    grouping = runs / "grouping" / "k2-s0.json"
    info = json.loads(grouping.read_text())
    assert info["centered"] is True
    del info["centered"]  # as written before grouping scores were centred
    grouping.write_text(json.dumps(info))
    assert main(argv) == 0
    again = json.loads(out.with_suffix(".json").read_text())["session"]
    assert again["ran"] == ["mmap-full k=2 seed=0"]  # mmap-all does not depend on the computed grouping
    assert again["skipped"] == ["mmap-all k=2 seed=0"]
    assert "centered" not in json.loads((runs / "stale" / "grouping" / "k2-s0.json").read_text())
    assert (runs / "stale" / "classify" / "mmap-full" / "k2-s0" / "result.json").is_file()
    assert json.loads(grouping.read_text())["centered"] is True
    assert (runs / "classify" / "mmap-full" / "k2-s0" / "result.json").is_file()
