"""`mmserve-train`: prepare data, pretrain, draw splits, group tasks, train MmAP / MoPE prompts, add a task, evaluate.

Examples:
  mmserve-train split --root data/tasks/images --out split.json --shots 16
  mmserve-train classify --root data/tasks/images --split split.json --run-dir runs/mmap \\
      --model mmserve-vit-p12-96 --pretrained models/backbone/mmserve-vit-p12-96.safetensors
  mmserve-train classify ... --prompt text --sharing task        (CoOp-style text-only ablation)
  mmserve-train add-task --registry runs/mmap/registry --root data/tasks/images --task newstyle --shots 16
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
from pathlib import Path

from mmserve.errors import MmserveError
from mmserve.fileio import atomic_write_bytes
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import DEFAULT_TEMPLATE
from training.add_task import AddTaskConfig
from training.config import BackboneConfig, OptimConfig, SplitConfig
from training.grouping import GroupingConfig
from training.mmap_trainer import MultiTaskConfig, PromptSpec
from training.mope_trainer import MOPE_OPTIONS, FuseConfig
from training.options import add_options, from_args
from training.results.methods import ResultsConfig
from training.ship import ShipConfig

RUN_OPTIONS = ("run_dir", "cache_dir", "progress", "resume", "stop_after_epoch", "eval_each_epoch")


def _add_threads(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_backbone(p: argparse.ArgumentParser, cls: type = BackboneConfig) -> None:
    g = p.add_argument_group("backbone")
    add_options(g, cls, only=("model", "pretrained", "device"))
    _add_threads(g)


def _add_split(p: argparse.ArgumentParser, defaults: SplitConfig) -> None:
    g = p.add_argument_group("split")
    add_options(g, SplitConfig, defaults=vars(defaults))
    add_options(g, MultiTaskConfig, only=("on_bad_file",))


def _add_training(p: argparse.ArgumentParser, cfg: MultiTaskConfig | FuseConfig) -> None:
    """A trainer's backbone, split, optimisation and run options, with the defaults of `cfg`."""
    _add_backbone(p)
    _add_split(p, cfg.split)
    add_options(p.add_argument_group("optimisation"), OptimConfig, defaults=vars(cfg.optim))
    add_options(p.add_argument_group("run"), type(cfg), only=RUN_OPTIONS, defaults=vars(cfg))


def _trained(cls: type, a: argparse.Namespace, **given) -> MultiTaskConfig | FuseConfig:
    """A trainer's config from its options: its own, then its backbone, split and optimiser."""
    return from_args(cls, a, backbone=from_args(BackboneConfig, a), split=from_args(SplitConfig, a),
                     optim=from_args(OptimConfig, a), **given)


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
        split = classify_split(a.root, discover_image_tasks(a.root, bad, a.tasks, a.class_names_file),
                               from_args(SplitConfig, a))
    else:
        items = read_fusion_jsonl(a.train, bad)
        test = read_fusion_jsonl(a.test, bad) if a.test else None
        split = fusion_split(a.name or Path(a.train).stem, items, from_args(SplitConfig, a), test)
    write_split(a.out, split)
    for name, t in split.tasks.items():
        print(f"{name}: {len(t.classes)} classes, {len(t.train)} train, {len(t.test)} test")
    print(f"split written to {a.out}")
    return 0


def _multitask_config(a: argparse.Namespace) -> MultiTaskConfig:
    return _trained(MultiTaskConfig, a, prompt=from_args(PromptSpec, a), grouping=from_args(GroupingConfig, a))


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


def cmd_add_task(a: argparse.Namespace) -> int:
    """Add one classification task to a trained registry (directory or store) as a new version."""
    from training.add_task import AddTaskConfig, add_task

    cfg = from_args(AddTaskConfig, a, backbone=BackboneConfig(a.model or "", a.pretrained, a.device),
                    split=from_args(SplitConfig, a), optim=from_args(OptimConfig, a))
    result = add_task(cfg)
    if not result.written:  # a torchrun rank other than 0
        return 0
    for group, gain in (result.gains or {}).items():
        print(f"gain {group}: {gain:+.6g}")
    joined = result.metrics["joined"]
    print(f"{cfg.task}: joined {'new group ' if result.new_group else ''}{result.group} ({joined['choice']}); "
          f"test accuracy {result.metrics['accuracy']:.4f} (zero-shot {result.metrics['zero_shot_accuracy']:.4f})")
    print(f"{cfg.registry}: version {result.version}; run written to {result.run_dir}")
    return 0


