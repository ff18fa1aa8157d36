"""Build what ships under models/: the embedded backbone, its model card, the default registry, models/README.md.

    mmserve-train ship --cache ~/.cache/mmserve --checkpoint EPOCH_CKPT_OR_SAFETENSORS --out models/

1. exports the checkpoint's weights only, fp16 safetensors (training.pretrain.export_weights), to
   `<out>/backbone/<model>.safetensors` (an exported .safetensors is copied as it is);
2. loads the backbone from that file (so every fingerprint below is the shipped weights') and measures
   zero-shot accuracy per style on the held-out test split;
3. trains the registry: full MmAP (grouping computed) on the styles, `--shots` per class, `--seed`; a MoPE
   fusion entry (image + CLDR name -> subgroup, multi-class); with `--tags` the multi-label tags entry;
4. merges them into `<out>/registry` and evaluates that registry through the serving path (load_registry +
   builders), on the same held-out split;
5. writes `<out>/backbone/MODEL_CARD.md`, `<out>/README.md` and `<out>/ship.json`.

The training runs live in `<cache>/ship/<model>-<fingerprint>-<settings hash>` (resumable: a rerun continues
an interrupted run and re-evaluates finished ones), never under models/.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors import safe_open

from mmserve.backbone import EMBEDDED_MODEL, Backbone, BackboneSpec, load_backbone
from mmserve.builders import load_registry
from mmserve.fileio import atomic_write, atomic_write_bytes, sha256_file
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import BackboneRef, Manifest, load_grouping_weights, save_registry
from training.classify import Towers
from training.config import DEVICE, MODEL, RUN, BackboneConfig, OptimConfig, SplitConfig, mope_optim
from training.evaluate import evaluate_registry
from training.examples import write_examples
from training.grouping import GROUP_EVERY, GROUP_STEPS, GroupingConfig
from training.mmap_trainer import MultiTaskConfig, PromptSpec, train_multitask
from training.model_card import add_log, dump, model_card, pretrain_record, readme
from training.mope_trainer import FuseConfig, train_mope
from training.options import option
from training.progress import log
from training.results import (
    FUSION_TASK,
    Context,
    ResultsConfig,
    describe_machine,
    emoji_split,
    fusion_task_split,
    grouping_verdict,
    machine_info,
    read_tasks,
    resolve_runs_dir,
    run_classify_zero_shot,
)
from training.results.methods import CACHE, STYLES
from training.runs import to_jsonable, write_json
from training.splits import read_split, write_split
from training.templates import AUTO, AUTO_TEMPLATE, choose_template

TAGS_TASK = "emoji_tags"


@dataclass
class ShipConfig:
    """What `mmserve-train ship` builds."""

    cache: str = option(opt=CACHE)  # the command line's default: $MMSERVE_CACHE or ~/.cache/mmserve
    checkpoint: str = option(help="open_clip_train epoch_N.pt, or exported .safetensors")
    out: str = option("models", help="where backbone/, registry/ and README.md go (default models)")
    model: str = option(EMBEDDED_MODEL, MODEL)
    device: str = option("cpu", DEVICE)
    runs_dir: str | None = option(None, help="training runs (default <cache>/ship/<model>-<weights>-<hash>)")
    shots: int = option(16)
    seed: int = option(0, RUN["seed"])
    # MmAP recipe and prompt shape; defaults are the trainer's (the paper's: SGD lr 0.0035, 5 epochs)
    epochs: int = option(OptimConfig.epochs, help="MmAP epochs")
    lr: float = option(OptimConfig.lr, help="MmAP lr (paper: 0.0035 with SGD)")
    optimizer: str = option(OptimConfig.optimizer, choices=("sgd", "adamw"), help="MmAP optimiser (paper: sgd)")
    weight_decay: float = option(OptimConfig.weight_decay, help="MmAP weight decay")
    n_tokens: int = option(PromptSpec.n_tokens, help="MmAP b: prompt tokens per layer")
    source_rows: int = option(PromptSpec.source_rows, help="MmAP m")
    source_cols: int = option(PromptSpec.source_cols, help="MmAP n")
    fuse_epochs: int = option(10)
    fuse_head_lr: float | None = option(None, help="fusion head lr (default: the MoPE lr, 4e-4)")
    group_steps: int = option(50, GROUP_STEPS)
    group_every: int = option(5, GROUP_EVERY)
    complementary: str = option("clip", help="fusion psi encoder: clip or minilm")
    experts: int = option(16, help="MoPE k of the fusion entry")
    tags: bool = option(False, help="also ship the multi-label tags fusion entry")
    tasks: list[str] | None = option(None, STYLES)  # None = all prepared
    mope: dict = field(default_factory=dict)  # MoPEConfig overrides besides n_experts (tests: smaller)
    template: str = option(AUTO, AUTO_TEMPLATE)  # or a fixed class-prompt template such as "a photo of a {}."
    pretrain_run: str | None = None  # open_clip_train run folder (default: the checkpoint's)
    continued_from: str | None = option(None, help="ship.json of the weights the checkpoint's pretraining started "
                                                   "from (--pretrained): the model card records that stage too, and "
                                                   "its commands come first in 'How to reproduce'")
    progress: bool = option(True, RUN["progress"])
    command: str = ""


def earlier_stage(path: Path) -> tuple[dict, bytes]:
    """What the model card keeps of the stage a continued pretraining started from: its ship report's weights,
    pretraining record and commands (prepare, pretrain, ship: they produce the weights stage 2 starts from), and
    the report's bytes (ship keeps them beside the new weights, so `--continued-from models/ship.json` works)."""
    try:
        raw = path.read_bytes()
        report = json.loads(raw)
        stage = {"source": str(path), "stage": int(report.get("stage") or 1),
                 "backbone": {k: report["backbone"].get(k) for k in ("fingerprint", "sha256", "epoch", "source")},
                 "pretrain": report["pretrain"], "zero_shot_mean": report["zero_shot"]["mean"],
                 "commands": report["commands"]}
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:  # ValueError: JSONDecodeError too
        raise ValueError(f"{path}: not a ship report ({exc.__class__.__name__}: {exc})") from exc
    return stage, raw


