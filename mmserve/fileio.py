"""File helpers shared by everything that writes artefacts others read: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (read by setting and restoring it, once, at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# the mode open() gives a new file; mkstemp's 0600 is meant for the temp name, not for the artefact it becomes (a
# registry written by a trainer must be readable by the account that serves it)
FILE_MODE = 0o666 & ~_umask()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a written file, or a directory's entries after a rename, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], *,
                 same: Callable[[Path, Path], bool] | None = None, durable: bool = True) -> bool:
    """Have `write` fill a unique temp file beside `path`, then fsync it and rename it over `path` (and fsync the
    directory): readers never see half, and after a crash the file is the old one or the new one (`durable`
    False: no fsync, so readers still never see half, but a crash may leave a torn file).

    The temp file (made by mkstemp, given FILE_MODE) is removed when `write` or anything after it fails. With
    `same`, an existing `path` for which same(path, temp) is true is left as it is (byte-stable re-exports).
    Returns whether `path` was replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after `write`: a writer that replaces the file would drop a mode set before
        if durable:
            fsync_path(tmp)
        if same is not None and path.is_file() and same(path, tmp):
            tmp.unlink()
            return False
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically (atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_json(path: str | Path, obj: object, *, indent: int | None = 1, **dumps: Any) -> None:
    """Write `obj` as JSON (then a newline, UTF-8) to `path` atomically; `dumps` go to json.dumps."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, **dumps) + "\n").encode("utf-8"))
