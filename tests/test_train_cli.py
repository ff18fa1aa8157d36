"""`mmserve-train` command line: delegation to prepare/pretrain, backbone choice, the bad-file policy."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from mmserve.backbone import EMBEDDED_MODEL, TINY_MODEL
from training.cli import main
from training.config import PRETRAINED_ENV, BackboneConfig
from training.synthetic import write_image_task


def test_prepare_and_pretrain_get_every_argument(monkeypatch):
    seen = {}
    fake_prepare = types.ModuleType("training.prepare.__main__")
    fake_prepare.main = lambda argv: seen.setdefault("prepare", argv) and 0
    fake_pretrain = types.ModuleType("training.pretrain")
    fake_pretrain.pretrain = lambda argv: seen.setdefault("pretrain", argv) and 0
    monkeypatch.setitem(sys.modules, "training.prepare.__main__", fake_prepare)
    monkeypatch.setitem(sys.modules, "training.pretrain", fake_pretrain)
    assert main(["prepare", "--cache", "/tmp/c", "--size", "64"]) == 0
    assert main(["pretrain", "--epochs", "3", "export"]) == 0
    assert seen == {"prepare": ["--cache", "/tmp/c", "--size", "64"], "pretrain": ["--epochs", "3", "export"]}


def test_missing_pretrain_module_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "training.pretrain", None)  # as if the module were not there
    with pytest.raises(SystemExit, match="pretraining is not available"):
        main(["pretrain"])


def test_embedded_backbone_needs_a_checkpoint(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    with pytest.raises(ValueError, match="--pretrained"):
        BackboneConfig(EMBEDDED_MODEL).spec()
    assert BackboneConfig(EMBEDDED_MODEL, "none").spec().pretrained is None
    monkeypatch.setenv(PRETRAINED_ENV, "/models/clip.safetensors")
    assert BackboneConfig(EMBEDDED_MODEL).spec().pretrained == "/models/clip.safetensors"
    assert BackboneConfig(TINY_MODEL).spec().pretrained == "/models/clip.safetensors"
    monkeypatch.delenv(PRETRAINED_ENV)
    write_image_task(tmp_path, "t", {"red": "red", "blue": "blue"}, 2)
    assert main(["classify", "--root", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "--pretrained" in capsys.readouterr().err


def test_bad_file_stop_ends_the_run_naming_the_file(tmp_path: Path, capsys):
    write_image_task(tmp_path / "data", "t", {"red": "red", "blue": "blue"}, 3)
    broken = tmp_path / "data" / "t" / "red" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    args = ["split", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "s.json")]
    assert main([*args, "--on-bad-file", "stop"]) == 2
    assert str(broken) in capsys.readouterr().err and not (tmp_path / "s.json").exists()
    assert main(args) == 0
    assert str(broken) in capsys.readouterr().err and (tmp_path / "s.json").exists()
