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


def test_a_cell_shows_its_spread_whenever_it_has_several_seeds():
    from training.results.markdown import _pct

    tie = {"scores": {"noto": {"mean": 0.1724, "std": 0.0, "values": [0.1724, 0.1724, 0.1724]}}}
    assert _pct(tie, "noto") == "17.2 ± 0.0"  # three seeds scoring alike, not one value
    assert _pct({"mean": {"mean": 0.1724, "std": 0.0}, "seeds_done": [0, 1]}, "mean") == "17.2 ± 0.0"
    assert _pct({"mean": {"mean": 0.206, "std": 0.0}, "seeds_done": []}, "mean") == "20.6"  # zero-shot: no seed
    assert _pct({"scores": {"noto": {"mean": 0.206, "std": 0.0, "values": [0.206]}}}, "noto") == "20.6"
    assert _pct({"scores": {}}, "noto") == "—"


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

    import training.results.cells as results  # where the cells call the trainers

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
    import training.results.cells as results  # where the cells call the trainers

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


def test_the_table_is_written_after_every_cell_so_a_lost_machine_loses_only_the_cell_in_flight(
        toy_cache: Path, tmp_path: Path, monkeypatch):
    import training.results.cells as results  # where the cells call the trainers

    real_linear = results.run_linear

    def machine_lost(*args, **kwargs):
        raise KeyboardInterrupt  # the session's machine goes away mid-run

    monkeypatch.setattr(results, "run_linear", machine_lost)
    out = tmp_path / "r"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
            "--methods", "zero-shot", "mmap-full", "image-only", *TINY]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    page = json.loads(out.with_suffix(".json").read_text())  # written after mmap-full, before image-only
    assert "mmap-full k=2 seed=0" not in page["missing"] and "image-only k=2 seed=0" in page["missing"]
    assert page["session"]["ran"] == ["zero-shot", "mmap-full k=2 seed=0"]
    assert "| MmAP" in out.with_suffix(".md").read_text() and out.with_suffix(".png").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a published run was trained again")

    monkeypatch.setattr(results, "run_linear", real_linear)
    monkeypatch.setattr(results, "train_multitask", must_not_train)
    fresh = tmp_path / "fresh"
    argv2 = [*argv, "--restore", str(out.with_suffix(".json"))]
    argv2[argv2.index(str(out))] = str(fresh)
    argv2[argv2.index(str(tmp_path / "runs"))] = str(tmp_path / "fresh-runs")
    assert main(argv2) == 0
    again = json.loads(fresh.with_suffix(".json").read_text())
    assert again["session"]["ran"] == ["zero-shot", "image-only k=2 seed=0"]  # zero-shot: the data check
    assert again["session"]["skipped"] == ["mmap-full k=2 seed=0"]
    assert not {"mmap-full k=2 seed=0", "image-only k=2 seed=0"} & set(again["missing"])


def _ship_report(settings: dict, styles: list[str]) -> dict:
    """A ship.json as `ship` writes it (only the keys the table reads): one group, a fusion entry."""
    evals = {t: {"kind": "classify", "score": 0.25 + 0.1 * i, "trainable_params": 100, "params_used": 130}
             for i, t in enumerate(styles)}
    evals["emoji_subgroup"] = {"kind": "fuse", "score": 0.625, "trainable_params": 999, "params_used": 999}
    return {"settings": {**{k: settings[k] for k in ("backbone_fingerprint", "styles", "template")}, "shots": 2,
                         "seed": 0, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0, "epochs": 10,
                         "mmap_shape": [4, 4, 256], "fuse_epochs": 10, "fuse_head_lr": 0.01,
                         "complementary": "minilm", "experts": 16},
            "registry": {"eval": evals, "groups": [styles], "grouping_verdict": "n/a"}}


def test_the_shipped_cell_is_added_as_reference_rows_only_when_comparable(toy_cache: Path, tmp_path: Path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "r"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(runs),
            "--methods", "zero-shot", *TINY]
    assert main(argv) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    ship = tmp_path / "ship.json"
    ship.write_text(json.dumps(_ship_report(settings, settings["styles"])))
    assert main([*argv, "--shipped", str(ship)]) == 0
    md = out.with_suffix(".md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **shipped registry**: MmAP full"))
    # noto 25.0, fluent_mono 35.0, mean 30.0; params: 2 tasks x 100 + one group's 30
    assert "| 25.0 | 35.0 | 30.0 | seed 0 only | 230 |" in row and "adamw lr 0.01, 10 epochs" in row
    fuse = next(line for line in md.splitlines() if line.startswith("| **shipped registry**: MoPE k=16, minilm"))
    assert "| 62.5 |" in fuse and fuse.endswith("| 999 |")
    assert "## The shipped registry in this table" in md
    other = _ship_report(settings, settings["styles"])
    other["settings"]["backbone_fingerprint"] = "0" * 32
    ship.write_text(json.dumps(other))
    assert main([*argv, "--shipped", str(ship)]) == 2
    assert "backbone_fingerprint" in capsys.readouterr().err