def keep_earlier_stage(out: Path, stage: dict, raw: bytes) -> str:
    """Write the earlier stage's ship report to <out>/backbone/stage<N>.ship.json (atomically; the same file when
    --continued-from already named it) and return that path relative to <out>."""
    rel = f"backbone/stage{stage['stage']}.ship.json"
    dest = out / rel
    if not (dest.is_file() and dest.read_bytes() == raw):
        atomic_write_bytes(dest, raw)
    return rel


def export_backbone(checkpoint: Path, dest: Path, model: str) -> dict:
    """Weights-only fp16 safetensors at `dest` from a trainer checkpoint (or a copy of an exported file)."""
    from training.pretrain import export_weights

    if checkpoint.suffix == ".safetensors":
        if checkpoint.resolve() != dest.resolve():
            atomic_write(dest, lambda tmp: shutil.copyfile(checkpoint, tmp))
        with safe_open(str(dest), "pt") as f:
            meta = f.metadata() or {}
        info = {"out": str(dest), "source": meta.get("source", checkpoint.name), "epoch": meta.get("epoch", ""),
                "copied_from": str(checkpoint)}
    else:
        info = export_weights(checkpoint, dest, model, verify=True)
    epoch = str(info.get("epoch", "")).strip()
    return {"path": str(dest), "model": model, "source": str(checkpoint), "epoch": int(epoch) if epoch.isdigit()
            else None, "bytes": dest.stat().st_size, "sha256": sha256_file(dest)}


def merge_registries(parts: list[Path], dest: Path, backbone: Backbone, pretrained_ref: str) -> Manifest:
    """One registry holding every group and task of `parts` (each checked against `backbone`)."""
    groups, tasks, group_w, task_w, records = [], [], {}, {}, {}
    for part in parts:
        reg = load_registry(part, backbone)
        for g in reg.manifest.groups:
            if g.name in group_w:
                raise ValueError(f"{part}: group {g.name} already in the merged registry")
            groups.append(g)
            group_w[g.name] = reg.group_weights[g.name]
            record = load_grouping_weights(part, g)  # the grouping record comes along (add-task needs it)
            if record is not None:
                records[g.name] = record
        for t in reg.manifest.tasks:
            tasks.append(t)
            task_w[t.name] = reg.task_weights[t.name]
    manifest = Manifest(BackboneRef(backbone.spec.model, backbone.fingerprint, pretrained_ref), groups, tasks)
    save_registry(dest, manifest, group_w, task_w, records)
    return manifest


