"""Progress reporting: a tqdm bar with running loss and accuracy, and one-line log messages on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def log(message: str) -> None:
    """One progress line on stderr (keeps stdout free for machine-readable output)."""
    print(f"[mmserve-train] {message}", file=sys.stderr, flush=True)


class RunningMean:
    """Mean of the values seen so far, weighted by their counts."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float, count: int = 1) -> None:
        """Add `count` observations whose mean is `value`."""
        self.total += float(value) * count
        self.count += count

    @property
    def mean(self) -> float:
        """The running mean (0 before any value)."""
        return self.total / self.count if self.count else 0.0


class EpochBar:
    """A tqdm bar over one epoch's steps whose postfix shows the running loss and accuracy."""

    def __init__(self, steps: Iterable[int], epoch: int, epochs: int, enabled: bool = True, metric: str = "acc",
                 desc: str | None = None):
        self.bar = tqdm(steps, desc=desc or f"epoch {epoch}/{epochs}", disable=not enabled, leave=False,
                        dynamic_ncols=True, file=sys.stderr)
        self.loss = RunningMean()
        self.score = RunningMean()
        self.metric = metric

    def __iter__(self) -> Iterator[int]:
        return iter(self.bar)

    def update(self, loss: float, score: float, count: int) -> None:
        """Record one step's mean loss and score over `count` samples and refresh the postfix."""
        self.loss.add(loss, count)
        self.score.add(score, count)
        self.bar.set_postfix({"loss": f"{self.loss.mean:.4f}", self.metric: f"{self.score.mean:.3f}"}, refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
