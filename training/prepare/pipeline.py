"""The whole data preparation: sources -> renders -> task tree, fusion lines, pretraining captions, sheets."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mmserve.fileio import sha256_file

from . import sources
from .captions import class_word_captions, drawing_captions, emoji_captions
from .clipart import scan_openclipart
from .contact_sheet import contact_sheet
from .emoji import PRETRAIN_STYLES, STYLE_PACKAGES, TASK_STYLES, class_name, load_emojibase, load_styles, npm_package
from .emoji import select_task_emoji as _select
from .folder_classes import folder_subgroup
from .monochrome import SOURCE_STYLE, TRANSFORMS, mono_made_from, monochrome_pairs
from .pretrain_pairs import Pair, split_pairs, write_caption_csv
from .render import RenderJob, run_jobs
from .stamps import refresh_folder
from .tasks import write_fusion, write_json, write_tasks
from .tuxpaint import scan_stamps


@dataclass
class PrepareConfig:
    """Options of the data preparation."""

    cache_dir: Path
    size: int = 96
    seed: int = 0
    workers: int = 2
    val_fraction: float = 0.02
    test_fraction: float = 0.5
    min_test: int = 5
    min_per_class: int = 10
    n_tags: int = 50
    install: bool = True
    sheets: bool = True
    openclipart_dir: Path = sources.OPENCLIPART_DIR
    tuxpaint_dir: Path = sources.TUXPAINT_STAMPS_DIR


def _log(msg: str) -> None:
    """Progress line on stdout."""
    print(f"[prepare] {msg}", flush=True)


def _report_failures(kind: str, errors: dict[Path, str], limit: int = 10) -> None:
    """Print the pictures that failed, with path and reason (first `limit`)."""
    if not errors:
        return
    _log(f"{len(errors)} {kind} pictures failed and are skipped:")
    for path, err in sorted(errors.items())[:limit]:
        print(f"  {path}: {err}", flush=True)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more", flush=True)


def prepare_emoji(cfg: PrepareConfig, npm_root: Path) -> tuple[dict, dict[str, dict[str, Path]], dict]:
    """Render all seven styles (cached) and choose the task emoji; return them, render paths and stats."""
    emoji = load_emojibase(npm_root)
    styles = load_styles(npm_root)
    candidates = _select(emoji, styles, cfg.min_per_class)
    render_dir = cfg.cache_dir / "emoji" / f"{cfg.size}px"
    wanted: dict[str, set[str]] = {s: set(candidates) for s in STYLE_PACKAGES}
    for style in PRETRAIN_STYLES:  # pretraining styles: every emoji they draw
        wanted[style] |= styles[style].hexcodes() & set(emoji)
    jobs: list[RenderJob] = []
    errors: dict[Path, str] = {}
    renders: dict[str, dict[str, Path]] = {}
    for style, hexcodes in wanted.items():
        renders[style] = {}
        package = npm_package(style)
        made_from = {"package": package, "version": sources.installed_version(npm_root, package), "size": cfg.size}
        refresh_folder(render_dir / style, made_from, log=_log)
        for h in sorted(hexcodes):
            out = render_dir / style / f"{h}.png"
            renders[style][h] = out
            if out.exists():
                continue
            try:
                jobs.append(RenderJob("svg", styles[style].svg(h), out, cfg.size))
            except (KeyError, OSError) as exc:
                errors[out] = f"{type(exc).__name__}: {exc}"
    errors.update(run_jobs(jobs, cfg.workers, label="emoji"))
    _report_failures("emoji", errors)
    for style in renders:
        renders[style] = {h: p for h, p in renders[style].items() if p.exists()}
    ok = {h for h in candidates if all(h in renders[s] for s in STYLE_PACKAGES)}
    counts = Counter(candidates[h].subgroup for h in ok)
    task_emoji = {h: candidates[h] for h in sorted(ok) if counts[candidates[h].subgroup] >= cfg.min_per_class}
    stats = {"emojibase_with_subgroup": len(emoji), "in_all_seven_styles": len(candidates),
             "render_failures": len(errors), "task_emoji": len(task_emoji),
             "pretrain_emoji": {s: len(renders[s]) for s in PRETRAIN_STYLES}}
    return {"all": emoji, "task": task_emoji}, renders, stats


def openclipart_pairs(cfg: PrepareConfig) -> tuple[list[Pair], dict]:
    """Crop/pad the openclipart PNGs (cached) and caption them from their SVG metadata."""
    drawings, stats = scan_openclipart(cfg.openclipart_dir, seed=cfg.seed)
    out_dir = cfg.cache_dir / "pretrain" / "images" / f"{cfg.size}px" / "openclipart"
    png_root = cfg.openclipart_dir / "png"
    outs = {d.png: out_dir / d.png.relative_to(png_root) for d in drawings}
    svg_root = cfg.openclipart_dir / "svg"
    jobs = []
    for d in drawings:
        svg = (svg_root / d.png.relative_to(png_root)).with_suffix(".svg")
        jobs.append(RenderJob("raster", str(d.png), outs[d.png], cfg.size, 0.04, str(svg) if svg.is_file() else None))
    errors = run_jobs(jobs, cfg.workers, label="openclipart")
    _report_failures("openclipart", {Path(str(p).replace(str(out_dir), str(png_root))): e for p, e in errors.items()})
    pairs = [Pair(outs[d.png], drawing_captions(d.title, d.keywords, d.folder_words), "openclipart",
                  {"folder": d.png.parent.relative_to(png_root).as_posix()})
             for d in drawings if outs[d.png].exists()]
    return pairs, {**stats, "drawings": len(drawings), "failed": len(errors), "images": len(pairs)}


def tuxpaint_pairs(cfg: PrepareConfig) -> tuple[list[Pair], dict]:
    """Crop/pad the Tux Paint stamps (SVGs rendered; cached) and caption them with their description."""
    stamps, stats = scan_stamps(cfg.tuxpaint_dir)
    out_dir = cfg.cache_dir / "pretrain" / "images" / f"{cfg.size}px" / "tuxpaint"
    outs = {s.path: out_dir / s.path.relative_to(cfg.tuxpaint_dir).with_suffix(".png") for s in stamps}
    try:
        import cairosvg  # noqa: F401

        svg_renderer = "cairosvg"
    except (ImportError, OSError):
        svg_renderer = "resvg (cairosvg not installed)"
    _log(f"Tux Paint SVG stamps rendered with {svg_renderer}")
    jobs = [RenderJob("svg_file" if s.is_svg else "raster", str(s.path), outs[s.path], cfg.size, 0.04)
            for s in stamps]
    errors = run_jobs(jobs, cfg.workers, label="tuxpaint")
    inverse = {v: k for k, v in outs.items()}
    _report_failures("tuxpaint", {inverse.get(p, p): e for p, e in errors.items()})
    pairs = [Pair(outs[s.path], drawing_captions(s.description, [], s.folder_words, kind="picture"), "tuxpaint",
                  {"folder": s.path.parent.relative_to(cfg.tuxpaint_dir).as_posix()})
             for s in stamps if outs[s.path].exists()]
    n_svg = sum(s.is_svg for s in stamps)
    n_svg_ok = sum(s.is_svg and outs[s.path].exists() for s in stamps)
    return pairs, {**stats, "stamps": len(stamps), "svg": n_svg, "svg_rendered": n_svg_ok,
                   "svg_renderer": svg_renderer, "failed": len(errors), "images": len(pairs)}


def emoji_pairs(emoji: dict, renders: dict[str, dict[str, Path]]) -> list[Pair]:
    """Caption the pretraining-style emoji (OpenMoji colour, Fluent colour) with name, class words and tags."""
    assert not set(PRETRAIN_STYLES) & set(TASK_STYLES), "a task style must never be used for pretraining"
    pairs = []
    for style in PRETRAIN_STYLES:
        for h, path in sorted(renders[style].items()):
            e = emoji[h]
            pairs.append(Pair(path, emoji_captions(e.name, class_name(e.subgroup), e.tags), f"emoji_{style}",
                              {"subgroup": e.subgroup}))
    return pairs


def with_class_words(pairs: list[Pair]) -> list[Pair]:
    """Every pair; each pretraining-style emoji one gets its bare class words as two more captions.

    The continued-pretraining stage of docs/backbone.md: captions spelled like the zero-shot prompts, so that
    the class words themselves, not only names and tags that contain them, are aligned with the pictures.
    """
    return [replace(p, captions=p.captions + class_word_captions(class_name(p.extra["subgroup"])))
            if "subgroup" in p.extra else p for p in pairs]


def with_folder_class_words(pairs: list[Pair], classes: set[str]) -> tuple[list[Pair], Counter]:
    """Every pair; each openclipart / Tux Paint picture whose category folder maps to one of `classes` (subgroup ids,
    see folder_classes.py) gets that class's bare words as two more captions; return them and per-subgroup counts."""
    out, counts = [], Counter()
    for p in pairs:
        sub = folder_subgroup(p.source, p.extra["folder"]) if "folder" in p.extra else None
        if sub is not None and sub in classes:
            counts[sub] += 1
            p = replace(p, captions=p.captions + class_word_captions(class_name(sub)))
        out.append(p)
    return out, counts