def _backbone_record(cfg: ShipConfig) -> BackboneConfig:
    """The backbone as the trainer runs record it: the shipped file relative to the repository (the runs dir is
    keyed by the weights' fingerprint, so the same weights shipped to another --out resume the same runs)."""
    return BackboneConfig(cfg.model, f"{Path(cfg.out).name}/backbone/{cfg.model}.safetensors", cfg.device)


def _fuse_config(cfg: ShipConfig, split_file: Path, run_dir: Path, head: str) -> FuseConfig:
    return FuseConfig(split_file=str(split_file), run_dir=str(run_dir), head=head, complementary=cfg.complementary,
                      mope=MoPEConfig(**(cfg.mope | {"n_experts": cfg.experts})),
                      backbone=_backbone_record(cfg),
                      split=SplitConfig(cfg.shots if head == "multiclass" else None, 0.0, None, "file", cfg.seed),
                      optim=mope_optim(cfg.fuse_epochs),
                      head_lr=cfg.fuse_head_lr, zero_shot_template=cfg.template, seed=cfg.seed,
                      cache_dir=str(run_dir.parent / "tensors"), progress=cfg.progress, resume=True,
                      eval_each_epoch=False)


def _prepare_command(cache: Path) -> str:
    summary = cache / "prepare_summary.json"
    if not summary.is_file():
        return f"mmserve-train prepare --cache {cache}"
    c = json.loads(summary.read_text()).get("config", {})
    parts = [f"mmserve-train prepare --cache {cache}"]
    for key, flag, default in (("size", "--size", 96), ("seed", "--seed", 0), ("val_fraction", "--val-fraction", 0.02)):
        if key in c and c[key] != default:
            parts.append(f"{flag} {c[key]}")
    return " ".join(parts)