def cmd_fuse(a: argparse.Namespace) -> int:
    """Train a MoPE fusion task."""
    from training.mope_trainer import train_mope

    cfg = _trained(FuseConfig, a, mope=from_args(MoPEConfig, a, table=MOPE_OPTIONS))
    if a.recipe is not None:  # the recipe's optimiser replaces the options': refuse options it would drop
        given = {k: v for k, v in vars(from_args(OptimConfig, a)).items() if v != vars(FuseConfig().optim)[k]}
        if given:
            raise SystemExit(f"mmserve-train fuse: --recipe {a.recipe} sets the optimisation; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(given))}")
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

    result = zero_shot(load_backbone(from_args(BackboneConfig, a).spec()), read_split(a.split), a.root, a.template,
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
                               a.tasks)
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
    from training.results import build_results

    rc = from_args(ResultsConfig, a, command=_command_line(a))
    report = build_results(rc)
    s = report["session"]
    print(f"ran {len(s['ran'])}, skipped {len(s['skipped'])} finished, failed {len(s['failed'])}, not started "
          f"{len(s['not_started'])}; {len(report['missing'])} cell run(s) missing; written {Path(a.out)}.md/.json/.png")
    return 1 if s["failed"] else 0


def cmd_ship(a: argparse.Namespace) -> int:
    """Export the backbone, train the shipped registry, write the model card and models/README.md."""
    from training.ship import ship

    cfg = from_args(ShipConfig, a, command=_command_line(a))
    report = ship(cfg)
    print(f"shipped: {report['backbone']['path']} and {report['registry']['path']}; model card "
          f"{report['model_card']}")
    return 0


def cmd_base_to_new(a: argparse.Namespace) -> int:
    """CoCoOp's base-to-new study on the emoji styles (training.studies.base_to_new)."""
    from training.studies.base_to_new import main as study

    return study(a.rest)


def cmd_leave_one_out(a: argparse.Namespace) -> int:
    """Each emoji style added alone to the other four against the joint run (training.studies.leave_one_out)."""
    from training.studies.leave_one_out import main as study

    return study(a.rest)


def cmd_method_grid(a: argparse.Namespace) -> int:
    """Every classification method at its validated best recipe (training.studies.method_grid)."""
    from training.studies.method_grid import main as grid

    return grid(a.rest)


