"""Optimisers and learning-rate schedules from an OptimConfig."""

from __future__ import annotations

import math

import torch

from training.config import OptimConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (MmAP) or AdamW (MoPE)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: `warmup_epochs` at warmup_lr, then cosine decay to 0, constant, or step decay (x
    decay_factor after each epoch of decay_epochs, counted from 1 and from the start, warm-up included)."""
    if cfg.schedule not in ("cosine", "constant", "step"):
        raise ValueError(f"schedule must be 'cosine', 'constant' or 'step', got {cfg.schedule!r}")
    if cfg.schedule == "step" and not cfg.decay_epochs:
        raise ValueError("schedule 'step' needs decay_epochs (--decay-epochs E [E ...])")
    warm = cfg.warmup_epochs * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch - warm)
    bounds = sorted(e * steps_per_epoch for e in cfg.decay_epochs)

    def factor(step: int) -> float:
        if step < warm:
            return cfg.warmup_lr / cfg.lr
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.decay_factor ** sum(step >= b for b in bounds)
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
