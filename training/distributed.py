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
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of one task's index batch."""
        return idx if self.size == 1 else torch.tensor_split(idx, self.size)[self.rank]

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

    def check_batch(self, smallest: int) -> None:
        """Refuse a step whose smallest task batch cannot give every rank one sample."""
        if smallest < self.size:
            raise ValueError(f"torchrun: {self.size} ranks need at least {self.size} samples of every task per step "
                             f"(--batch-size and the smallest task give {smallest})")


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
