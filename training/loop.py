"""The one training loop of every trainer: seeded epochs of optimiser steps, then eval, metrics, checkpoint, stop.

A trainer hands EpochLoop its parameters, optimiser config, data sizes and seed, and one function that trains
an epoch (`train_epoch(epoch) -> record`, drawing its batches from `epoch.batches()` and calling
`epoch.optimise(loss)` per step). The loop owns everything around it: the optimiser and per-step schedule,
the per-epoch seed and Batcher, the progress bar, the test scores when due (`evaluate(record)`, every epoch or
the last only), the history, and, with `checkpoint`, metrics.json and a resumable checkpoint.pt after every
epoch and a stop after `stop_after_epoch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.config import OptimConfig
from training.distributed import World
from training.multitask import Batcher
from training.optim import make_optimizer, make_scheduler
from training.progress import EpochBar, log
from training.runs import epoch_seed, save_checkpoint, write_json


@dataclass
class Checkpoint:
    """What a resumable run saves after every epoch in `run_dir`: metrics.json so far, and checkpoint.pt."""

    run_dir: Path
    config: dict  # the run's config (load_checkpoint refuses a checkpoint of another config)
    modules: dict[str, nn.Module]  # saved by state dict under these keys ("bank", "model")
    extra: dict = field(default_factory=dict)  # more fields of checkpoint.pt (a run's groups)


@dataclass
class Epoch:
    """One epoch as its `train_epoch` sees it: its number, the lr it starts at, its batches and the optimiser."""

    number: int
    lr: float
    batcher: Batcher
    bar: EpochBar
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    world: World = field(default_factory=World)  # across processes: gradients summed over the ranks

    def batches(self) -> Iterator[list[torch.Tensor]]:
        """The epoch's steps, each one index batch per task."""
        for _ in self.bar:
            yield self.batcher.next()

    def optimise(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` (its gradients summed over the ranks), then one schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.world.all_reduce_grads([p for g in self.optimizer.param_groups for p in g["params"]])
        self.optimizer.step()
        self.scheduler.step()

    def show(self, loss: float, score: float, count: int) -> None:
        """Add one step's mean loss and score (over `count` samples) to the progress bar."""
        self.bar.update(loss, score, count)


class EpochLoop:
    """Seeded epochs of optimiser steps over `params`; see the module docstring."""

    def __init__(self, params: list, optim: OptimConfig, sizes: list[int], seed: int, *,
                 checkpoint: Checkpoint | None = None, stop_after_epoch: int | None = None,
                 eval_each_epoch: bool = True, progress: bool = True, metric: str = "acc",
                 world: World | None = None):
        self.world = world or World()
        self.optim = optim
        self.sizes = sizes
        self.seed = seed
        self.checkpoint = checkpoint
        self.stop_after_epoch = stop_after_epoch
        self.eval_each_epoch = eval_each_epoch
        self.progress = progress
        self.metric = metric
        self.optimizer = make_optimizer(params, optim)
        self.steps = Batcher(sizes, optim.batch_size, 0).steps_per_epoch
        self.scheduler = make_scheduler(self.optimizer, optim, self.steps)
        self.history: list[dict] = []
        self.done = 0  # epochs finished (a resumed run starts after its checkpoint's)

    def resume(self, state: dict) -> None:
        """Continue after the epoch of a checkpoint written by this loop (training.runs.load_checkpoint)."""
        if self.checkpoint is None:
            raise ValueError("only a loop that saves checkpoints can resume from one")
        for key, module in self.checkpoint.modules.items():
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.done = state["history"], state["epoch"]
        log(f"resuming after epoch {self.done}")

    def run(self, train_epoch: Callable[[Epoch], dict], evaluate: Callable[[dict], None] | None = None,
            describe: Callable[[dict], str] | None = None) -> int | None:
        """Train the remaining epochs; return the epoch it stopped after (stop_after_epoch), or None when done.

        `train_epoch` returns the epoch's record; `evaluate` adds test scores to it (every epoch, or only the last
        without eval_each_epoch); `describe` gives the epoch's log line.
        """
        epochs = self.optim.epochs
        for number in range(self.done + 1, epochs + 1):
            torch.manual_seed(epoch_seed(self.seed, number))
            epoch = Epoch(number, self.optimizer.param_groups[0]["lr"],
                          Batcher(self.sizes, self.optim.batch_size, epoch_seed(self.seed, number)),
                          EpochBar(range(self.steps), number, epochs, self.progress, self.metric),
                          self.optimizer, self.scheduler, self.world)
            record = train_epoch(epoch)
            epoch.bar.close(quiet=describe is not None)  # off a terminal: the one line per epoch is describe's
            if evaluate is not None and (self.eval_each_epoch or number == epochs):
                evaluate(record)
            self.history.append(record)
            self.done = number
            if describe is not None:
                log(f"epoch {number}: {describe(record)}")
            if self.checkpoint is not None:
                self._save(number)
            if self.stop_after_epoch is not None and self.stop_after_epoch <= number < epochs:
                log(f"stopping after epoch {number}; resume with --resume")
                return number
        return None

    def _save(self, number: int) -> None:
        if not self.world.is_main:  # rank 0 writes the run
            return
        ck = self.checkpoint
        write_json(ck.run_dir / "metrics.json", {"epochs": self.history, "final": None})
        save_checkpoint(ck.run_dir, {"epoch": number, "config": ck.config,
                                     **{key: m.state_dict() for key, m in ck.modules.items()},
                                     "optimizer": self.optimizer.state_dict(),
                                     "scheduler": self.scheduler.state_dict(), "history": self.history, **ck.extra})
