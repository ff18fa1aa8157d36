"""Training for mmserve: data and splits, zero-shot baseline, task grouping, MmAP / MoPE trainers, evaluation.

Plain functions for scripts (the `mmserve-train` CLI calls the same ones):
    train_multitask(MultiTaskConfig) -> RunResult      training.mmap_trainer
    train_mope(FuseConfig) -> RunResult                training.mope_trainer
    zero_shot(backbone, split) -> {task: metrics}      training.zeroshot
    evaluate_registry(registry_dir, split_file) -> EvalReport   training.evaluate
They are imported lazily here, so `import training` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MultiTaskConfig": "training.mmap_trainer", "PromptSpec": "training.mmap_trainer",
    "train_multitask": "training.mmap_trainer", "FuseConfig": "training.mope_trainer",
    "train_mope": "training.mope_trainer", "zero_shot": "training.zeroshot",
    "evaluate_registry": "training.evaluate", "EvalReport": "training.evaluate", "RunResult": "training.runs",
    "GroupingConfig": "training.grouping", "BackboneConfig": "training.config", "OptimConfig": "training.config",
    "SplitConfig": "training.config",
}


def __getattr__(name: str):
    """Import the public entry points on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
