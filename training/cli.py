"""`mmserve-train`: prepare data, pretrain, draw splits, group tasks, train MmAP / MoPE prompts, evaluate.

Examples:
  mmserve-train split --root data/tasks/images --out split.json --shots 16
  mmserve-train classify --root data/tasks/images --split split.json --run-dir runs/mmap \\
      --model mmserve-vit-p12-96 --pretrained models/backbone/mmserve-vit-p12-96.safetensors
  mmserve-train classify ... --prompt text --sharing task        (CoOp-style text-only ablation)
  mmserve-train fuse --train fusion/train.jsonl --test fusion/test.jsonl --run-dir runs/mope
  mmserve-train eval --registry runs/mmap/registry --split split.json
  mmserve-train compare runs/mmap runs/text-only runs/vision-only
  mmserve-train results --cache ~/.cache/mmserve --pretrained CKPT --out docs/results --seeds 0 1 2 --shots 4 16
  mmserve-train ship --cache ~/.cache/mmserve --checkpoint CKPT --out models
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from mmserve.backbone import EMBEDDED_MODEL
from mmserve.cli_args import positive_int
from mmserve.errors import MmserveError
from mmserve.fileio import atomic_write_bytes
from mmserve.prompts import prompt_choices
from mmserve.prompts.mope import MoPEConfig
from training.config import BackboneConfig, OptimConfig, SplitConfig, mope_optim
from training.mmap_trainer import PromptSpec


def field_value(value: str) -> tuple[str, str]:
    """argparse type of --select FIELD=VALUE."""
    name, sep, wanted = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. task=noto), got {value!r}")
    return name, wanted


def _add_backbone(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default=EMBEDDED_MODEL, help=f"open_clip model name (default {EMBEDDED_MODEL})")
    g.add_argument("--pretrained", default=None,
                   help="open_clip tag or checkpoint path (default $MMSERVE_BACKBONE_PRETRAINED; 'none' = random)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_split(p: argparse.ArgumentParser, shots: int | None, test_fraction: float) -> None:
    g = p.add_argument_group("split")
    g.add_argument("--shots", type=lambda s: None if s == "all" else int(s), default=shots,
                   help=f"training samples per class, or 'all' (default {shots or 'all'}); "
                        "ignored for multi-label fusion data (every non-test sample trains)")
    g.add_argument("--test-fraction", type=float, default=test_fraction, help="per class, held out for test")
    g.add_argument("--max-test", type=int, default=None, help="cap on test samples per class")
    g.add_argument("--split-by", choices=("file", "stem"), default="file",
                   help="'stem': one file stem (identity) is on one side in every task")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--on-bad-file", choices=("skip", "stop"), default="skip",
                   help="a bad file is reported with its path, then left out (skip) or the run stops")


def _add_optim(p: argparse.ArgumentParser, d: OptimConfig) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="samples per task and step: a multi-task step draws this many from EACH task and sums "
                        "the task losses (MmAP eq. 11); an epoch is ceil(largest task / batch) steps")
    g.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)


def _add_run(p: argparse.ArgumentParser, run_dir: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=run_dir, help="where config, metrics, split and registry go")
    g.add_argument("--cache-dir", default=None, help="on-disk cache of preprocessed image tensors")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--resume", action="store_true", help="continue from the run dir's last epoch checkpoint")
    g.add_argument("--stop-after-epoch", type=int, default=None, help="leave after this epoch (resumable)")
    g.add_argument("--no-eval-each-epoch", action="store_true", help="test only after the last epoch")


def _backbone(a) -> BackboneConfig:
    return BackboneConfig(a.model, a.pretrained, a.device)


def _split(a) -> SplitConfig:
    return SplitConfig(a.shots, a.test_fraction, a.max_test, a.split_by, a.seed)


def _optim(a) -> OptimConfig:
    return OptimConfig(**{f.name: getattr(a, f.name) for f in fields(OptimConfig)})


def _tasks(value: str | None) -> list[str] | None:
    return [t for t in value.split(",") if t] if value else None


def cmd_prepare(a: argparse.Namespace) -> int:
    """Delegate to the data preparation (training.prepare)."""
    try:
        from training.prepare.__main__ import main as prepare_main
    except ImportError as exc:
        raise SystemExit(f"mmserve-train prepare: the data preparation is not available ({exc})") from None
    return int(prepare_main(a.rest) or 0)


def cmd_pretrain(a: argparse.Namespace) -> int:
    """Delegate to backbone pretraining (training.pretrain)."""
    try:
        from training.pretrain import pretrain
    except ImportError as exc:
        raise SystemExit(f"mmserve-train pretrain: backbone pretraining is not available yet ({exc})") from None
    return int(pretrain(a.rest) or 0)


def cmd_split(a: argparse.Namespace) -> int:
    """Draw a split file from an image-folder root or a fusion JSONL."""
    from training.data import BadFiles, discover_image_tasks, read_fusion_jsonl
    from training.splits import classify_split, fusion_split, read_split, validation_split, write_split

    bad = BadFiles(a.on_bad_file)
    if a.validation_of:
        split = validation_split(read_split(a.validation_of), a.validation_fraction, a.seed)
    elif a.root:
        split = classify_split(a.root, discover_image_tasks(a.root, bad, _tasks(a.tasks), a.class_names), _split(a))
    else:
        items = read_fusion_jsonl(a.train, bad)
        test = read_fusion_jsonl(a.test, bad) if a.test else None
        split = fusion_split(a.name or Path(a.train).stem, items, _split(a), test)
    write_split(a.out, split)
    for name, t in split.tasks.items():
        print(f"{name}: {len(t.classes)} classes, {len(t.train)} train, {len(t.test)} test")
    print(f"split written to {a.out}")
    return 0


def _multitask_config(a):
    from training.grouping import GroupingConfig
    from training.mmap_trainer import MultiTaskConfig

    return MultiTaskConfig(
        root=a.root, run_dir=a.run_dir, tasks=_tasks(a.tasks), split_file=a.split, class_names_file=a.class_names,
        template=a.template, zero_shot_template=a.zero_shot_template, backbone=_backbone(a), split=_split(a),
        optim=_optim(a),
        prompt=PromptSpec(a.prompt, a.sharing, a.n_tokens, a.source_rows, a.source_cols, a.depth),
        grouping=GroupingConfig(a.grouping, a.groups_file, a.n_groups, a.group_steps, a.group_every, a.similarity,
                                not a.no_center),
        on_bad_file=a.on_bad_file, seed=a.seed, cache_dir=a.cache_dir, progress=not a.no_progress,
        resume=a.resume, stop_after_epoch=a.stop_after_epoch, eval_each_epoch=not a.no_eval_each_epoch)


def cmd_classify(a: argparse.Namespace) -> int:
    """Train multi-task classification prompts (MmAP or an ablation)."""
    from training.mmap_trainer import train_multitask

    result = train_multitask(_multitask_config(a))
    print(f"run written to {result.run_dir}")
    return 0


def cmd_group(a: argparse.Namespace) -> int:
    """Only the task grouping: similarity matrix and groups, written to <run-dir>/grouping.json."""
    from mmserve.backbone import load_backbone
    from training.classify import Towers
    from training.data import BadFiles
    from training.grouping import choose_groups, task_affinity
    from training.mmap_trainer import load_or_draw_split, task_data
    from training.runs import write_json

    cfg = _multitask_config(a)
    bad = BadFiles(cfg.on_bad_file)
    towers = Towers.of(load_backbone(cfg.backbone.spec()))
    split, root = load_or_draw_split(cfg, bad)
    tasks = task_data(towers, split, root, bad, cfg.cache_dir)
    affinity = task_affinity(towers, tasks, cfg.prompt.module_config(), cfg.grouping, cfg.optim.lr,
                             cfg.optim.batch_size, cfg.template, cfg.seed, cfg.progress)
    groups, info = choose_groups(cfg.grouping, [t.name for t in tasks], affinity, cfg.seed)
    write_json(Path(cfg.run_dir) / "grouping.json", info)
    print(f"groups: {groups}\nwritten to {Path(cfg.run_dir) / 'grouping.json'}")
    return 0


def cmd_fuse(a: argparse.Namespace) -> int:
    """Train a MoPE fusion task."""
    from training.mope_trainer import FuseConfig, train_mope

    select = dict(a.select)
    mope = MoPEConfig(prompt_len=a.prompt_len, n_experts=a.experts, mapped_len=a.mapped_len,
                      mapper_hidden=a.mapper_hidden, temperature=a.temperature, routing=a.routing,
                      router_uses_image=a.router_uses_image, importance_threshold=a.importance_threshold,
                      importance_weight=a.importance_weight, depth=a.depth)
    cfg = FuseConfig(train=a.train, test=a.test, name=a.name, select=select, split_file=a.split, run_dir=a.run_dir,
                     head=a.head, complementary=a.complementary, mope=mope, backbone=_backbone(a), split=_split(a),
                     optim=_optim(a), head_lr=a.head_lr, threshold=a.threshold, on_bad_file=a.on_bad_file,
                     seed=a.seed, cache_dir=a.cache_dir, progress=not a.no_progress, resume=a.resume,
                     stop_after_epoch=a.stop_after_epoch, eval_each_epoch=not a.no_eval_each_epoch)
    result = train_mope(cfg)
    print(f"run written to {result.run_dir}")
    return 0


def cmd_zeroshot(a: argparse.Namespace) -> int:
    """Zero-shot metrics of every task of a split."""
    from mmserve.backbone import load_backbone
    from training.data import BadFiles
    from training.runs import write_json
    from training.splits import read_split
    from training.zeroshot import zero_shot

    result = zero_shot(load_backbone(_backbone(a).spec()), read_split(a.split), a.root, a.template,
                       BadFiles(a.on_bad_file), a.cache_dir)
    write_json(a.out, result)
    for name, m in result.items():
        print(f"{name}: {m}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    """Evaluate a registry on a split; write JSON and a Markdown table."""
    from mmserve.backbone import BackboneSpec
    from training.evaluate import evaluate_registry, write_report

    spec = None
    if a.model_override or a.pretrained_override:
        from mmserve.registry import read_manifest

        ref = read_manifest(a.registry).backbone
        spec = BackboneSpec(a.model_override or ref.model, a.pretrained_override or ref.pretrained, a.device)
    report = evaluate_registry(a.registry, a.split, a.root, spec, a.on_bad_file, a.zero_shot_template, a.cache_dir,
                               _tasks(a.tasks))
    out = Path(a.out) if a.out else Path(a.registry).resolve().parent
    json_path, md_path = write_report(report, out, a.stem)
    print(report.to_markdown())
    print(f"written: {json_path} {md_path}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """One Markdown row per finished run: method, score, zero-shot, trainable parameters, per-task scores."""
    from training.compare import compare_markdown, run_summary

    table = compare_markdown([run_summary(r) for r in a.runs])
    if a.out:
        atomic_write_bytes(a.out, table.encode())
    print(table, end="")
    return 0


def _default_cache() -> str:
    return str(Path(os.environ.get("MMSERVE_CACHE", "~/.cache/mmserve")).expanduser())


def _command_line(a) -> str:
    """The command as typed (for the records that cite it)."""
    return "mmserve-train " + shlex.join(a.argv) if getattr(a, "argv", None) else ""


def cmd_results(a: argparse.Namespace) -> int:
    """The accuracy table of issue 5, resumable: <out>.md, <out>.json, <out>.png."""
    from training.results import ResultsConfig, build_results

    rc = ResultsConfig(cache=a.cache, pretrained=a.pretrained, model=a.model, device=a.device, out=a.out,
                       runs_dir=a.runs_dir, seeds=a.seeds, shots=a.shots, methods=a.methods, tasks=a.styles,
                       epochs=a.epochs, lr=a.lr, fuse_epochs=a.fuse_epochs, group_steps=a.group_steps,
                       group_every=a.group_every, budget_minutes=a.budget_minutes, stop_on_error=a.stop_on_error,
                       template=a.template, shipped=a.shipped, restore=a.restore, progress=not a.no_progress,
                       command=_command_line(a))
    report = build_results(rc)
    s = report["session"]
    print(f"ran {len(s['ran'])}, skipped {len(s['skipped'])} finished, failed {len(s['failed'])}, not started "
          f"{len(s['not_started'])}; {len(report['missing'])} cell run(s) missing; written {Path(a.out)}.md/.json/.png")
    return 1 if s["failed"] else 0


def cmd_ship(a: argparse.Namespace) -> int:
    """Export the backbone, train the shipped registry, write the model card and models/README.md."""
    from training.ship import ShipConfig, ship

    cfg = ShipConfig(cache=a.cache, checkpoint=a.checkpoint, out=a.out, model=a.model, device=a.device,
                     runs_dir=a.runs_dir, shots=a.shots, seed=a.seed, epochs=a.epochs, lr=a.lr,
                     optimizer=a.optimizer, weight_decay=a.weight_decay, n_tokens=a.n_tokens,
                     source_rows=a.source_rows, source_cols=a.source_cols,
                     fuse_epochs=a.fuse_epochs, fuse_head_lr=a.fuse_head_lr,
                     group_steps=a.group_steps, group_every=a.group_every, complementary=a.complementary,
                     experts=a.experts, tags=a.tags, tasks=a.styles, template=a.template,
                     continued_from=a.continued_from, progress=not a.no_progress,
                     command=_command_line(a))
    report = ship(cfg)
    print(f"shipped: {report['backbone']['path']} and {report['registry']['path']}; model card "
          f"{report['model_card']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mmserve-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the data sets (training.prepare); arguments are passed on")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("pretrain", help="pretrain the embedded backbone (training.pretrain); arguments passed on")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("split", help="draw a train/test split file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="image-folder root ROOT/<task>/<class>/<image>")
    src.add_argument("--train", help="fusion JSON lines")
    src.add_argument("--validation-of", metavar="SPLIT",
                     help="carve a validation split (test part = held-out train identities) out of SPLIT's train part")
    p.add_argument("--validation-fraction", type=float, default=0.25, help="with --validation-of (per class)")
    p.add_argument("--test", help="fusion JSON lines of the test part")
    p.add_argument("--name", help="fusion task name (default: file stem)")
    p.add_argument("--tasks", help="comma-separated subset of tasks")
    p.add_argument("--class-names", help="JSON mapping class folder -> prompt name")
    p.add_argument("--out", required=True, help="split file to write")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_split(p, 16, 0.5)
    p.set_defaults(func=cmd_split)

    for name, helptext, func in (("classify", "train multi-task classification prompts", cmd_classify),
                                 ("group", "compute task groups only", cmd_group)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--root", help="image-folder root (optional when --split exists)")
        p.add_argument("--split", help="split file: reused when it exists, else written")
        p.add_argument("--tasks", help="comma-separated subset of tasks")
        p.add_argument("--class-names", help="JSON mapping class folder -> prompt name")
        p.add_argument("--template", default="a photo of a {}.", help="class prompt after the prompt tokens")
        p.add_argument("--zero-shot-template", default="a photo of a {}.")
        g = p.add_argument_group("prompts")
        g.add_argument("--prompt", choices=prompt_choices(), default="mmap",
                       help="a registered prompt method: mmap, or the text-only (CoOp/MaPLe) / visual-only "
                            "(VPT-deep) ablation, or any method registered with mmserve.prompts.register_method")
        g.add_argument("--sharing", choices=("group+task", "task", "group"), default="group+task",
                       help="group-shared + task-specific prompts, task-specific only, or group-shared only")
        g.add_argument("--n-tokens", type=int, default=PromptSpec.n_tokens,
                       help="prompt tokens per layer of each prompt (b)")
        g.add_argument("--source-rows", type=int, default=PromptSpec.source_rows, help="MmAP m")
        g.add_argument("--source-cols", type=int, default=PromptSpec.source_cols, help="MmAP n")
        g.add_argument("--depth", type=int, default=None, help="prompted layers (default all)")
        g = p.add_argument_group("grouping")
        g.add_argument("--grouping", choices=("auto", "all", "single", "random", "file"), default="auto")
        g.add_argument("--groups-file", help="JSON groups for --grouping file")
        g.add_argument("--n-groups", type=int, default=None, help="auto: exactly N groups; random: N (default 2)")
        g.add_argument("--group-steps", type=positive_int, default=50, help="steps of the global prompt for grouping")
        g.add_argument("--group-every", type=positive_int, default=5, help="gradient snapshot period (steps)")
        g.add_argument("--similarity", choices=("dot", "cosine"), default="dot")
        g.add_argument("--no-center", action="store_true",
                       help="score raw similarities (eq. 8 as printed: all-positive ones always give one group)")
        _add_backbone(p)
        _add_split(p, 16, 0.5)
        _add_optim(p, OptimConfig())
        _add_run(p, f"runs/{name}")
        p.set_defaults(func=func)

    p = sub.add_parser("fuse", help="train a MoPE image+text fusion task")
    p.add_argument("--train", help="fusion JSON lines (split unless --test is given)")
    p.add_argument("--test", help="fusion JSON lines of the test part")
    p.add_argument("--name", help="task name (default: the train file's stem)")
    p.add_argument("--select", action="append", default=[], metavar="FIELD=VALUE", type=field_value,
                   help="keep only lines whose FIELD equals VALUE (repeatable), e.g. task=noto")
    p.add_argument("--split", help="split file: reused when it exists, else written")
    p.add_argument("--head", choices=("multiclass", "multilabel"), default=None)
    p.add_argument("--complementary", default="clip", help="'clip' (text tower), 'minilm', or an encoder folder")
    p.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    p.add_argument("--head-lr", type=float, default=None)
    d = MoPEConfig()
    g = p.add_argument_group("MoPE")
    g.add_argument("--prompt-len", type=int, default=d.prompt_len, help="l")
    g.add_argument("--experts", type=int, default=d.n_experts, help="k")
    g.add_argument("--mapped-len", type=int, default=d.mapped_len)
    g.add_argument("--mapper-hidden", type=int, default=d.mapper_hidden)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--routing", choices=("dense", "top1"), default=d.routing)
    g.add_argument("--router-uses-image", action="store_true")
    g.add_argument("--importance-weight", type=float, default=d.importance_weight)
    g.add_argument("--importance-threshold", type=float, default=d.importance_threshold)
    g.add_argument("--depth", type=int, default=None)
    _add_backbone(p)
    _add_split(p, None, 0.2)
    _add_optim(p, mope_optim())
    _add_run(p, "runs/fuse")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("zeroshot", help="zero-shot baseline on a split's test part")
    p.add_argument("--split", required=True)
    p.add_argument("--root", default=None, help="data root (default: the split's)")
    p.add_argument("--template", default="a photo of a {}.")
    p.add_argument("--out", default="zeroshot.json")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--on-bad-file", choices=("skip", "stop"), default="skip")
    _add_backbone(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("eval", help="evaluate a registry on a split: JSON + Markdown table")
    p.add_argument("--registry", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--root", default=None, help="data root (default: the split's)")
    p.add_argument("--tasks", help="comma-separated subset of tasks")
    p.add_argument("--out", default=None, help="folder for eval.json / eval.md (default: the registry's parent)")
    p.add_argument("--stem", default="eval", help="file name stem of the outputs")
    p.add_argument("--zero-shot-template", default="a photo of a {}.")
    p.add_argument("--model", dest="model_override", default=None, help="backbone (default: the registry's)")
    p.add_argument("--pretrained", dest="pretrained_override", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--on-bad-file", choices=("skip", "stop"), default="skip")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare finished runs (MmAP vs ablations) in one Markdown table")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("results", help="the accuracy table (issue 5), resumable: <out>.md, <out>.json, <out>.png")
    p.add_argument("--cache", default=_default_cache(), help="prepared data (default $MMSERVE_CACHE, ~/.cache/mmserve)")
    p.add_argument("--out", default="docs/results", help="output stem: <out>.md, <out>.json, <out>.png")
    p.add_argument("--runs-dir", default=None,
                   help="one dir per run; finished runs are skipped (default <cache>/results/<model>-<weights>-<hash>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[4, 16], help="train shots per class (and style)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of the rows to run (default all): zero-shot text-only visual-only mmap-task "
                        "mmap-group mmap-full mmap-random mmap-all fusion-zero-shot image-only text-only-clip "
                        "text-only-minilm mope-k4-clip mope-k16-clip mope-k4-minilm mope-k16-minilm")
    p.add_argument("--styles", nargs="+", default=None, help="subset of the styles (default: all prepared)")
    p.add_argument("--epochs", type=int, default=5, help="classification epochs (MmAP: 5)")
    p.add_argument("--lr", type=float, default=0.0035, help="classification SGD lr (MmAP: 0.0035)")
    p.add_argument("--fuse-epochs", type=int, default=10, help="fusion epochs (MoPE trainer default: 10)")
    p.add_argument("--group-steps", type=positive_int, default=50, help="steps of the global prompt for grouping")
    p.add_argument("--group-every", type=positive_int, default=5, help="gradient snapshot period (steps)")
    p.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run (default: go on)")
    p.add_argument("--template", default="auto",
                   help="class prompt template, or auto: chosen on the k-shot train images (training.templates)")
    p.add_argument("--shipped", default=None,
                   help="a ship report (models/ship.json): add its cell, trained with the shipped recipe, as "
                        "reference rows (refused unless backbone weights, styles and template match)")
    p.add_argument("--restore", default=None,
                   help="a published table (docs/results.json): seed the runs dir with its finished runs, so only "
                        "missing ones run (refused unless the settings match and zero-shot measures the same here)")
    p.add_argument("--no-progress", action="store_true")
    _add_backbone(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("ship", help="export the backbone, train the shipped registry, write the model card")
    p.add_argument("--cache", default=_default_cache(), help="prepared data (default $MMSERVE_CACHE, ~/.cache/mmserve)")
    p.add_argument("--checkpoint", required=True, help="open_clip_train epoch_N.pt, or exported .safetensors")
    p.add_argument("--out", default="models", help="where backbone/, registry/ and README.md go (default models)")
    p.add_argument("--runs-dir", default=None, help="training runs (default <cache>/ship/<model>-<weights>-<hash>)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--styles", nargs="+", default=None, help="subset of the styles (default: all prepared)")
    mmap_optim, mmap_prompt = OptimConfig(), PromptSpec()  # the trainer's defaults: the paper's recipe
    p.add_argument("--epochs", type=int, default=mmap_optim.epochs, help="MmAP epochs")
    p.add_argument("--lr", type=float, default=mmap_optim.lr, help="MmAP lr (paper: 0.0035 with SGD)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=mmap_optim.optimizer,
                   help="MmAP optimiser (paper: sgd)")
    p.add_argument("--weight-decay", type=float, default=mmap_optim.weight_decay, help="MmAP weight decay")
    p.add_argument("--n-tokens", type=int, default=mmap_prompt.n_tokens, help="MmAP b: prompt tokens per layer")
    p.add_argument("--source-rows", type=int, default=mmap_prompt.source_rows, help="MmAP m")
    p.add_argument("--source-cols", type=int, default=mmap_prompt.source_cols, help="MmAP n")
    p.add_argument("--fuse-epochs", type=int, default=10)
    p.add_argument("--fuse-head-lr", type=float, default=None, help="fusion head lr (default: the MoPE lr, 4e-4)")
    p.add_argument("--group-steps", type=positive_int, default=50)
    p.add_argument("--group-every", type=positive_int, default=5)
    p.add_argument("--complementary", default="clip", help="fusion psi encoder: clip or minilm")
    p.add_argument("--experts", type=int, default=16, help="MoPE k of the fusion entry")
    p.add_argument("--tags", action="store_true", help="also ship the multi-label tags fusion entry")
    p.add_argument("--template", default="auto",
                   help="class prompt template, or auto: chosen on the k-shot train images (training.templates)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model", default=EMBEDDED_MODEL, help=f"open_clip model name (default {EMBEDDED_MODEL})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--continued-from", default=None,
                   help="ship.json of the weights the checkpoint's pretraining started from (--pretrained): the "
                        "model card records that stage too, and its commands come first in 'How to reproduce'")
    p.set_defaults(func=cmd_ship)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mmserve-train`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("prepare", "pretrain"):
        # hand every remaining argument, options included (--help too), to the delegate's own parser
        func = cmd_prepare if argv[0] == "prepare" else cmd_pretrain
        return _run(argv[0], func, argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return _run(args.command, args.func, args)


def _run(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a bad input (the message names the file or option) is one `error:` line and exit 2."""
    try:
        return func(args)
    except (MmserveError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"mmserve-train {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
