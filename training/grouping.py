"""Gradient-driven task grouping (MmAP sec. 3.3, eq. 8) and the ablation groupings.

1. Train one global shared prompt on all tasks (summed losses, SGD). Every `every` steps (from step 0) take
   each task's gradient w.r.t. the shared prompt; S_ij = mean over snapshots of <g_i, g_j> (or cosine).
2. Partition the tasks into disjoint groups maximising the total within-group similarity
   sum_groups sum_{i<j in group} (S_ij - c), c the mean off-diagonal S_ij (`center`, the default) or 0; c is
   never negative, and 0 for two tasks (see `center_offset`).
   Exact for up to `exact_limit` tasks: a depth-first enumeration of every set partition (Bell(10) = 115,975)
   with incremental scores. Beyond that, a heuristic: agglomerative merging of the pair of groups whose cross
   similarity is largest while it is positive (or until `n_groups` remain), then
   single-task moves between groups while any move raises the score.

Why centre: task gradients w.r.t. one shared prompt usually all agree a little (every S_ij > 0), and with raw
scores any merge then adds score, so the optimum is always one group. Centred, two tasks share a group when their
gradients agree more than the average pair: tasks that agree unusually well end up together, the others apart.
When the average pair conflicts (mean S_ij < 0) c is 0, so the least-conflicting pair is not grouped for being
better than average; with two tasks there is no average to beat, and raw S_12 > 0 groups them.
With `center=False` (raw eq. 8 scores) conflicting tasks (negative S_ij) still end up apart; pass `n_groups` to
ask for exactly that many groups either way.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mmserve.cli_args import positive_int
from mmserve.prompts import build_prompt
from training.classify import Towers
from training.distributed import World
from training.multitask import Batcher, TaskData, multitask_step
from training.options import Opt, option
from training.progress import EpochBar

MODES = ("auto", "all", "single", "random", "file")
GROUP_STEPS = Opt("--group-steps", type=positive_int, help="steps of the global prompt for grouping")
GROUP_EVERY = Opt("--group-every", type=positive_int, help="gradient snapshot period (steps)")


@dataclass
class GroupingConfig:
    """How tasks are grouped: 'auto' (gradient similarity), 'all', 'single', 'random' or 'file'."""

    mode: str = option("auto", flag="--grouping", choices=MODES)
    # mode 'file': [[task, ...], ...], a run's grouping.json, or {"group": [task, ...]}
    file: str | None = option(None, flag="--groups-file", help="JSON groups for --grouping file")
    # auto: exactly this many groups (None = best of any count); random: default 2
    n_groups: int | None = option(None, help="auto: exactly N groups; random: N (default 2)")
    steps: int = option(50, GROUP_STEPS)  # training steps of the global shared prompt
    every: int = option(5, GROUP_EVERY)  # take a gradient snapshot every this many steps
    similarity: str = option("dot", choices=("dot", "cosine"))  # "dot" (eq. 8) or "cosine"
    # score S_ij minus the mean off-diagonal S_ij (see the module docstring)
    center: bool = option(True, flag="--no-center",
                          help="score raw similarities (eq. 8 as printed: all-positive ones always give one group)")
    exact_limit: int = 10  # exact partition search up to this many tasks
    lr: float | None = None  # SGD lr of the global prompt (None = the run's lr)
    batch_size: int | None = None  # per task (None = the run's batch size)


def partition_score(sim: list[list[float]], groups: list[list[int]]) -> float:
    """Total within-group similarity: sum over groups of sum_{i<j} S_ij."""
    return sum(sim[a][b] for g in groups for i, a in enumerate(g) for b in g[i + 1:])


def center_offset(sim: list[list[float]]) -> float:
    """The c subtracted from every S_ij: the mean off-diagonal S_ij, but never below 0 (a conflicting pair, raw
    S_ij <= 0, must not gain from a merge when all pairs conflict) and 0 for fewer than 3 tasks (one pair has no
    other pair to be compared with: raw eq. 8 decides)."""
    n = len(sim)
    if n < 3:
        return 0.0
    pairs = [sim[i][j] for i in range(n) for j in range(n) if i != j]
    return max(0.0, sum(pairs) / len(pairs))


def centered(sim: list[list[float]], offset: float | None = None) -> list[list[float]]:
    """S_ij minus `offset` (default center_offset(S)); the diagonal is never scored."""
    c = center_offset(sim) if offset is None else offset
    return [[sim[i][j] - c for j in range(len(sim))] for i in range(len(sim))]


def exact_partition(sim: list[list[float]], n_groups: int | None = None) -> tuple[list[list[int]], float]:
    """The best set partition by exhaustive depth-first search (restricted growth strings)."""
    n = len(sim)
    best: tuple[float, list[list[int]]] = (float("-inf"), [])
    groups: list[list[int]] = []

    def visit(i: int, score: float) -> None:
        nonlocal best
        if n_groups is not None and len(groups) + (n - i) < n_groups:
            return  # too few tasks left to open the groups still needed
        if i == n:
            if (n_groups is None or len(groups) == n_groups) and score > best[0] + 1e-12:
                best = (score, [list(g) for g in groups])
            return
        for g in groups:
            gain = sum(sim[i][j] for j in g)
            g.append(i)
            visit(i + 1, score + gain)
            g.pop()
        if n_groups is None or len(groups) < n_groups:
            groups.append([i])
            visit(i + 1, score)
            groups.pop()

    visit(0, 0.0)
    return best[1], best[0]


def heuristic_partition(sim: list[list[float]], n_groups: int | None = None) -> tuple[list[list[int]], float]:
    """Agglomerative merging by largest positive cross similarity (or down to `n_groups`), then local moves: a task
    moves to the group it gains most with, or (group count free) out on its own when its own group costs it."""
    groups = [[i] for i in range(len(sim))]
    while len(groups) > 1:
        cross = [(sum(sim[a][b] for a in groups[x] for b in groups[y]), x, y)
                 for x in range(len(groups)) for y in range(x + 1, len(groups))]
        gain, x, y = max(cross)
        if (len(groups) <= n_groups) if n_groups is not None else gain <= 0:
            break
        groups[x] += groups.pop(y)
    improved = True
    while improved:
        improved = False
        for task in range(len(sim)):
            src = next(g for g in groups if task in g)
            if len(src) == 1 and n_groups is not None:
                continue  # moving it would close a group
            loss = sum(sim[task][j] for j in src if j != task)
            # every move strictly raises the partition score, so the loop ends
            options = [g for g in groups if g is not src]
            if n_groups is None and len(src) > 1:
                options.append([])  # a group of its own: gains 0
            gain, dst = max(((sum(sim[task][j] for j in g), i) for i, g in enumerate(options)), default=(0.0, -1))
            if dst >= 0 and gain > loss + 1e-12:
                src.remove(task)
                if options[dst]:
                    options[dst].append(task)
                else:
                    groups.append([task])
                improved = True
            groups = [g for g in groups if g]
    groups = [sorted(g) for g in groups]
    return sorted(groups), partition_score(sim, groups)


def best_partition(sim: list[list[float]], n_groups: int | None = None, exact_limit: int = 10
                   ) -> tuple[list[list[int]], float, str]:
    """Exact search up to `exact_limit` tasks, the heuristic beyond; returns groups, score and the method."""
    if n_groups is not None and not 1 <= n_groups <= len(sim):
        raise ValueError(f"n_groups must be between 1 and {len(sim)}, got {n_groups}")
    if len(sim) <= exact_limit:
        groups, score = exact_partition(sim, n_groups)
        return groups, score, "exact"
    groups, score = heuristic_partition(sim, n_groups)
    return groups, score, "agglomerative+moves"


@dataclass
class Affinity:
    """Task-gradient similarity of a global shared prompt: mean dot products and cosines over snapshots."""

    tasks: list[str]
    dot: list[list[float]]
    cosine: list[list[float]]
    snapshots: int
    losses: list[float]
    prompt: dict[str, torch.Tensor] | None = None  # the global shared prompt as trained (state dict, CPU)


def _task_grad(towers: Towers, task: TaskData, shared, params: list, idx: torch.Tensor, template: str,
               world: World) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One task's gradient on the shared prompt for index batch `idx` (this rank's shard of it, summed over the
    ranks: the whole batch's), its loss, and this rank's correct and seen counts."""
    local = world.shard(idx)
    out = multitask_step(towers, [task], [shared()], [local], template)
    loss = world.share(out.losses[0], len(local), len(idx))
    g = torch.autograd.grad(loss, params)
    flat = world.all_reduce(torch.cat([x.reshape(-1) for x in g]))
    return flat, world.all_reduce(loss.detach().clone()), out.correct[0], out.counts[0]


