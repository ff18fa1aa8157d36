"""`mmserve-train ship` on a toy prepared cache and a fake open_clip_train run of the tiny model: fp16 weights-only
export, a registry that load_registry accepts with the exported backbone, a model card and README naming the numbers."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.builders import load_registry
from mmserve.registry import load_grouping_weights, read_manifest
from training.cli import main
from training.results import write_toy_cache

LOG = """\
2026-11-23,10:00:00 | INFO | Running with a single process. Device cpu.
2026-11-23,10:00:01 | INFO | Start epoch 0
2026-11-23,10:10:00 | INFO | Train Epoch: 0 [ 40/40 (100%)] Batch (t): 1.0, LR: 0.0005 Loss: 3.5000 (3.9000)
2026-11-23,10:10:30 | INFO | Eval Epoch: 1 image_to_text_mean_rank: 10.0\ttext_to_image_R@1: 0.1
2026-11-23,10:10:31 | INFO | Start epoch 1
2026-11-23,11:00:00 | INFO | Running with a single process. Device cpu.
2026-11-23,11:00:01 | INFO | Start epoch 1
2026-11-23,11:20:00 | INFO | Train Epoch: 1 [ 40/40 (100%)] Batch (t): 1.0, LR: 0.0004 Loss: 3.0000 (3.2000)
2026-11-23,11:20:30 | INFO | Eval Epoch: 2 [ 10 / 20]\tClip Loss: 2.1
2026-11-23,11:20:40 | INFO | Eval Epoch: 2 image_to_text_mean_rank: 8.0\ttext_to_image_R@1: 0.2
2026-11-23,11:20:41 | INFO | Start epoch 2
2026-11-23,11:40:00 | INFO | Train Epoch: 2 [ 20/40 (50%)] Batch (t): 1.0, LR: 0.0003 Loss: 2.0000 (2.2000)
"""


def fake_pretraining(cache: Path) -> Path:
    """An open_clip_train run folder of the tiny model: epoch_2.pt (with optimizer state), params.txt, out.log."""
    run = cache / "pretrain" / "logs" / "pretrain-tiny"
    (run / "checkpoints").mkdir(parents=True)
    model = load_backbone(BackboneSpec(TINY_MODEL, seed=1)).model
    ckpt = run / "checkpoints" / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "pretrain-tiny", "optimizer": {"state": {0: torch.zeros(3)}},
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    (run / "params.txt").write_text("batch_size: 4\nepochs: 3\nlr: 0.0005\nname: pretrain-tiny\nwd: 0.1\n"
                                    "warmup: 200\nworkers: 1\ndevice: cpu\nprecision: fp32\nseed: 0\nopt: adamw\n"
                                    "lr_scheduler: cosine\naug_cfg: {'scale': (0.7, 1.0)}\n")
    (run / "out.log").write_text(LOG)
    (cache / "pretrain" / "run.log").write_text("[pretrain] open_clip_train --model mmserve-tiny --epochs 3\n")
    return ckpt


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """One ship of the toy cache: returns (models dir, checkpoint, argv, report)."""
    root = tmp_path_factory.mktemp("ship")
    cache = write_toy_cache(root / "cache")
    ckpt = fake_pretraining(cache)
    out = root / "models"
    argv = ["ship", "--cache", str(cache), "--checkpoint", str(ckpt), "--out", str(out), "--model", TINY_MODEL,
            "--shots", "2", "--epochs", "1", "--fuse-epochs", "1", "--group-steps", "2", "--group-every", "1",
            "--tags", "--no-progress", "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0",
            "--source-rows", "4", "--fuse-head-lr", "0.01"]
    assert main(argv) == 0
    return out, ckpt, argv, json.loads((out / "ship.json").read_text())


def test_backbone_is_exported_fp16_weights_only(shipped):
    out, ckpt, _, report = shipped
    weights = out / "backbone" / f"{TINY_MODEL}.safetensors"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["dtype"] == "float16" and f.metadata()["epoch"] == "2"
        assert sorted(f.keys()) == sorted(k[len("module."):] for k in state)
        assert all(f.get_tensor(k).dtype in (torch.float16, torch.int64) for k in f.keys())
    assert report["backbone"]["epoch"] == 2 and report["backbone"]["bytes"] == weights.stat().st_size


def test_registry_loads_with_the_exported_backbone(shipped):
    out, _, _, report = shipped
    backbone = load_backbone(BackboneSpec(TINY_MODEL, pretrained=str(out / "backbone" / f"{TINY_MODEL}.safetensors")))
    manifest = read_manifest(out / "registry")
    assert manifest.backbone.fingerprint == backbone.fingerprint == report["backbone"]["fingerprint"]
    registry = load_registry(out / "registry", backbone)  # fingerprint and every tensor shape checked
    kinds = {t.name: (t.kind, t.head) for t in registry.manifest.tasks}
    assert kinds == {"noto": ("classify", None), "fluent_mono": ("classify", None),
                     "emoji_subgroup": ("fuse", "multiclass"), "emoji_tags": ("fuse", "multilabel")}
    assert registry.manifest.groups and {t for g in registry.manifest.groups for t in g.tasks} == {"noto",
                                                                                                    "fluent_mono"}
    for group in registry.manifest.groups:  # the grouping run's record ships with its group (add-task reads it)
        assert load_grouping_weights(out / "registry", group), group.name
    assert report["registry"]["served_equals_trainer"]  # the served path predicts what the trainers evaluated
    rows = report["registry"]["eval"].values()
    assert rows and all(r["trainer_score"] is not None and r["score"] == pytest.approx(r["trainer_score"])
                        for r in rows)


def test_model_card_and_readme_name_the_numbers_and_commands(shipped):
    out, ckpt, argv, report = shipped
    card = (out / "backbone" / "MODEL_CARD.md").read_text()
    zero = report["zero_shot"]["per_style"]
    assert set(zero) == {"noto", "fluent_mono"}
    header = next(line for line in card.splitlines() if line.startswith("| noto | fluent_mono | mean |"))
    values = card.splitlines()[card.splitlines().index(header) + 2]
    mean = report["zero_shot"]["mean"]
    assert values == f"| {100 * zero['noto']:.1f} | {100 * zero['fluent_mono']:.1f} | {100 * mean:.1f} |"
    assert "Epochs: 2 completed (of 3 planned); steps: 20 (10 per epoch" in card
    assert "Wall time: 31.2 min over 2 session(s)" in card  # out.log cut at epoch 2's end, resumed session included
    assert f"mmserve-train pretrain --cache {ckpt.parents[4]} --epochs 3 --name pretrain-tiny --batch-size 4" in card
    assert "open_clip_train --model mmserve-tiny --epochs 3" in card
    for licence in ("public domain", "GPL-2", "CC-BY-SA-4.0", "Apache-2.0", "MIT"):
        assert licence in card
    readme = (out / "README.md").read_text()
    assert "mmserve-train " + shlex.join(argv) in readme
    assert "MmAP recipe: adamw lr 0.01, weight decay 0.0, 1 epochs; b = 4 prompt tokens per layer, source prompt " \
           "m x n = 4 x 8 (chosen on a validation split" in readme
    assert report["settings"]["fuse_head_lr"] == 0.01
    manifest = json.loads((out / "registry" / "manifest.json").read_text())
    assert {t["prompt_config"]["source_rows"] for t in manifest["tasks"] if t["kind"] == "classify"} == {4}
    for name, ev in report["registry"]["eval"].items():
        assert f"| {name} | {ev['kind']} | {ev['metric']} | {100 * ev['score']:.1f} |" in readme


def test_ship_from_the_exported_file_reuses_the_runs(shipped, tmp_path: Path, monkeypatch):
    import training.mmap_trainer as mmap_trainer  # where the trainers take their steps
    import training.mope_trainer as mope_trainer

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mmap_trainer, "multitask_step", must_not_train)  # MmAP training steps
    monkeypatch.setattr(mmap_trainer, "task_affinity", must_not_train)  # the grouping: restored, not remeasured
    monkeypatch.setattr(mope_trainer, "_loss", must_not_train)  # MoPE training steps (fusion and tags)
    out, _, argv, report = shipped
    again = list(argv)
    again[again.index("--checkpoint") + 1] = str(out / "backbone" / f"{TINY_MODEL}.safetensors")
    again[again.index("--out") + 1] = str(tmp_path / "models")
    assert main(again) == 0
    second = json.loads((tmp_path / "models" / "ship.json").read_text())
    assert second["backbone"]["fingerprint"] == report["backbone"]["fingerprint"]
    assert second["runs_dir"] == report["runs_dir"] and second["registry"]["eval"] == report["registry"]["eval"]


def test_template_is_chosen_on_train_images_and_recorded(shipped):
    out, _, _, report = shipped
    choice = report["zero_shot"]["template_choice"]
    assert report["zero_shot"]["template"] == choice["template"] == report["settings"]["template"]
    assert choice["scores"][choice["template"]] == max(choice["scores"].values())
    assert "k-shot TRAIN images (never the test split)" in (out / "backbone" / "MODEL_CARD.md").read_text()


def test_examples_are_one_held_out_identity_per_style_with_served_answers(shipped):
    out, _, _, report = shipped
    ex = json.loads((out / "examples" / "expected.json").read_text())
    assert ex == report["examples"] and set(ex["classify"]) == {"noto", "fluent_mono"}
    split = json.loads(Path(report["registry"]["splits"]["classify"]).read_text())
    for style, rec in ex["classify"].items():
        test_stems = {Path(it["image"]).stem for it in split["tasks"][style]["test"]}
        assert ex["hexcode"] in test_stems  # held out: from the test split, in every style
        assert (out / "examples" / rec["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert rec["status"] == 200 and rec["answer"]["task"] == style and len(rec["answer"]["top_k"]) == 3
    assert "## Held-out examples" in (out / "README.md").read_text()


def test_the_card_command_keeps_a_continued_stage_init_data_and_augmentation(tmp_path):
    from training.model_card import wrapper_command

    cache = tmp_path / "cache"
    base = {"epochs": "3", "name": "stage2", "lr": "0.0002", "warmup": "50", "batch_size": "128", "workers": "1",
            "device": "cpu", "precision": "fp32", "wd": "0.1", "seed": "0", "pretrained": "",
            "train_data": str(cache / "pretrain" / "train.csv"),
            "aug_cfg": "{'scale': (0.7, 1.0), 'color_jitter': (0.3, 0.3, 0.3, 0.05), 'color_jitter_prob': 0.5, "
                       "'gray_scale_prob': 0.2}"}
    plain = wrapper_command(base, str(cache))
    assert plain == f"mmserve-train pretrain --cache {cache} --epochs 3 --name stage2 --lr 0.0002 --warmup 50"
    stage2 = base | {"pretrained": "models/backbone/w.safetensors",
                     "train_data": str(cache / "pretrain" / "train_classwords.csv"),
                     "aug_cfg": base["aug_cfg"].replace("(0.7, 1.0)", "(0.5, 1.0)").replace("0.2}", "0.4}")}
    assert wrapper_command(stage2, str(cache)) == plain + (
        f" --pretrained models/backbone/w.safetensors --train-data {cache}/pretrain/train_classwords.csv --aug-cfg "
        "'scale=(0.5,1.0)' 'color_jitter=(0.3,0.3,0.3,0.05)' color_jitter_prob=0.5 gray_scale_prob=0.4")


def test_the_card_names_a_stage_caption_file_from_what_prepare_recorded():
    from training.model_card import stage_data_lines

    pretrain = {"caption_sets": {"train_classwords.csv": {"pairs": 46250, "about": "class words added"}}}
    assert stage_data_lines("", pretrain) == [] and stage_data_lines("/c/pretrain/train.csv", pretrain) == []
    assert stage_data_lines("/c/pretrain/train_classwords.csv", pretrain)[-1] == (
        "The last stage trained on `/c/pretrain/train_classwords.csv` (46250 caption pairs: class words added).")
    assert "recorded nowhere else" in stage_data_lines("/data/mine.csv", pretrain)[-1]


def test_a_continued_stage_records_the_stage_it_started_from(shipped, tmp_path, capsys):
    out, ckpt, argv, first = shipped
    again = tmp_path / "models"
    shutil.copytree(out, again)  # stage 1 shipped here; stage 2 ships over it, reading its ship.json first
    stage1 = again / "ship.json"
    stage1_bytes = stage1.read_bytes()
    argv2 = [a if a != str(out) else str(again) for a in argv] + ["--continued-from", str(stage1)]
    assert main(argv2) == 0
    report = json.loads((again / "ship.json").read_text())
    assert report["earlier_stage"]["backbone"]["fingerprint"] == first["backbone"]["fingerprint"]
    assert report["stage"] == 2 and first["stage"] == 1 and report["earlier_stage"]["stage"] == 1
    # ship keeps stage 1's report itself (nothing under models/ by hand), byte for byte, and lists it
    assert report["earlier_stage"]["kept_as"] == "backbone/stage1.ship.json"
    assert (again / "backbone" / "stage1.ship.json").read_bytes() == stage1_bytes
    assert "`backbone/stage1.ship.json`" in (again / "README.md").read_text()
    assert report["commands"][:len(first["commands"])] == first["commands"]  # stage 1 first: it makes stage 2's init
    assert report["commands"][-1].endswith(f"--continued-from {stage1}")
    card = (again / "backbone" / "MODEL_CARD.md").read_text()
    assert "Continued from earlier weights (stage 1, recorded in `models/backbone/stage1.ship.json`)" in card
    assert first["backbone"]["sha256"] in card
    bad = tmp_path / "not-a-report.json"
    bad.write_text("{}")
    assert main([*argv2[:-1], str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