DELEGATES = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "base-to-new": cmd_base_to_new,
             "leave-one-out": cmd_leave_one_out, "method-grid": cmd_method_grid}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; a config's options come from its fields (training.options)."""
    parser = argparse.ArgumentParser(prog="mmserve-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the data sets (training.prepare); arguments are passed on")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("pretrain", help="pretrain the embedded backbone (training.pretrain); arguments passed on")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_pretrain)
    for name, helptext in (("base-to-new", "prompts trained on half the classes, scored on the other half "
                                           "(training.studies.base_to_new)"),
                           ("leave-one-out", "each emoji style added alone vs the joint run "
                                             "(training.studies.leave_one_out)"),
                           ("method-grid", "every classification method at its validated best recipe "
                                           "(training.studies.method_grid)")):
        p = sub.add_parser(name, help=helptext + "; arguments are passed on")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=DELEGATES[name])

    p = sub.add_parser("split", help="draw a train/test split file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="image-folder root ROOT/<task>/<class>/<image>")
    src.add_argument("--train", help="fusion JSON lines")
    src.add_argument("--validation-of", metavar="SPLIT",
                     help="carve a validation split (test part = held-out train identities) out of SPLIT's train part")
    p.add_argument("--validation-fraction", type=float, default=0.25, help="with --validation-of (per class)")
    add_options(p, FuseConfig, only=("test",))
    p.add_argument("--name", help="fusion task name (default: file stem)")
    add_options(p, MultiTaskConfig, only=("tasks", "class_names_file"))
    p.add_argument("--out", required=True, help="split file to write")
    _add_threads(p)
    _add_split(p, SplitConfig())
    p.set_defaults(func=cmd_split)

    for name, helptext, func in (("classify", "train multi-task classification prompts", cmd_classify),
                                 ("group", "compute task groups only", cmd_group)):
        p = sub.add_parser(name, help=helptext)
        add_options(p, MultiTaskConfig,
                    only=("root", "split_file", "tasks", "class_names_file", "template", "zero_shot_template"))
        add_options(p.add_argument_group("prompts"), PromptSpec)
        add_options(p.add_argument_group("grouping"), GroupingConfig)
        _add_training(p, MultiTaskConfig(run_dir=f"runs/{name}"))
        p.set_defaults(func=func)

    p = sub.add_parser("add-task", help="add one classification task to a trained registry (its group chosen by "
                                        "gradient agreement; only its own prompt trains)")
    add_options(p, AddTaskConfig, only=("registry", "root", "task", "group", "replace", "split_file",
                                        "class_names_file", "template", "zero_shot_template"))
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default=None, help="open_clip model name (default: the registry's)")
    g.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: the registry's)")
    add_options(g, BackboneConfig, only=("device",))
    _add_threads(g)
    _add_split(p, SplitConfig())
    add_options(p.add_argument_group("optimisation"), OptimConfig)
    add_options(p.add_argument_group("run"), AddTaskConfig,
                only=("run_dir", "cache_dir", "progress", "eval_each_epoch"))
    p.set_defaults(func=cmd_add_task)

    p = sub.add_parser("fuse", help="train a MoPE image+text fusion task")
    add_options(p, FuseConfig,
                only=("train", "test", "name", "select", "split_file", "head", "complementary", "threshold", "head_lr",
                      "recipe", "randaug"))
    add_options(p.add_argument_group("MoPE"), MoPEConfig, table=MOPE_OPTIONS)
    _add_training(p, FuseConfig())
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("zeroshot", help="zero-shot baseline on a split's test part")
    p.add_argument("--split", required=True)
    p.add_argument("--root", default=None, help="data root (default: the split's)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--out", default="zeroshot.json")
    add_options(p, MultiTaskConfig, only=("cache_dir", "on_bad_file"))
    _add_backbone(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("eval", help="evaluate a registry on a split: JSON + Markdown table")
    p.add_argument("--registry", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--root", default=None, help="data root (default: the split's)")
    add_options(p, MultiTaskConfig, only=("tasks",))
    p.add_argument("--out", default=None, help="folder for eval.json / eval.md (default: the registry's parent)")
    p.add_argument("--stem", default="eval", help="file name stem of the outputs")
    add_options(p, MultiTaskConfig, only=("zero_shot_template",))
    p.add_argument("--model", dest="model_override", default=None, help="backbone (default: the registry's)")
    p.add_argument("--pretrained", dest="pretrained_override", default=None)
    add_options(p, BackboneConfig, only=("device",))
    _add_threads(p)
    add_options(p, MultiTaskConfig, only=("cache_dir", "on_bad_file"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare finished runs (MmAP vs ablations) in one Markdown table")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("results", help="the accuracy table (issue 5), resumable: <out>.md, <out>.json, <out>.png")
    add_options(p, ResultsConfig, skip=("model", "pretrained", "device"), defaults={"cache": _default_cache()})
    _add_backbone(p, ResultsConfig)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("ship", help="export the backbone, train the shipped registry, write the model card")
    add_options(p, ShipConfig, defaults={"cache": _default_cache()})
    _add_threads(p)
    p.set_defaults(func=cmd_ship)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mmserve-train`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATES:
        # hand every remaining argument, options included (--help too), to the delegate's own parser
        return _run(argv[0], DELEGATES[argv[0]], argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return _run(args.command, args.func, args)


def _run(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a bad input (the message names the file or option) is one `error:` line and exit 2."""
    from training.distributed import leave

    try:
        return func(args)
    except (MmserveError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"mmserve-train {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        leave()  # a torchrun rank leaves its process group


if __name__ == "__main__":
    raise SystemExit(main())
