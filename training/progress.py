"""Progress reporting: a tqdm bar with running loss and accuracy (one line per epoch when stderr is not a
terminal), and one-line log messages on stderr."""

from __future__ import annotations

import sys
import time
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


def on_terminal() -> bool:
    """Whether stderr is a terminal (a bar redraws in place there; in a log file each redraw would stay)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class EpochBar:
    """A tqdm bar over one epoch's steps whose postfix shows the running loss and accuracy.

    When stderr is not a terminal (a log file, a pipe), there is no bar: closing it logs one line instead,
    e.g. "epoch 3/10 loss 0.4120 acc 0.610 12.3s", never tqdm's carriage-return redraws.
    """

    def __init__(self, steps: Iterable[int], epoch: int, epochs: int, enabled: bool = True, metric: str = "acc",
                 desc: str | None = None):
        self.desc = desc or f"epoch {epoch}/{epochs}"
        self.line = enabled and not on_terminal()
        self.bar = tqdm(steps, desc=self.desc, disable=not enabled or self.line, leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        self.loss = RunningMean()
        self.score = RunningMean()
        self.metric = metric
        self.started = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        return iter(self.bar)

    def update(self, loss: float, score: float, count: int) -> None:
        """Record one step's mean loss and score over `count` samples and refresh the postfix."""
        self.loss.add(loss, count)
        self.score.add(score, count)
        self.bar.set_postfix({"loss": f"{self.loss.mean:.4f}", self.metric: f"{self.score.mean:.3f}"}, refresh=False)

    def close(self, quiet: bool = False) -> None:
        """Close the bar (off a terminal: log the epoch's one line, unless `quiet`: the caller logs its own)."""
        self.bar.close()
        if self.line and not quiet:
            log(f"{self.desc} loss {self.loss.mean:.4f} {self.metric} {self.score.mean:.3f} "
                f"{time.monotonic() - self.started:.1f}s")