def caption_sets(n_train: int, n_class_words: int, n_folder_words: int, n_mono: int) -> dict[str, dict]:
    """What each pretraining caption CSV under pretrain/ holds, keyed by file name (the model card names a stage's)."""
    return {"train.csv": {"pairs": n_train, "about": "the train pictures with their own captions"},
            "train_classwords.csv": {"pairs": n_class_words,
                                     "about": "the same train pictures, each pretraining emoji's bare class words "
                                              "added as two more captions (the continued stage of docs/backbone.md)"},
            "train_classwords_folders.csv": {
                "pairs": n_folder_words,
                "about": "train_classwords.csv, and each openclipart / Tux Paint picture whose category folder "
                         "depicts one task class gets that class's bare words as two more captions (docs/backbone.md)"},
            "train_classwords_mono.csv": {
                "pairs": n_mono,
                "about": "train_classwords.csv, and a line-art and a silhouette version of each Fluent colour emoji "
                         "picture, each captioned with its class's bare words (monochrome.py, docs/backbone.md)"}}


def task_picture_hashes(tasks_dir: Path) -> set[str]:
    """SHA-256 of every picture in the task tree (all task styles, train and test identities)."""
    return {sha256_file(p) for p in sorted(tasks_dir.rglob("*.png"))}


def drop_task_copies(pairs: list[Pair], task_hashes: set[str]) -> tuple[list[Pair], list[Path]]:
    """The pairs whose picture is not byte-identical to a task picture, and the pictures dropped.

    Some emoji have no colour: OpenMoji's colour drawing of a white circle or a cyclone is the same file as its
    line-art (openmoji_line) drawing, so a pretraining style can hold an exact copy of a task picture.
    """
    digest: dict[Path, str] = {}
    kept: list[Pair] = []
    dropped: set[Path] = set()
    for pair in pairs:
        if pair.image not in digest:
            digest[pair.image] = sha256_file(pair.image)
        if digest[pair.image] in task_hashes:
            dropped.add(pair.image)
        else:
            kept.append(pair)
    return kept, sorted(dropped)


