"""Run directories: their setup, config.json, metrics.json, split.json, checkpoints, and a run's result object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mmserve.backbone import Backbone
from mmserve.fileio import atomic_write, atomic_write_json
from mmserve.registry import BackboneRef
from training.classify import Towers
from training.config import reuse_or_load
from training.data import BadFiles
from training.splits import Split, write_split

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

    @classmethod
    def stopped(cls, run_dir: Path, epoch: int, history: list[dict], trainable_params: int,
                groups: list[list[str]] | None, skipped: list[dict]) -> RunResult:
        """The result of a run that left after `epoch` (stop_after_epoch) with a checkpoint, before its registry."""
        return cls(run_dir, run_dir / "registry", {"stopped_after_epoch": epoch}, history, trainable_params, groups,
                   {}, skipped)


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


@dataclass
class RunStart:
    """What every trainer sets up first: its run dir, its config as JSON, the bad-file policy, backbone and split."""

    run_dir: Path
    config: dict
    bad: BadFiles
    backbone: Backbone
    towers: Towers
    split: Split
    root: str

    def write_config(self, **extra: Any) -> None:
        """config.json: the run's config with the split as drawn, the backbone's fingerprint, then `extra`."""
        # a reused split file decides the data: record how it was drawn, not the command line's split options
        write_json(self.run_dir / "config.json", self.config | {"split": to_jsonable(self.split.config),
                                                                "backbone_fingerprint": self.backbone.fingerprint,
                                                                **extra})


def start_run(cfg: Any, backbone: Backbone | None, load_split: Callable[[Any, BadFiles], tuple[Split, str]],
              write: bool = True) -> RunStart:
    """Make cfg.run_dir, load (or reuse) the backbone, read or draw the split (`load_split`) into split.json
    (not `write`: nothing is written, as for ranks other than 0 of a torchrun world)."""
    run_dir = Path(cfg.run_dir)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = to_jsonable(cfg)
    bad = BadFiles(cfg.on_bad_file)
    backbone = reuse_or_load(backbone, cfg.backbone)
    towers = Towers.of(backbone)
    split, root = load_split(cfg, bad)
    if write:
        write_split(run_dir / "split.json", split)
    return RunStart(run_dir, config, bad, backbone, towers, split, root)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch, so that a resumed run draws exactly what an uninterrupted one would."""
    return seed * 1_000 + epoch
