"""`mmserve-train` command line: delegation to prepare/pretrain, backbone choice, the bad-file policy, and options
derived from the config fields they set (training.options)."""

from __future__ import annotations

import argparse
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from mmserve.backbone import EMBEDDED_MODEL, TINY_MODEL
from mmserve.prompts.mope import MoPEConfig
from training.cli import _multitask_config, _trained, build_parser, main
from training.config import PRETRAINED_ENV, BackboneConfig, OptimConfig, SplitConfig
from training.grouping import GroupingConfig
from training.mmap_trainer import MultiTaskConfig, PromptSpec
from training.mope_trainer import MOPE_OPTIONS, FuseConfig
from training.options import from_args, options_of
from training.results import METHODS, ResultsConfig
from training.ship import ShipConfig
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


def _sub(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(("command", "configs"), [
    ("classify", (MultiTaskConfig, PromptSpec, GroupingConfig, BackboneConfig, SplitConfig, OptimConfig)),
    ("fuse", (FuseConfig, BackboneConfig, SplitConfig, OptimConfig)),
    ("results", (ResultsConfig,)), ("ship", (ShipConfig,))])
def test_every_option_field_has_its_option(command: str, configs: tuple[type, ...]):
    dests = {a.dest for a in _sub(command)._actions}
    for cls in configs:
        missing = set(options_of(cls)) - dests
        if cls is FuseConfig:
            missing -= {"zero_shot_template"}  # not an option of fuse (it has no metadata there)
        assert not missing, f"{command}: {cls.__name__} fields {missing} have no option"
    if command == "fuse":
        assert set(MOPE_OPTIONS) <= dests


def test_defaults_come_from_the_configs(monkeypatch):
    monkeypatch.setenv("MMSERVE_CACHE", "/data/cache")
    parse = build_parser().parse_args
    assert _multitask_config(parse(["classify"])) == MultiTaskConfig()
    assert _multitask_config(parse(["group"])) == MultiTaskConfig(run_dir="runs/group")
    assert _trained(FuseConfig, parse(["fuse"]), mope=from_args(MoPEConfig, parse(["fuse"]), table=MOPE_OPTIONS)) \
        == FuseConfig()
    assert from_args(ResultsConfig, parse(["results"])) == ResultsConfig(cache="/data/cache")
    assert from_args(ShipConfig, parse(["ship", "--checkpoint", "c.pt"])) == ShipConfig("/data/cache", "c.pt")
    with pytest.raises(SystemExit):  # a field without a default is a required option
        parse(["ship"])


def test_options_set_their_fields():
    a = build_parser().parse_args(["classify", "--split", "s.json", "--class-names", "n.json", "--tasks", "a,b",
                                   "--prompt", "text", "--n-tokens", "3", "--grouping", "random", "--no-center",
                                   "--shots", "all", "--batch-size", "4", "--no-progress", "--no-eval-each-epoch",
                                   "--seed", "7"])
    cfg = _multitask_config(a)
    assert (cfg.split_file, cfg.class_names_file, cfg.tasks) == ("s.json", "n.json", ["a", "b"])
    assert cfg.prompt == PromptSpec("text", n_tokens=3) and cfg.grouping == GroupingConfig("random", center=False)
    assert cfg.split == SplitConfig(shots=None, seed=7) and cfg.optim == replace(OptimConfig(), batch_size=4)
    assert (cfg.progress, cfg.eval_each_epoch, cfg.seed) == (False, False, 7)
    fuse = build_parser().parse_args(["fuse", "--select", "task=noto", "--select", "kind=x", "--experts", "4"])
    assert fuse.select == {"task": "noto", "kind": "x"}
    assert from_args(MoPEConfig, fuse, table=MOPE_OPTIONS).n_experts == 4
    assert build_parser().parse_args(["fuse"]).select == {}  # the default is not shared with a parsed one


def test_methods_help_lists_every_row():
    methods = next(a for a in _sub("results")._actions if a.dest == "methods")
    assert methods.help.endswith(": " + " ".join(METHODS))


def test_fuse_takes_a_named_recipe_and_refuses_optimiser_options_beside_it(tmp_path: Path, monkeypatch):
    seen: list[FuseConfig] = []
    monkeypatch.setattr("training.mope_trainer.train_mope", lambda cfg: seen.append(cfg) or types.SimpleNamespace(
        run_dir=tmp_path))
    base = ["fuse", "--train", str(tmp_path / "t.jsonl"), "--model", TINY_MODEL, "--pretrained", "none"]
    assert main(base + ["--recipe", "mope-paper"]) == 0
    (cfg,) = seen
    assert cfg.recipe == "mope-paper" and cfg.randaug and cfg.optim.epochs == 12 and cfg.optim.schedule == "step"
    assert main(base + ["--randaug"]) == 0 and seen[-1].randaug and seen[-1].recipe is None
    with pytest.raises(SystemExit, match="--recipe mope-paper sets the optimisation; drop --epochs"):
        main(base + ["--recipe", "mope-paper", "--epochs", "3"])
