"""The runs dir: one directory per (method, shots, seed), its settings, machine records and groupings."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from mmserve.backbone import Backbone
from training.config import DEFAULT_FUSE_RECIPE
from training.grouping import GroupingConfig
from training.progress import log
from training.runs import to_jsonable, write_json

from .methods import METHODS, RESULT, ZERO_SHOT, ResultsConfig


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Where a run ran: host, CPU, cores, torch threads, GPU (when on CUDA), torch version."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(m: dict) -> str:
    """One line: the GPU, or the CPU with its core and thread counts."""
    if m.get("described"):  # a run restored from a published table that kept only this line
        return m["described"]
    if m.get("gpu"):
        return f"{m['gpu']} ({m.get('host', '?')})"
    return f"CPU {m.get('cpu', '?')}, {m.get('cpus', '?')} cores, {m.get('threads', '?')} torch threads " \
           f"({m.get('host', '?')})"


def settings_of(rc: ResultsConfig, backbone: Backbone, styles: list[str]) -> dict:
    """The settings that make two runs comparable (and key the default runs dir)."""
    return {"model": rc.model, "backbone_fingerprint": backbone.fingerprint, "epochs": rc.epochs, "lr": rc.lr,
            "fuse_epochs": rc.fuse_epochs, "group_steps": rc.group_steps, "group_every": rc.group_every,
            "mope": dict(sorted(rc.mope.items())), "template": rc.template, "styles": styles,
            # only when not the default: the published tables' settings (and runs dirs) predate the option
            **({"fuse_recipe": rc.fuse_recipe} if rc.fuse_recipe != DEFAULT_FUSE_RECIPE else {})}


def resolve_runs_dir(runs_dir: str | None, cache: str, settings: dict, root: str = "results") -> Path:
    """The runs dir (default <cache>/<root>/<model>-<fingerprint>-<settings hash>); refuse one holding runs
    made with other settings."""
    if runs_dir:
        runs = Path(runs_dir)
    else:
        digest = hashlib.sha256(json.dumps(to_jsonable(settings), sort_keys=True).encode()).hexdigest()[:8]
        runs = Path(cache) / root / f"{settings['model']}-{settings['backbone_fingerprint'][:10]}-{digest}"
    path = runs / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != to_jsonable(settings):
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != to_jsonable(settings).get(k))
            raise ValueError(f"{runs}: holds runs made with other settings (differs in {changed}); pass another "
                             f"--runs-dir or leave it out for a fresh table")
    else:
        write_json(path, settings)
    return runs


def selected_methods(names: list[str] | None) -> list[str]:
    """The method keys to run, in table order; unknown names are refused."""
    if not names:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [k for k in METHODS if k in names]


def cell_dir(runs: Path, method: str, shots: int | None = None, seed: int | None = None) -> Path:
    """Run dir of one cell (zero-shot rows have one per family, independent of shots and seed)."""
    m = METHODS[method]
    if method in ZERO_SHOT:
        return runs / m.family / method
    return runs / m.family / method / f"k{shots}-s{seed}"


def read_result(path: Path) -> dict | None:
    """A finished cell's result.json, or None."""
    f = path / RESULT
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def current_grouping(path: Path) -> bool:
    """Whether a stored grouping was scored as the trainer scores now (centred or raw, `GroupingConfig.center`)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("centered") == GroupingConfig().center


def set_aside(runs: Path, path: Path) -> Path:
    """Move a stale file or run dir under <runs>/stale/ (same relative path, a numbered suffix if taken)."""
    dest = runs / "stale" / path.relative_to(runs)
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{path.name}.{n}")
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    path.rename(dest)
    log(f"results: set aside stale {path} -> {dest}")
    return dest


def random_group_count(found: list[list[str]], n_tasks: int) -> int:
    """Groups of the random-grouping ablation: as many as the computed grouping, 2 when it found 1 or T."""
    return len(found) if 1 < len(found) < n_tasks else 2