def _check_no_task_images(pairs: list[Pair], cache_dir: Path) -> None:
    """Fail if any pretraining picture is a task-style emoji render or lies in the task tree (pictures with a task
    picture's bytes are left out before, by drop_task_copies)."""
    tasks_dir, emoji_dir = (cache_dir / "tasks").resolve(), (cache_dir / "emoji").resolve()
    for pair in pairs:
        image = pair.image.resolve()
        in_task_style = image.is_relative_to(emoji_dir) and image.parent.name in TASK_STYLES
        if in_task_style or image.is_relative_to(tasks_dir):
            raise RuntimeError(f"{pair.image}: a task-style image would enter pretraining (source {pair.source})")


def _sample(paths: list[Path], k: int, rng: random.Random) -> list[Path]:
    """Up to k paths, seeded sample, sorted."""
    return sorted(rng.sample(paths, min(k, len(paths))))


def write_sheets(cfg: PrepareConfig, task_emoji: dict, renders: dict[str, dict[str, Path]],
                 pairs: list[Pair]) -> list[str]:
    """One contact sheet per set: each task style, each pretraining emoji style, openclipart, Tux Paint."""
    sheets_dir = cfg.cache_dir / "sheets"
    rng = random.Random(cfg.seed)
    subgroups = sorted({e.subgroup for e in task_emoji.values()})
    shown = rng.sample(subgroups, min(8, len(subgroups)))
    out = []
    for style in (*TASK_STYLES, *PRETRAIN_STYLES):
        rows = {}
        for sub in shown:
            hexes = sorted(h for h, e in task_emoji.items() if e.subgroup == sub)
            rows[class_name(sub)] = [renders[style][h] for h in hexes[:8]]
        out.append(str(contact_sheet(rows, sheets_dir / f"{style}.png")))
    for source in ("openclipart", "tuxpaint"):
        by_dir: dict[str, list[Path]] = {}
        for p in pairs:
            if p.source == source:
                by_dir.setdefault(p.image.parent.name, []).append(p.image)
        keys = rng.sample(sorted(by_dir), min(10, len(by_dir)))
        rows = {k: _sample(by_dir[k], 8, rng) for k in sorted(keys)}
        out.append(str(contact_sheet(rows, sheets_dir / f"{source}.png")))
    return out


