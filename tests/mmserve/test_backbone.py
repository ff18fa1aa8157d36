"""Backbone loader: frozen model, dimensions, fingerprint, local checkpoints and clear offline errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.errors import BackboneLoadError


def test_backbone_is_frozen_and_described(tiny_backbone):
    b = tiny_backbone
    assert not b.model.training
    assert all(not p.requires_grad for p in b.model.parameters())
    assert (b.text_width, b.vision_width, b.text_layers, b.vision_layers) == (64, 64, 2, 2)
    assert (b.embed_dim, b.context_length, b.image_size) == (32, 32, 32)
    assert len(b.fingerprint) == 32
    assert b.preprocess is not None and b.tokenizer(["a cat"]).shape == (1, 32)


def test_fingerprint_depends_on_weights():
    a = load_backbone(BackboneSpec(TINY_MODEL, seed=0))
    b = load_backbone(BackboneSpec(TINY_MODEL, seed=0))
    c = load_backbone(BackboneSpec(TINY_MODEL, seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_local_checkpoint_loads_the_same_weights(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    loaded = load_backbone(BackboneSpec(TINY_MODEL, pretrained=str(path)))
    assert loaded.fingerprint == tiny_backbone.fingerprint
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), tiny_backbone.model.encode_image(images))


def test_missing_checkpoint_and_unknown_model_are_clear(tmp_path):
    with pytest.raises(BackboneLoadError, match="checkpoint not found: .*nope.safetensors"):
        load_backbone(BackboneSpec(TINY_MODEL, pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(BackboneLoadError, match="unknown open_clip model 'ViT-Q-99'"):
        load_backbone(BackboneSpec("ViT-Q-99"))


def test_offline_pretrained_tag_names_tag_and_local_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(BackboneSpec("ViT-B-32", pretrained="openai"))
    message = str(info.value)
    assert "'openai'" in message and "ViT-B-32" in message and "local checkpoint" in message