def task_affinity(towers: Towers, tasks: list[TaskData], prompt_config, cfg: GroupingConfig, lr: float,
                  batch_size: int, template: str, seed: int = 0, progress: bool = True,
                  world: World | None = None) -> Affinity:
    """Train one global shared prompt on all tasks and average the tasks' gradient Gram matrices (across
    processes: every task's batch sharded over the ranks, its gradients summed before they are compared)."""
    world = world or World()
    for flag, value in (("--group-steps", cfg.steps), ("--group-every", cfg.every)):
        if value < 1:  # no snapshot would be taken: the similarity would be 0/0 = NaN
            raise ValueError(f"grouping {flag} must be >= 1, got {value}")
    bb = towers.backbone
    torch.manual_seed(seed)
    shared = build_prompt(prompt_config, bb.text_width, bb.vision_width, bb.text_layers, bb.vision_layers)
    shared = shared.to(towers.device)
    params = [p for p in shared.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    batcher = Batcher([len(t.train) for t in tasks], batch_size, seed + 1_000_000)
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    cos = torch.zeros_like(gram)
    snapshots, losses = 0, []
    bar = EpochBar(range(cfg.steps), 1, 1, progress, desc="grouping")
    for step in bar:
        batches = batcher.next()
        if step % cfg.every == 0:  # snapshot: each task alone, so each backward pass sees one task's graph
            grads, losses_t, correct, counts = [], [], 0, 0
            for task, batch in zip(tasks, batches, strict=True):
                g, task_loss, ok, seen = _task_grad(towers, task, shared, params, batch, template, world)
                grads.append(g)
                losses_t.append(float(task_loss))
                correct, counts = correct + ok, counts + seen
            g = torch.stack(grads).double().cpu()
            gram += g @ g.T
            unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-20)
            cos += unit @ unit.T
            snapshots += 1
            total = torch.stack(grads).sum(dim=0)
            offset = 0
            for p in params:
                p.grad = total[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            loss = sum(losses_t) / len(losses_t)
        else:  # an ordinary step: every task in one batched pass, summed losses
            prompts = shared()
            local = [world.shard(b) for b in batches]
            out = multitask_step(towers, tasks, [prompts] * len(tasks), local, template)
            total_loss = torch.stack([world.share(x, len(lo), len(b))
                                      for x, lo, b in zip(out.losses, local, batches, strict=True)]).sum()
            total_loss.backward()
            world.all_reduce_grads(params)
            loss = float(world.all_reduce(total_loss.detach().clone())) / len(tasks)
            correct, counts = sum(out.correct), sum(out.counts)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)  # mean task loss
        bar.update(loss, correct / counts, counts)
    bar.close()
    state = {k: v.detach().cpu().clone() for k, v in shared.state_dict().items()}
    return Affinity([t.name for t in tasks], (gram / snapshots).tolist(), (cos / snapshots).tolist(), snapshots,
                    losses, state)