def prepare(cache_dir: Path, size: int = 96, **options) -> dict:
    """Install/locate sources and build every data set under `cache_dir`; return (and save) a count summary."""
    cfg = PrepareConfig(cache_dir=Path(cache_dir).expanduser(), size=size, **options)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"cache_dir": str(cfg.cache_dir), "size": cfg.size, "seed": cfg.seed, "errors": []}
    if cfg.install:
        npm_root = sources.ensure_npm(cfg.cache_dir)
        missing_deb = sources.ensure_debian()
    else:
        npm_root = sources.npm_root(cfg.cache_dir)
        absent = [p for p in sources.NPM_PACKAGES if not (npm_root / sources.split_spec(p)[0]).is_dir()]
        if absent:
            raise sources.SourceError(f"{npm_root}: npm packages missing: {' '.join(absent)} (drop --no-install)")
        missing_deb = [p for p in sources.DEBIAN_PACKAGES if not sources.deb_installed(p)]
    summary["errors"] += [f"Debian package {p} is not installed" for p in missing_deb]

    emoji, renders, emoji_stats = prepare_emoji(cfg, npm_root)
    summary["emoji"] = emoji_stats
    _log(f"emoji: {emoji_stats}")
    tasks_dir = cfg.cache_dir / "tasks"
    task = write_tasks(tasks_dir, emoji["task"], renders, TASK_STYLES, cfg.size, seed=cfg.seed,
                       test_fraction=cfg.test_fraction, min_test=cfg.min_test)
    n_test = sum(len(v["test"]) for v in task["split"].values())
    summary["tasks"] = {"styles": list(TASK_STYLES), "classes": task["classes"], "images_per_task": task["per_task"],
                        "images": sum(task["per_task"].values()), "emoji": len(emoji["task"]),
                        "heldout_test_emoji": n_test, "train_emoji": len(emoji["task"]) - n_test}
    summary["fusion"] = write_fusion(cfg.cache_dir / "fusion", tasks_dir, emoji["task"], TASK_STYLES,
                                     task["split"], n_tags=cfg.n_tags)

    pairs: list[Pair] = []
    summary["pretrain_sources"] = {}
    if (cfg.openclipart_dir / "png").is_dir():
        clip_pairs, summary["pretrain_sources"]["openclipart"] = openclipart_pairs(cfg)
        pairs += clip_pairs
    else:
        summary["errors"].append(f"{cfg.openclipart_dir}/png missing: openclipart skipped")
    if cfg.tuxpaint_dir.is_dir():
        tux_pairs, summary["pretrain_sources"]["tuxpaint"] = tuxpaint_pairs(cfg)
        pairs += tux_pairs
    else:
        summary["errors"].append(f"{cfg.tuxpaint_dir} missing: Tux Paint stamps skipped")
    pairs += emoji_pairs(emoji["all"], renders)
    task_hashes = task_picture_hashes(tasks_dir)
    pairs, task_copies = drop_task_copies(pairs, task_hashes)
    _check_no_task_images(pairs, cfg.cache_dir)
    train, val = split_pairs(pairs, cfg.val_fraction, seed=cfg.seed)
    pre_dir = cfg.cache_dir / "pretrain"
    n_train = write_caption_csv(pre_dir / "train.csv", train)
    n_val = write_caption_csv(pre_dir / "val.csv", val)
    class_word_pairs = with_class_words(train)
    n_class_words = write_caption_csv(pre_dir / "train_classwords.csv", class_word_pairs)
    task_classes = {e.subgroup for e in emoji["task"].values()}
    folder_pairs, folder_counts = with_folder_class_words(class_word_pairs, task_classes)
    n_folder_words = write_caption_csv(pre_dir / "train_classwords_folders.csv", folder_pairs)
    mono_dir = cfg.cache_dir / "emoji" / f"{cfg.size}px-mono"
    for name in TRANSFORMS:  # made from the Fluent colour renders with these settings
        refresh_folder(mono_dir / f"{SOURCE_STYLE}-{name}", mono_made_from(npm_root, cfg.size), log=_log)
    mono_pairs = monochrome_pairs(train, mono_dir)
    mono_pairs, mono_copies = drop_task_copies(mono_pairs, task_hashes)
    task_copies += mono_copies
    _check_no_task_images(mono_pairs, cfg.cache_dir)
    n_mono = write_caption_csv(pre_dir / "train_classwords_mono.csv", class_word_pairs + mono_pairs)
    by_source = Counter(p.source for p in pairs)
    summary["pretrain"] = {"images": len(pairs), "images_by_source": dict(sorted(by_source.items())),
                           "train_images": len(train), "val_images": len(val),
                           "train_pairs": n_train, "val_pairs": n_val,
                           "train_csv": str(pre_dir / "train.csv"), "val_csv": str(pre_dir / "val.csv"),
                           "caption_sets": caption_sets(n_train, n_class_words, n_folder_words, n_mono),
                           "folder_class_words": {"pictures": sum(folder_counts.values()),
                                                  "by_subgroup": dict(sorted(folder_counts.items()))},
                           "monochrome_pictures": len(mono_pairs),
                           # pretraining-style pictures with the same bytes as a task picture, left out
                           "dropped_task_copies": [str(p.relative_to(cfg.cache_dir)) for p in task_copies]}
    if cfg.sheets:
        summary["sheets"] = write_sheets(cfg, emoji["task"], renders, pairs)
    summary["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(cfg.cache_dir / "prepare_summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1), flush=True)
    return summary
