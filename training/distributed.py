"""Training across processes (torchrun): each rank takes a shard of every task's batch, gradients are summed.

`torchrun --nproc-per-node N -m training.cli classify ...` sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous
variables; `world_from_env` joins the process group from them only when WORLD_SIZE > 1 (gloo on CPU, nccl on
CUDA, each rank on cuda:LOCAL_RANK). Every rank draws the same global batch (the same seeded Batcher), keeps its
contiguous shard of each task's indices, and weights its loss by its share of the batch (`share`), so the sum of
the ranks' gradients (`all_reduce_grads`, the all-reduce DistributedDataParallel makes, done on the flat gradient
because the grouping's per-task gradients come from torch.autograd.grad, which DDP's hooks never see) is the
one-process gradient of the whole batch: the same seed and global batch give the same prompts. Ranks whose data
differ are refused before training (`check_same`: an all-gather of a hash); only rank 0 writes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from training.splits import SplitTask

C = TypeVar("C", bound=Any)  # a run config with a `backbone` (a BackboneConfig)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that writes the run."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous rows of a batch of `n` (torch.tensor_split's parts: the first n % size ranks
        take one more)."""
        if self.size == 1:
            return slice(0, n)
        base, extra = divmod(n, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of one task's index batch."""
        return idx[self.rows(len(idx))]

    def share(self, loss: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
        """A shard's mean loss weighted so that the ranks' summed gradients are the whole batch's mean's."""
        return loss if self.size == 1 else loss * (n_local / n_global)

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks (one flat all-reduce; a missing gradient counts 0)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (in place; the tensor itself for one process)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of per-rank numbers (epoch statistics)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: object) -> list:
        """Every rank's `value`, in rank order (a one-item list for one process)."""
        if self.size == 1:
            return [value]
        out: list = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def check_same(self, what: str, value: object) -> None:
        """Refuse to go on unless every rank holds the same `value` (hashed): ranks must see the same data."""
        if self.size == 1:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
        seen: list[str | None] = [None] * self.size
        dist.all_gather_object(seen, digest)
        if len(set(seen)) > 1:
            differ = [r for r, d in enumerate(seen) if d != seen[0]]
            raise ValueError(f"torchrun: rank(s) {differ} see different {what} than rank 0 (hashes {seen}); give every "
                             f"rank the same split file and options")

    def check_run(self, tasks: Mapping[str, SplitTask], config: dict, **more: object) -> None:
        """Refuse ranks whose split (every task's classes, train and test items) or run options differ (`more`:
        anything else they must share)."""
        self.check_same("data", {"split": {n: (t.classes, [i.to_dict() for i in t.train],
                                               [i.to_dict() for i in t.test]) for n, t in tasks.items()},
                                 "config": {k: v for k, v in config.items() if k not in ("backbone", "progress")},
                                 **more})

    def check_batch(self, smallest: int) -> None:
        """Refuse a step whose smallest task batch cannot give every rank one sample."""
        if smallest < self.size:
            raise ValueError(f"torchrun: {self.size} ranks need at least {self.size} samples of every task per step "
                             f"(--batch-size and the smallest task give {smallest})")


def join_world(cfg: C) -> tuple[World, C]:
    """This process's World (world_from_env) and the run config `cfg` on the device it trains on."""
    world, device = world_from_env(cfg.backbone.device)
    return world, cfg if device == cfg.backbone.device else replace(cfg, backbone=replace(cfg.backbone,
                                                                                        device=device))


def world_from_env(device: str = "cpu") -> tuple[World, str]:
    """This process's World from torchrun's variables (joining the process group when WORLD_SIZE > 1) and the
    device it trains on (cuda:LOCAL_RANK for a CUDA run across processes)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local), device


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
