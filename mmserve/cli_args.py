"""Arguments and helpers every command line shares (`mmserve`, `mmserve bench`, `mmserve-train`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmserve.backbone import Backbone


def positive_int(value: str) -> int:
    """argparse type of counts and periods that must be >= 1 (argparse names the option in its error)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def project_models_dir() -> Path:
    """models/ next to the package (repository checkout or built bento), else ./models."""
    root = Path(__file__).resolve().parent.parent
    return (root if (root / "models").is_dir() else Path.cwd()) / "models"


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --seed: which backbone to load."""
    from mmserve.backbone import EMBEDDED_MODEL

    parser.add_argument("--model", default=EMBEDDED_MODEL, help="open_clip model name (default: %(default)s)")
    parser.add_argument("--pretrained", default="auto",
                        help="open_clip tag or checkpoint path; 'none' = random init; 'auto' (default) = "
                             "models/backbone/<model>.safetensors when it exists, else random init (speed only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random init (default: %(default)s)")


def resolve_pretrained(model: str, pretrained: str) -> tuple[str | None, str]:
    """(pretrained for BackboneSpec, a note on what was loaded) for the --pretrained value."""
    from mmserve.backbone import pretrained_or_none

    if pretrained_or_none(pretrained) is None:
        return None, "random weights (requested): speed only, accuracy figures mean nothing"
    if pretrained == "auto":
        path = project_models_dir() / "backbone" / f"{model}.safetensors"
        if path.is_file():
            return str(path), f"weights: {path}"
        return None, f"random weights: speed only ({path} not found; accuracy figures mean nothing)"
    return pretrained, f"weights: {pretrained}"


def load_backbone_from_args(args: argparse.Namespace) -> Backbone:
    """Load the backbone named by --model/--pretrained/--seed; returns (backbone, note)."""
    from mmserve.backbone import BackboneSpec, load_backbone

    pretrained, note = resolve_pretrained(args.model, args.pretrained)
    return load_backbone(BackboneSpec(args.model, pretrained, seed=args.seed)), note
