"""mmserve.fileio: the one atomic write (temp beside the target, mode, rename, cleanup) and its byte/JSON forms."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mmserve.fileio import FILE_MODE, atomic_write, atomic_write_bytes, atomic_write_json


def test_write_callback_gets_a_unique_temp_beside_the_target(tmp_path: Path):
    target = tmp_path / "sub" / "out.bin"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and tmp.exists()
        tmp.write_bytes(b"new")

    assert atomic_write(target, write) is True
    assert target.read_bytes() == b"new" and not seen[0].exists()
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    atomic_write(target, write)
    assert seen[0] != seen[1]  # every write its own temp: concurrent writers never share one


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_same_leaves_an_equal_file_untouched(tmp_path: Path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"abc")
    before = target.stat().st_mtime_ns
    same = lambda old, new: old.read_bytes() == new.read_bytes()  # noqa: E731
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"abc"), same=same) is False
    assert target.stat().st_mtime_ns == before and sorted(tmp_path.iterdir()) == [target]
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"xyz"), same=same) is True
    assert target.read_bytes() == b"xyz"


def test_bytes_and_json_forms(tmp_path: Path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "a.json", {"b": [1], "a": "é"})
    assert (tmp_path / "a.json").read_text() == json.dumps({"b": [1], "a": "é"}, indent=1) + "\n"
    atomic_write_json(tmp_path / "b.json", {"b": 1, "a": "é"}, indent=None, sort_keys=True, ensure_ascii=False)
    assert (tmp_path / "b.json").read_bytes() == '{"a": "é", "b": 1}\n'.encode()


def test_a_write_that_need_not_be_durable_is_whole_and_never_synced(tmp_path, monkeypatch) -> None:
    import mmserve.fileio as fileio

    def no_sync(path) -> None:
        raise AssertionError("fsync on a write that need not be durable")

    monkeypatch.setattr(fileio, "fsync_path", no_sync)
    target = tmp_path / "sub" / "f.bin"
    fileio.atomic_write_bytes(target, b"one", durable=False)
    fileio.atomic_write_bytes(target, b"two", durable=False)
    assert target.read_bytes() == b"two" and [p.name for p in target.parent.iterdir()] == ["f.bin"]