def ship(cfg: ShipConfig) -> dict:
    """Export, measure, train, merge, evaluate and document; returns the report written to <out>/ship.json."""
    t0 = time.time()
    cache, out = Path(cfg.cache).expanduser(), Path(cfg.out)
    checkpoint = Path(cfg.checkpoint).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    meta = read_tasks(cache)
    styles = list(cfg.tasks or meta["tasks"])
    earlier, earlier_raw = earlier_stage(Path(cfg.continued_from)) if cfg.continued_from else (None, b"")
    # (read before anything under <out> is overwritten: --continued-from may be <out>/ship.json itself)
    weights = out / "backbone" / f"{cfg.model}.safetensors"
    log(f"ship: exporting {checkpoint} -> {weights}")
    bb_info = export_backbone(checkpoint, weights, cfg.model)
    backbone = load_backbone(BackboneSpec(cfg.model, str(weights), cfg.device))
    machine = machine_info(cfg.device)
    template_choice = None
    if cfg.template == AUTO:  # chosen on the k-shot train images of the shipped split, never on test
        template_choice = choose_template(Towers.of(backbone), emoji_split(cache, cfg.shots, cfg.seed, styles),
                                          cache_dir=cache / "tensors")
        cfg = replace(cfg, template=template_choice.template)
        log(f"ship: template {cfg.template!r} (train-part zero-shot {template_choice.scores})")
    settings = {"model": cfg.model, "backbone_fingerprint": backbone.fingerprint, "shots": cfg.shots,
                "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr, "optimizer": cfg.optimizer,
                "weight_decay": cfg.weight_decay, "mmap_shape": [cfg.n_tokens, cfg.source_rows, cfg.source_cols],
                "fuse_epochs": cfg.fuse_epochs,
                **({"fuse_head_lr": cfg.fuse_head_lr} if cfg.fuse_head_lr is not None else {}),
                "group_steps": cfg.group_steps,
                "group_every": cfg.group_every, "complementary": cfg.complementary, "experts": cfg.experts,
                "tags": cfg.tags, "styles": styles, "mope": dict(sorted(cfg.mope.items())), "template": cfg.template}
    runs = resolve_runs_dir(cfg.runs_dir, str(cache), settings, root="ship")
    log(f"ship: runs in {runs}")
    # the same split files, zero-shot and code paths as `mmserve-train results` (one (shots, seed) cell)
    rc = ResultsConfig(cache=str(cache), model=cfg.model, device=cfg.device, shots=[cfg.shots], seeds=[cfg.seed],
                       tasks=styles, template=cfg.template, progress=cfg.progress)
    ctx = Context(rc, backbone, Towers.of(backbone), runs, styles, machine)
    classify_split = ctx.classify_split(cfg.shots, cfg.seed)
    fusion_split_file = ctx.fusion_split(cfg.shots, cfg.seed)
    zs = run_classify_zero_shot(ctx)  # the backbone's zero-shot per style: the model card's numbers
    log(f"ship: zero-shot per style {zs['scores']}")

    bb_cfg = _backbone_record(cfg)
    mmap_cfg = MultiTaskConfig(split_file=str(classify_split), run_dir=str(runs / "mmap"), template=cfg.template,
                               zero_shot_template=cfg.template, backbone=bb_cfg,
                               split=SplitConfig(cfg.shots, 0.5, None, "stem", cfg.seed),
                               optim=OptimConfig(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                 epochs=cfg.epochs),
                               prompt=PromptSpec(n_tokens=cfg.n_tokens, source_rows=cfg.source_rows,
                                                 source_cols=cfg.source_cols),
                               grouping=GroupingConfig("auto", steps=cfg.group_steps, every=cfg.group_every),
                               seed=cfg.seed, cache_dir=str(runs / "tensors"), progress=cfg.progress, resume=True,
                               eval_each_epoch=False)
    t_run = time.time()
    mmap = train_multitask(mmap_cfg, backbone)
    walls = {"mmap": time.time() - t_run}
    grouping_json = runs / "mmap" / "grouping.json"
    grouping = json.loads(grouping_json.read_text()) if grouping_json.is_file() else {"groups": mmap.groups}
    t_run = time.time()
    fusion = train_mope(_fuse_config(cfg, fusion_split_file, runs / "fusion", "multiclass"), backbone)
    walls["fusion"] = time.time() - t_run
    parts = [runs / "mmap" / "registry", runs / "fusion" / "registry"]
    trainer_scores = {s: mmap.final["tasks"][s]["accuracy"] for s in styles}
    trainer_scores[FUSION_TASK] = fusion.final["tasks"][FUSION_TASK]["accuracy"]
    eval_splits = {FUSION_TASK: fusion_split_file}
    if cfg.tags:
        tags_split = runs / "splits" / "tags.json"
        if not tags_split.is_file():
            write_split(tags_split, fusion_task_split(cache, None, cfg.seed, TAGS_TASK, tags=True, styles=styles))
        t_run = time.time()
        tags = train_mope(_fuse_config(cfg, tags_split, runs / "tags", "multilabel"), backbone)
        walls["tags"] = time.time() - t_run
        parts.append(runs / "tags" / "registry")
        trainer_scores[TAGS_TASK] = tags.final["tasks"][TAGS_TASK]["f1_micro"]
        eval_splits[TAGS_TASK] = tags_split

    registry_dir = out / "registry"
    manifest = merge_registries(parts, registry_dir, backbone, f"{out.name}/backbone/{weights.name}")
    log(f"ship: registry {registry_dir} ({len(manifest.tasks)} tasks, {len(manifest.groups)} groups)")
    evals = {}
    report_cls = evaluate_registry(registry_dir, classify_split, backbone=backbone, zero_shot_template=cfg.template,
                                   cache_dir=str(runs / "tensors"), tasks=styles)
    evals.update(report_cls.tasks)
    for name, split_file in eval_splits.items():
        evals.update(evaluate_registry(registry_dir, split_file, backbone=backbone, zero_shot_template=cfg.template,
                                       cache_dir=str(runs / "tensors"), tasks=[name]).tasks)
    eval_rows = {name: {"kind": r["kind"], "metric": r["metric"], "score": r["score"], "zero_shot": r["zero_shot"],
                        "trainer_score": trainer_scores.get(name), "n_test": r["n_test"],
                        "trainable_params": r["trainable_params"], "params_used": r["params_used"]}
                 for name, r in evals.items()}
    mismatch = {n: r for n, r in eval_rows.items() if r["trainer_score"] is not None
                and abs(r["score"] - r["trainer_score"]) > 1e-9}
    if mismatch:
        log(f"ship: WARNING the served registry scores differ from the trainers' on {sorted(mismatch)}")

    examples = write_examples(out, backbone, registry_dir, read_split(classify_split), cache / "fusion" / "test.jsonl",
                              FUSION_TASK, cfg.seed)
    pre = pretrain_record(checkpoint, cache, Path(cfg.pretrain_run) if cfg.pretrain_run else None)
    pre = add_log(pre, bb_info.get("epoch"))
    data = {}
    if (cache / "prepare_summary.json").is_file():
        summary = json.loads((cache / "prepare_summary.json").read_text())
        data = {"pretrain": summary.get("pretrain", {}), "tasks": summary.get("tasks", {}),
                "fusion": summary.get("fusion", {})}
    mmap_mean = sum(eval_rows[s]["score"] for s in styles) / len(styles)
    if earlier:
        earlier["kept_as"] = keep_earlier_stage(out, earlier, earlier_raw)
    commands = list(earlier["commands"]) if earlier else [_prepare_command(cache)]
    if pre.get("command"):
        commands.append(pre["command"] + ("   # then, in each later session: same command + --resume latest"
                                          if pre.get("log", {}).get("sessions", 1) > 1 else ""))
    commands.append(cfg.command or f"mmserve-train ship --cache {cache} --checkpoint {checkpoint} --out {out}")
    report = {
        "backbone": bb_info | {"path": str(weights), "fingerprint": backbone.fingerprint, "config": backbone.config,
                               "parameters": sum(p.numel() for p in backbone.model.parameters())},
        "pretrain": pre,
        "earlier_stage": earlier,
        "stage": earlier["stage"] + 1 if earlier else 1,  # pretraining stages behind these weights
        "data": data,
        "zero_shot": {"per_style": zs["scores"], "mean": zs["mean"], "n_test": zs["n_test"],
                      "template": cfg.template, "n_classes": len(meta["classes"]),
                      "template_choice": template_choice.as_dict() if template_choice else None},
        "registry": {"path": str(registry_dir), "tasks": [t.name for t in manifest.tasks],
                     "groups": grouping.get("groups") or [], "grouping": {k: grouping.get(k) for k in (
                         "tasks", "similarity", "cosine", "centered", "method", "score") if k in grouping},
                     "grouping_verdict": grouping_verdict(grouping.get("groups"), styles),
                     "eval": eval_rows, "scores": {n: r["score"] for n, r in eval_rows.items()},
                     "mmap_mean": mmap_mean, "served_equals_trainer": not mismatch,
                     "splits": {"classify": str(classify_split), **{k: str(v) for k, v in eval_splits.items()}}},
        "examples": examples,
        "settings": settings,
        "runs_dir": str(runs),
        "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "machine": machine,
        "machine_line": describe_machine(machine),
        "commands": commands,
        "readme": str(out / "README.md"),
        "model_card": str(out / "backbone" / "MODEL_CARD.md"),
    }
    report["wall_s"] = round(time.time() - t0, 1)
    atomic_write_bytes(out / "backbone" / "MODEL_CARD.md", model_card(report).encode())
    atomic_write_bytes(out / "README.md", readme(report).encode())
    atomic_write_bytes(out / "ship.json", dump(to_jsonable(report)).encode())
    write_json(runs / "ship_report.json", report)
    log(f"ship: done in {report['wall_s']:.0f} s; zero-shot mean {zs['mean']:.4f}, MmAP mean {mmap_mean:.4f}")
    return report


def check_shipped(out: str | Path, model: str = EMBEDDED_MODEL) -> dict:
    """Load <out>/registry with <out>/backbone/<model>.safetensors exactly as the server does; task names."""
    out = Path(out)
    backbone = load_backbone(BackboneSpec(model, str(out / "backbone" / f"{model}.safetensors")))
    registry = load_registry(out / "registry", backbone)
    return {"fingerprint": backbone.fingerprint, "tasks": [t.name for t in registry.manifest.tasks]}

