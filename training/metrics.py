"""Scores: accuracy for multi-class heads, F1 (micro and macro) for multi-label heads."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of predicted class indices equal to the targets."""
    return float((pred == target).float().mean()) if len(target) else 0.0


def f1_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Micro and macro F1 of boolean (N, C) predictions; macro skips classes absent from targets and predictions."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(dim=0).float()
    fp = (pred & ~target).sum(dim=0).float()
    fn = (~pred & target).sum(dim=0).float()
    denom = 2 * tp + fp + fn
    micro = float(2 * tp.sum() / denom.sum()) if denom.sum() > 0 else 0.0
    present = denom > 0
    macro = float((2 * tp[present] / denom[present]).mean()) if present.any() else 0.0
    return {"f1_micro": micro, "f1_macro": macro}


def primary_metric(metrics: dict) -> tuple[str, float]:
    """The headline score of a metrics dict: accuracy, else micro F1."""
    for key in ("accuracy", "f1_micro"):
        if key in metrics:
            return key, metrics[key]
    raise KeyError("metrics hold neither accuracy nor f1_micro")
