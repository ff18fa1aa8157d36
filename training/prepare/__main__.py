"""Command line: `python -m training.prepare --cache DIR [--size 96]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .pipeline import prepare


def default_cache() -> Path:
    """The cache folder: $MMSERVE_CACHE or ~/.cache/mmserve."""
    return Path(os.environ.get("MMSERVE_CACHE", "~/.cache/mmserve")).expanduser()


def main(argv: list[str] | None = None) -> int:
    """Parse options and run the preparation."""
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__)
    parser.add_argument("--cache", type=Path, default=default_cache(), help="cache folder (env MMSERVE_CACHE)")
    parser.add_argument("--size", type=int, default=96, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="render processes")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="pretraining pictures held out for val")
    parser.add_argument("--no-install", action="store_true", help="do not run npm/apt-get, use what is there")
    parser.add_argument("--no-sheets", action="store_true", help="skip the contact sheets")
    args = parser.parse_args(argv)
    prepare(args.cache, size=args.size, seed=args.seed, workers=args.workers, val_fraction=args.val_fraction,
            install=not args.no_install, sheets=not args.no_sheets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