def test_a_published_table_restores_into_a_fresh_runs_dir_only_when_settings_and_data_match(
        toy_cache: Path, tmp_path: Path, monkeypatch, capsys):
    import training.results.cells as results  # where the cells call the trainers

    out = tmp_path / "first"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
            "--methods", "zero-shot", "mmap-full", "image-only", *TINY]
    assert main(argv) == 0
    first = json.loads(out.with_suffix(".json").read_text())

    def must_not_train(*args, **kwargs):
        raise AssertionError("a published run was trained again")

    monkeypatch.setattr(results, "train_multitask", must_not_train)
    monkeypatch.setattr(results, "run_linear", must_not_train)
    monkeypatch.setattr(results, "task_affinity", must_not_train)  # the grouping is restored, not recomputed
    again = tmp_path / "again"
    argv2 = ["results", "--cache", str(toy_cache), "--out", str(again), "--runs-dir", str(tmp_path / "fresh"),
             "--methods", "zero-shot", "mmap-full", "image-only", "--restore", str(out.with_suffix(".json")), *TINY]
    assert main(argv2) == 0
    second = json.loads(again.with_suffix(".json").read_text())
    assert second["session"]["ran"] == ["zero-shot"]  # measured again: the data check
    assert len(second["session"]["restored"]) == 2 and "restored from" in again.with_suffix(".md").read_text()
    assert second["session"]["skipped"] == ["mmap-full k=2 seed=0", "image-only k=2 seed=0"]
    for before, after in zip(first["cells"], second["cells"], strict=True):
        assert after.get("scores") == before.get("scores") and after["complete"] == before["complete"]
    assert second["groupings"][0]["groups"] == first["groupings"][0]["groups"]
    assert second["machines"] == first["machines"]

    # other settings, or data that measure differently, restore nothing
    tampered = json.loads(out.with_suffix(".json").read_text())
    zero = next(c for c in tampered["cells"] if c["method"] == "zero-shot")
    zero["runs"]["None"]["scores"]["noto"] += 0.5
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    argv3 = [a if a != str(out.with_suffix(".json")) else str(bad) for a in argv2]
    argv3[argv3.index(str(tmp_path / "fresh"))] = str(tmp_path / "fresh2")
    assert main(argv3) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "data differ" in err and "'noto'" in err
    assert not (tmp_path / "fresh2" / "classify" / "mmap-full").exists()
    argv4 = [*argv2, "--epochs", "2"]
    argv4[argv4.index(str(tmp_path / "fresh"))] = str(tmp_path / "fresh3")
    assert main(argv4) == 2
    assert "other settings" in capsys.readouterr().err


def test_the_paper_head_row_under_the_paper_recipe(toy_cache: Path, tmp_path: Path):
    """--fuse-recipe mope-paper trains the MoPE rows with it (12 epochs, step decay, RandAug), keyed apart from the
    default recipe's runs; the `-image` rows train the paper's head and say so."""
    out = tmp_path / "results"
    argv = ["results", "--cache", str(toy_cache), "--out", str(out), "--methods", "mope-k16-clip-image",
            "--fuse-recipe", "mope-paper", *TINY]
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["fuse_recipe"] == "mope-paper"
    (run,) = next(c for c in report["cells"] if c["method"] == "mope-k16-clip-image")["runs"].values()
    assert (run["head_input"], run["recipe"]) == ("image", "mope-paper")
    config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert config["recipe"] == "mope-paper" and config["randaug"] is True and config["mope"]["head_input"] == "image"
    assert (config["optim"]["epochs"], config["optim"]["schedule"], config["optim"]["decay_epochs"]) == (12, "step",
                                                                                                       [2, 5])
    md = out.with_suffix(".md").read_text()
    assert "recipe `mope-paper`" in md and "| MoPE k=16, CLIP text, paper's head (image only) |" in md
    default = tmp_path / "default"
    assert main(["results", "--cache", str(toy_cache), "--out", str(default), "--methods", "fusion-zero-shot",
                 *TINY]) == 0
    settings = json.loads(default.with_suffix(".json").read_text())["settings"]
    assert "fuse_recipe" not in settings  # the default recipe keeps the published tables' settings (and runs dirs)
    assert report["runs_dir"] != json.loads(default.with_suffix(".json").read_text())["runs_dir"]
