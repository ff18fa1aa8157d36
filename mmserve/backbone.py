"""Loads a frozen open_clip model and exposes what prompt learners need from it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from mmserve.errors import BackboneLoadError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODEL = "mmserve-tiny"  # random-initialised, for unit tests only
EMBEDDED_MODEL = "mmserve-vit-p12-96"  # the small CLIP this project pretrains and ships

_configs_registered = False


def register_model_configs() -> None:
    """Make this project's open_clip model configs (tiny test model, embedded model) known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _configs_registered = True


RANDOM_INIT = ("", "none", "random")  # --pretrained / MMSERVE_BACKBONE_PRETRAINED values meaning random init


def pretrained_or_none(value: str | None) -> str | None:
    """A --pretrained or MMSERVE_BACKBONE_PRETRAINED value, with the spellings of a random init as None."""
    if value is None or value.strip().lower() in RANDOM_INIT:
        return None
    return value


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to load: an open_clip model name plus a pretrained tag or a local checkpoint path."""

    model: str
    pretrained: str | None = None  # open_clip tag (e.g. "openai") or a path to .safetensors/.pt; None = random init
    device: str = "cpu"
    seed: int = 0  # only used for random init (tests)

    @property
    def is_local_checkpoint(self) -> bool:
        """True when `pretrained` names a file rather than an open_clip tag."""
        return self.pretrained is not None and (
            os.sep in self.pretrained or Path(self.pretrained).suffix in {".safetensors", ".pt", ".pth", ".bin"}
        )


@dataclass
class Backbone:
    """A frozen CLIP model with the facts prompts need (widths, depths, tokenizer, preprocessing, fingerprint)."""

    spec: BackboneSpec
    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    text_width: int  # d_l
    vision_width: int  # d_v
    text_layers: int
    vision_layers: int
    embed_dim: int
    context_length: int
    image_size: int
    fingerprint: str
    config: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The device the backbone's weights live on."""
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exp(logit_scale), used for cosine logits."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every state-dict tensor (sorted by key): identifies the exact weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(name: str, config: dict, digest: str) -> str:
    payload = json.dumps({"model": name, "config": config, "weights": digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _create(spec: BackboneSpec) -> tuple[nn.Module, Callable]:
    if spec.pretrained is None:
        torch.manual_seed(spec.seed)
    if spec.is_local_checkpoint and not Path(spec.pretrained).is_file():
        raise BackboneLoadError(f"backbone checkpoint not found: {spec.pretrained} (model {spec.model})")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=spec.pretrained, device=spec.device, pretrained_text=False
        )
    except BackboneLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors; all mean the same to a user
        if spec.pretrained is not None and not spec.is_local_checkpoint:
            raise BackboneLoadError(
                f"could not load pretrained tag '{spec.pretrained}' for model '{spec.model}': "
                f"{exc.__class__.__name__}: "
                f"{str(exc)[:200]}. Downloading tags needs the model hub; offline, pass a local checkpoint path "
                f"instead (e.g. MMSERVE_BACKBONE_PRETRAINED=/path/to/open_clip_model.safetensors)."
            ) from None
        raise BackboneLoadError(f"could not create backbone '{spec.model}' from {spec.pretrained!r}: {exc}") from None
    return model, preprocess


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Create the open_clip model for `spec`, load its weights and freeze it (no grad, eval, never mutated)."""
    register_model_configs()
    if spec.model not in open_clip.list_models():
        raise BackboneLoadError(f"unknown open_clip model '{spec.model}'; see open_clip.list_models()")
    model, preprocess = _create(spec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not hasattr(model, "visual") or not hasattr(model.visual, "_embeds") or not hasattr(model, "token_embedding"):
        raise BackboneLoadError(
            f"model '{spec.model}' is not a ViT CLIP with a built-in text tower; prompted towers support those only"
        )
    config = open_clip.get_model_config(spec.model) or {}
    visual = model.visual
    return Backbone(
        spec=spec,
        model=model,
        tokenizer=open_clip.get_tokenizer(spec.model),
        preprocess=preprocess,
        text_width=model.transformer.width,
        vision_width=visual.transformer.width,
        text_layers=len(model.transformer.resblocks),
        vision_layers=len(visual.transformer.resblocks),
        embed_dim=int(config.get("embed_dim", model.text_projection.shape[-1])),
        context_length=model.context_length,
        image_size=int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size),
        fingerprint=_fingerprint(spec.model, config, weights_digest(model)),
        config=config,
    )
