"""Progress: a tqdm bar on a terminal; off one (a log file), one line per epoch and never a carriage return."""

from __future__ import annotations

import io
import re
import sys

from training.progress import EpochBar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _epoch(enabled: bool = True) -> None:
    bar = EpochBar(range(5), 3, 10, enabled)
    for _ in bar:
        bar.update(0.5, 0.75, 4)
    bar.close()


def test_off_a_terminal_one_line_per_epoch(capsys):
    _epoch()
    _epoch()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert all(re.fullmatch(r"\[mmserve-train\] epoch 3/10 loss 0\.5000 acc 0\.750 \d+\.\ds", line) for line in lines)


def test_on_a_terminal_a_bar_and_no_extra_line(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _epoch()
    out = terminal.getvalue()
    assert "\r" in out and "epoch 3/10" in out  # tqdm's redraws, in place
    assert "[mmserve-train]" not in out


def test_disabled_is_silent_everywhere(capsys, monkeypatch):
    _epoch(enabled=False)
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _epoch(enabled=False)
    assert terminal.getvalue() == ""


def test_a_caller_with_its_own_epoch_line_gets_no_second_one(capsys):
    bar = EpochBar(range(2), 1, 2)
    for _ in bar:
        bar.update(0.5, 0.75, 4)
    bar.close(quiet=True)
    assert capsys.readouterr().err == ""
