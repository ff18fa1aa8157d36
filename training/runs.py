"""Run directories: config.json, metrics.json, split.json, checkpoints, and the result object of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mmserve.backbone import Backbone
from mmserve.fileio import atomic_write, atomic_write_json
from mmserve.registry import BackboneRef

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunResult:
    """What a training run produced: where it wrote, its final and per-epoch metrics, groups, predictions."""

    run_dir: Path
    registry_dir: Path
    final: dict
    epochs: list[dict]
    trainable_params: int
    groups: list[list[str]] | None = None
    predictions: dict[str, list] = field(default_factory=dict)  # task -> test predictions (class names)
    skipped: list[dict] = field(default_factory=list)  # bad files left out


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tensors turned into plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (a unique temp file, fsynced, then renamed; removed if the write fails)."""
    atomic_write_json(path, to_jsonable(obj))


def backbone_ref(backbone: Backbone) -> BackboneRef:
    """The registry's record of the backbone a run trained on."""
    return BackboneRef(backbone.spec.model, backbone.fingerprint, backbone.spec.pretrained)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the resumable state after an epoch (atomically)."""
    atomic_write(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path, config: dict) -> dict | None:
    """The last epoch's state, if there is one and it was written by a run with the same config."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("resume", "stop_after_epoch", "progress")}
    now = {k: v for k, v in config.items() if k not in ("resume", "stop_after_epoch", "progress")}
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"{path}: written with a different config (differs in {changed}); use a new run dir")
    return state


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch, so that a resumed run draws exactly what an uninterrupted one would."""
    return seed * 1_000 + epoch
