"""Render-cache stamps: what a folder of cached renders was made from, so a changed source re-renders it."""

from __future__ import annotations

import json
from pathlib import Path

from mmserve.fileio import atomic_write_json

STAMP = ".made-from.json"


def refresh_folder(folder: Path, made_from: dict, log=print) -> bool:
    """Make `folder` a cache of renders of `made_from` (package versions, render settings).

    When its stamp records something else (or cannot be read), its PNGs are deleted so they are rendered again, and
    True is returned. A folder of renders without a stamp (made before stamps existed) is adopted as it is. The
    stamp is written before rendering: a render interrupted later leaves fresh files and missing ones, never stale.
    """
    stamp = folder / STAMP
    cleared = False
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded == made_from:
            return False
        stale = sorted(folder.glob("*.png"))
        for path in stale:
            path.unlink()
        cleared = True
        log(f"[prepare] {folder}: made from {recorded}, now {made_from}: {len(stale)} cached renders removed")
    atomic_write_json(stamp, made_from, indent=None, sort_keys=True)
    return cleared