RECORD_BATCHES = 4  # gradient batches averaged per task for the grouping record (and for a newcomer)


def task_gradients(towers: Towers, tasks: list[TaskData], prompt_config, prompt: dict[str, torch.Tensor],
                   batches: int, batch_size: int, template: str, seed: int = 0, world: World | None = None
                   ) -> dict[str, torch.Tensor]:
    """Each task's gradient on a fixed global shared prompt (`prompt`, a state dict), averaged over `batches`
    seeded batches of `batch_size`: flat float64 vectors by task name. The same for the grouping record's tasks
    and for a task that joins later, so their similarities are alike."""
    bb = towers.backbone
    shared = build_prompt(prompt_config, bb.text_width, bb.vision_width, bb.text_layers, bb.vision_layers)
    shared.load_state_dict(prompt)
    shared = shared.to(towers.device)
    params = [p for p in shared.parameters() if p.requires_grad]
    out = {}
    for task in tasks:
        batcher = Batcher([len(task.train)], batch_size, seed + 2_000_000)
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for _ in range(batches):
            g, _, _, _ = _task_grad(towers, task, shared, params, batcher.next()[0], template, world or World())
            total += g.double().cpu()
        out[task.name] = total / batches
    return out


@dataclass
class GroupingRecord:
    """What a grouping run keeps for tasks that join later: its global shared prompt and each task's averaged
    gradient on it (training.grouping.task_gradients), with how the gradients were taken and compared."""

    prompt_config: dict
    prompt: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]  # task -> flat float64 gradient
    similarity: str = "dot"
    center: bool = True
    batch_size: int = 16
    batches: int = RECORD_BATCHES
    template: str = ""
    seed: int = 0

    def ref(self) -> dict:
        """The GroupingRef fields of the manifest (weights and sha256 are filled in when written)."""
        return {"prompt_config": dict(self.prompt_config), "similarity": self.similarity, "center": self.center,
                "batch_size": self.batch_size, "batches": self.batches, "template": self.template,
                "seed": self.seed}

    def tensors(self, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The record's weights file: "prompt.<name>" and "gradient.<task>" (of `tasks`, default all)."""
        names = self.gradients if tasks is None else tasks
        return {**{f"prompt.{k}": v for k, v in self.prompt.items()},
                **{f"gradient.{t}": self.gradients[t] for t in names}}

    @classmethod
    def from_tensors(cls, ref, tensors: dict[str, torch.Tensor]) -> GroupingRecord:
        """A record from a GroupingRef and its weights file."""
        prompt = {k.removeprefix("prompt."): v for k, v in tensors.items() if k.startswith("prompt.")}
        grads = {k.removeprefix("gradient."): v for k, v in tensors.items() if k.startswith("gradient.")}
        return cls(dict(ref.prompt_config), prompt, grads, ref.similarity, ref.center, ref.batch_size, ref.batches,
                   ref.template, ref.seed)

    def same_prompt(self, other: GroupingRecord) -> bool:
        """True when both records hold the same global shared prompt (the same grouping run)."""
        return (self.prompt_config == other.prompt_config and self.prompt.keys() == other.prompt.keys()
                and all(torch.equal(v, other.prompt[k]) for k, v in self.prompt.items()))


def similarity_matrix(gradients: list[torch.Tensor], kind: str) -> list[list[float]]:
    """S_ij of averaged gradients: dot products, or cosines."""
    g = torch.stack([x.double() for x in gradients])
    if kind == "cosine":
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return (g @ g.T).tolist()


def join_gains(record: GroupingRecord, groups: dict[str, list[str]], name: str, gradient: torch.Tensor
               ) -> dict[str, float]:
    """What task `name` (its averaged gradient on the record's prompt) adds to the score the joint grouping
    maximises (the centred partition score over every task, itself included) by joining each group, versus a
    group of its own (gain 0)."""
    members = [t for g in groups.values() for t in g]
    sim = similarity_matrix([record.gradients[t] for t in members] + [gradient], record.similarity)
    scored = centered(sim, center_offset(sim) if record.center else 0.0)
    index = {t: i for i, t in enumerate(members)}
    parts = [[index[t] for t in g] for g in groups.values()]
    me = len(members)
    alone = partition_score(scored, [*parts, [me]])
    gains = {}
    for i, group in enumerate(groups):
        joined = [p + [me] if j == i else p for j, p in enumerate(parts)]
        gains[group] = partition_score(scored, joined) - alone
    return gains


def read_groups_file(path: str | Path, names: list[str]) -> list[list[str]]:
    """Groups from JSON: [[task, ...], ...], a run's grouping.json ({"groups": [...], ...}) or {group: [tasks]}.

    Every task must appear exactly once, and every group must be a non-empty list of task names.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        groups = data["groups"] if isinstance(data.get("groups"), list) and all(
            isinstance(g, list) for g in data["groups"]) else list(data.values())
    else:
        groups = data
    _check_groups(path, groups)
    flat = [t for g in groups for t in g]
    if sorted(flat) != sorted(names):
        raise ValueError(f"{path}: groups must cover every task exactly once; tasks {sorted(names)}, "
                         f"file has {sorted(flat)}")
    return [list(g) for g in groups]


def _check_groups(path: str | Path, groups) -> None:
    """Refuse anything but a list of non-empty lists of task names, naming the file and the group."""
    if not isinstance(groups, list):
        raise ValueError(f"{path}: field groups: expected a list of task lists, got {type(groups).__name__}")
    for i, g in enumerate(groups):
        if not isinstance(g, list) or not all(isinstance(t, str) for t in g):
            raise ValueError(f"{path}: field groups[{i}]: expected a list of task names, got {g!r}")
        if not g:
            raise ValueError(f"{path}: field groups[{i}]: a group must name at least one task")


def random_groups(names: list[str], n_groups: int, seed: int) -> list[list[str]]:
    """A seeded random partition into `n_groups` non-empty groups."""
    n_groups = max(1, min(n_groups, len(names)))
    order = list(names)
    random.Random(f"{seed}:groups").shuffle(order)
    groups = [order[i::n_groups] for i in range(n_groups)]
    return [sorted(g) for g in groups]


def choose_groups(cfg: GroupingConfig, names: list[str], affinity: Affinity | None = None, seed: int = 0
                  ) -> tuple[list[list[str]], dict]:
    """The groups for `cfg.mode` and a record of how they were chosen (saved with the run)."""
    if cfg.mode not in MODES:
        raise ValueError(f"grouping must be one of {MODES}, got {cfg.mode!r}")
    info: dict = {"mode": cfg.mode}
    if cfg.mode == "all":
        groups = [list(names)]
    elif cfg.mode == "single":
        groups = [[n] for n in names]
    elif cfg.mode == "random":
        groups = random_groups(names, cfg.n_groups or 2, seed)
    elif cfg.mode == "file":
        if not cfg.file:
            raise ValueError("grouping 'file' needs a groups file")
        groups = read_groups_file(cfg.file, names)
        info["file"] = str(cfg.file)
    else:
        if affinity is None:
            raise ValueError("grouping 'auto' needs the task affinity")
        sim = affinity.dot if cfg.similarity == "dot" else affinity.cosine
        offset = center_offset(sim) if cfg.center else 0.0
        scored = centered(sim, offset)  # offset 0: the raw similarities
        index_groups, score, method = best_partition(scored, cfg.n_groups, cfg.exact_limit)
        groups = [[affinity.tasks[i] for i in g] for g in index_groups]
        info |= {"similarity_kind": cfg.similarity, "centered": cfg.center,
                 "center_offset": offset, "score": score, "method": method,
                 "tasks": affinity.tasks,
                 "similarity": affinity.dot, "cosine": affinity.cosine, "snapshots": affinity.snapshots,
                 "global_prompt_losses": affinity.losses}
    info["groups"] = groups
    return groups, info
