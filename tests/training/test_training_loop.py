"""training.loop.EpochLoop, the one loop of every trainer: seeded epochs, eval when due, checkpoints, stop/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import OptimConfig
from training.loop import Checkpoint, Epoch, EpochLoop
from training.runs import CHECKPOINT, load_checkpoint

X = torch.linspace(-1, 1, 20).unsqueeze(1)
Y = (X[:, 0] > 0).long()
OPTIM = OptimConfig(epochs=4, batch_size=6, lr=0.5)


def _loop(run_dir: Path | None, **kw) -> tuple[EpochLoop, nn.Linear]:
    torch.manual_seed(0)
    head = nn.Linear(1, 2)
    checkpoint = Checkpoint(run_dir, {"what": "toy"}, {"head": head}, {"note": 1}) if run_dir else None
    return EpochLoop(list(head.parameters()), OPTIM, [len(X)], seed=3, checkpoint=checkpoint, progress=False,
                     **kw), head


def _train(head: nn.Linear):
    def train_epoch(epoch: Epoch) -> dict:
        total, seen = 0.0, 0
        for batch in epoch.batches():
            idx = batch[0]
            loss = nn.functional.cross_entropy(head(X[idx]), Y[idx])
            epoch.optimise(loss)
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        return {"epoch": epoch.number, "lr": epoch.lr, "train_loss": total / seen,
                "noise": float(torch.rand(()))}  # the per-epoch seed: the same draw on a resumed run
    return train_epoch


@pytest.mark.parametrize(("each", "wanted"), [(True, [1, 2, 3, 4]), (False, [4])])
def test_epochs_steps_and_eval_when_due(tmp_path: Path, monkeypatch, each: bool, wanted: list[int]):
    monkeypatch.chdir(tmp_path)
    loop, head = _loop(None, eval_each_epoch=each)
    assert loop.steps == 4  # ceil(20 / 6)
    seen = []

    def evaluate(record: dict) -> None:
        seen.append(record["epoch"])
        record["test"] = 1.0

    assert loop.run(_train(head), evaluate) is None
    assert seen == wanted and [r["epoch"] for r in loop.history] == [1, 2, 3, 4]
    assert [("test" in r) for r in loop.history] == [e in wanted for e in (1, 2, 3, 4)]
    assert list(tmp_path.iterdir()) == []  # no checkpoint: nothing written


def test_stop_then_resume_is_the_uninterrupted_run(tmp_path: Path, capsys):
    whole, whole_head = _loop(tmp_path / "whole")
    whole.run(_train(whole_head), describe=lambda r: f"loss {r['train_loss']:.3f}")
    assert f"epoch 4: loss {whole.history[-1]['train_loss']:.3f}" in capsys.readouterr().err
    run_dir = tmp_path / "cut"
    first, head = _loop(run_dir, stop_after_epoch=2)
    assert first.run(_train(head)) == 2
    assert "stopping after epoch 2" in capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"] is None and [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert list(state) == ["epoch", "config", "head", "optimizer", "scheduler", "history", "note"]
    assert state["epoch"] == 2 and state["note"] == 1
    again, head = _loop(run_dir)
    again.resume(load_checkpoint(run_dir, {"what": "toy"}))
    assert again.run(_train(head)) is None
    assert again.history == whole.history
    assert torch.equal(head.weight, whole_head.weight) and torch.equal(head.bias, whole_head.bias)
    with pytest.raises(ValueError, match="different config"):
        load_checkpoint(run_dir, {"what": "other"})


def test_a_log_file_gets_one_line_per_epoch(capsys):
    """Off a terminal, with progress on and a describe line, each epoch writes exactly one line and no redraws."""
    torch.manual_seed(0)
    head = nn.Linear(1, 2)
    loop = EpochLoop(list(head.parameters()), OPTIM, [len(X)], seed=3, progress=True)
    loop.run(_train(head), describe=lambda r: f"train loss {r['train_loss']:.3f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[0] for line in err.splitlines()] == [f"[mmserve-train] epoch {n}" for n in (1, 2, 3, 4)]
