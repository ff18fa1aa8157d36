"""`mmserve-train prepare` / `pretrain` input errors: one `error:` line naming the file, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training.pretrain as pretrain
from mmserve.errors import MmserveError
from training.cli import main
from training.prepare import emoji, sources

DOC_TRAIN_DATA = "/tmp/exp/train_classwords.csv"


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _npm_cache(cache: Path) -> Path:
    """A cache whose npm folder has every package directory (so --no-install gets past the presence check)."""
    root = sources.npm_root(cache)
    for spec in sources.NPM_PACKAGES:
        (root / sources.split_spec(spec)[0]).mkdir(parents=True, exist_ok=True)
    return root


def _caption_csv(path: Path, rows: int, header: str = "filepath\ttitle") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"/img/{i}.png\tan emoji of a dog face 🐶 {i}" for i in range(rows))])
                    + "\n", encoding="utf-8")
    return path


# 1. data sources: a missing package or a broken package data file is a one-line error naming it


def test_prepare_no_install_on_an_empty_cache_names_the_missing_packages(tmp_path: Path, capsys) -> None:
    assert main(["prepare", "--no-install", "--cache", str(tmp_path)]) == 2
    line = _one_error_line(capsys, "mmserve-train prepare: error:", "npm packages missing", "emojibase-data")
    assert str(sources.npm_root(tmp_path)) in line


def test_source_error_is_a_user_error() -> None:
    assert issubclass(sources.SourceError, MmserveError) and issubclass(sources.SourceError, RuntimeError)


def test_prepare_with_a_broken_emojibase_data_json_names_the_file(tmp_path: Path, capsys) -> None:
    root = _npm_cache(tmp_path)
    data = root / "emojibase-data" / "en" / "data.json"
    data.parent.mkdir(parents=True)
    data.write_text('[{"hexcode": "1F600",', encoding="utf-8")
    assert main(["prepare", "--no-install", "--no-sheets", "--cache", str(tmp_path)]) == 2
    _one_error_line(capsys, f"{data}: not valid JSON")


@pytest.mark.parametrize("broken", ["meta/groups.json", "icons.json", "chars.json"])
def test_broken_package_json_names_the_file(tmp_path: Path, broken: str) -> None:
    nm = tmp_path / "node_modules"
    (nm / "emojibase-data" / "en").mkdir(parents=True)
    (nm / "emojibase-data" / "meta").mkdir(parents=True)
    (nm / "emojibase-data" / "en" / "data.json").write_text("[]")
    (nm / "emojibase-data" / "meta" / "groups.json").write_text(json.dumps({"groups": {}, "subgroups": {}}))
    icons = nm / "@iconify-json" / "noto"
    icons.mkdir(parents=True)
    (icons / "icons.json").write_text(json.dumps({"icons": {}}))
    (icons / "chars.json").write_text("{}")
    path = nm / "emojibase-data" / broken if broken.startswith("meta") else icons / broken
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(sources.SourceError, match="not valid JSON") as info:
        emoji.load_emojibase(nm) if broken.startswith("meta") else emoji.IconifySet(nm, "noto")
    assert str(info.value).startswith(f"{path}: ")


# 2. pretrain --train-data is the wrapper's own option


def _documented_argv(cache: Path, train_data: str = DOC_TRAIN_DATA) -> list[str]:
    return ["--cache", str(cache), "--epochs", "3", "--name", "exp", "--lr", "2e-4", "--warmup", "50",
            "--train-data", train_data, "--pretrained", "models/backbone/w.safetensors",
            "--aug-cfg", "scale=(0.5,1.0)", "color_jitter=(0.3,0.3,0.3,0.05)", "color_jitter_prob=0.5",
            "gray_scale_prob=0.4"]


def test_documented_pretrain_command_passes_train_data_once(tmp_path: Path) -> None:
    cfg = pretrain._parse_train(_documented_argv(tmp_path))
    argv = cfg.trainer_argv()
    assert argv.count("--train-data") == 1
    assert argv[argv.index("--train-data") + 1] == DOC_TRAIN_DATA
    assert "--train-data" not in cfg.extra and cfg.train_data == Path(DOC_TRAIN_DATA)
    joined = " ".join(argv)
    for flag in ("--name exp", "--epochs 3", "--lr 0.0002", "--warmup 50", "--pretrained models/backbone/w.safetensors",
                 "--aug-cfg scale=(0.5,1.0) color_jitter=(0.3,0.3,0.3,0.05) color_jitter_prob=0.5 gray_scale_prob=0.4"):
        assert flag in joined


def _no_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached() -> None:
        raise AssertionError("the input check let the run reach open_clip_train")

    monkeypatch.setattr(pretrain, "register_model_configs", reached)


def test_pretrain_missing_train_data_is_one_error_line(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_trainer(monkeypatch)
    cache = tmp_path / "cache"
    _caption_csv(cache / "pretrain" / "train.csv", 4)  # the default CSV is fine: the given one must be checked
    missing = tmp_path / "nope.csv"
    assert main(["pretrain", *_documented_argv(cache, str(missing))]) == 2
    _one_error_line(capsys, "mmserve-train pretrain: error:", f"{missing}: --train-data file not found")


def test_pretrain_train_data_header_is_checked(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_trainer(monkeypatch)
    cache = tmp_path / "cache"
    _caption_csv(cache / "pretrain" / "train.csv", 4)
    bad = _caption_csv(tmp_path / "bad.csv", 4, header="filepath\tcaption")
    assert main(["pretrain", *_documented_argv(cache, str(bad))]) == 2
    _one_error_line(capsys, f"{bad}: header has no column 'title'")


def test_smoke_steps_slice_the_given_train_data(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    given = _caption_csv(tmp_path / "given.csv", 10)
    cfg = pretrain._parse_train(["--cache", str(cache), "--train-data", str(given), "--smoke-steps", "2",
                                 "--batch-size", "3"])
    smoke = cache / "pretrain" / "smoke.csv"
    assert cfg.train_csv == smoke and cfg.extra == []
    lines = smoke.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "filepath\ttitle" and len(lines) == 1 + 6
    assert set(lines[1:]) <= set(given.read_text(encoding="utf-8").splitlines()[1:])
    argv = cfg.trainer_argv()
    assert argv.count("--train-data") == 1 and argv[argv.index("--train-data") + 1] == str(smoke)


def test_smoke_steps_on_a_missing_train_data_names_it(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.csv"
    assert main(["pretrain", "--cache", str(tmp_path / "cache"), "--train-data", str(missing),
                 "--smoke-steps", "1"]) == 2
    _one_error_line(capsys, f"{missing}: --train-data file not found")
