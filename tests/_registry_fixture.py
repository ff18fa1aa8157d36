"""Small TRAINED prompt registries on the tiny random backbone, for the engine and service tests.

The images are synthetic and learnable even through a random-init frozen CLIP: solid colours, warmth and
brightness for classification; for fusion, a multi-label task whose labels come from the image
colour AND the animal named in the text, and a multi-class task whose label comes from the text. Prompts are
trained for a few dozen optimiser steps directly with the core modules, and the builder asserts they
genuinely predict before a registry is written, so the service tests check real predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmserve.backbone import TINY_MODEL, Backbone, BackboneSpec, load_backbone
from mmserve.builders import ClassifyPrompts
from mmserve.complementary import ClipTextComplement
from mmserve.encoders import PromptedImageEncoder, PromptedTextEncoder
from mmserve.fusion import FusionModel
from mmserve.prompts import MmAP, MmAPConfig, count_params
from mmserve.prompts.mope import MoPEConfig
from mmserve.registry import BackboneRef, GroupEntry, Manifest, TaskEntry, save_registry

TINY = BackboneSpec(TINY_MODEL, seed=0)
UPLOAD_SIZE = 48  # uploads are bigger than the tiny model's 32 px input, so resizing is exercised too
TEMPLATE = "a photo of a {}."
COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220)}
COLORS_V2 = {"crimson": COLORS["red"], "lime": COLORS["green"], "navy": COLORS["blue"]}  # v2 renames the classes
ANIMALS = ("cat", "dog")
FUSION_TEXTS = ("a photo of my {}", "look at this {}", "the {} is sleeping", "there is a {} here")
SERVER_ENV = {  # what the service needs to serve these registries
    "MMSERVE_BACKBONE_MODEL": TINY_MODEL,
    "MMSERVE_BACKBONE_PRETRAINED": "none",
    "MMSERVE_BACKBONE_SEED": "0",
}


def color_image(name: str, rng: np.random.Generator, palette: dict = COLORS) -> Image.Image:
    """A solid square of colour `name`, jittered, with a little noise."""
    base = np.array(palette[name], dtype=np.float64) + rng.uniform(-25, 25, size=3)
    arr = base + rng.normal(0, 8, size=(UPLOAD_SIZE, UPLOAD_SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def warmth_image(name: str, rng: np.random.Generator) -> Image.Image:
    """A noisy square of a random 'warm' (red..yellow) or 'cool' (cyan..blue) hue, with a darker half."""
    hue = rng.uniform(0.0, 0.16) if name == "warm" else rng.uniform(0.5, 0.66)
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 220)).convert("RGB").getpixel((0, 0)), float)
    arr = np.broadcast_to(rgb, (UPLOAD_SIZE, UPLOAD_SIZE, 3)).copy()
    arr[: UPLOAD_SIZE // 2] *= rng.uniform(0.5, 1.0)
    arr += rng.normal(0, 8, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def brightness_image(name: str, rng: np.random.Generator) -> Image.Image:
    """A grey-ish noisy square, 'dark' or 'light'."""
    level = rng.uniform(10, 70) if name == "dark" else rng.uniform(185, 245)
    arr = level + rng.normal(0, 10, size=(UPLOAD_SIZE, UPLOAD_SIZE, 1)) + rng.uniform(-12, 12, size=3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class ClassifySpec:
    """A synthetic classification task."""

    name: str
    classes: tuple[str, ...]
    make: object  # (class name, rng) -> PIL image
    group: str | None
    n_tokens: int


def _specs(palette: dict) -> list[ClassifySpec]:
    return [
        ClassifySpec("colors", tuple(palette), lambda c, r: color_image(c, r, palette), "synthetic", 2),
        ClassifySpec("warmth", ("warm", "cool"), warmth_image, "synthetic", 2),
        # no group: 2 prompt tokens instead of 2 + 2, so mixed batches exercise the split by prompt length
        ClassifySpec("brightness", ("dark", "light"), brightness_image, None, 2),
    ]


def _pool(backbone: Backbone, spec: ClassifySpec, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(spec.classes):
        for _ in range(per_class):
            images.append(backbone.preprocess(spec.make(name, rng)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _mmap(backbone: Backbone, n_tokens: int) -> tuple[MmAPConfig, MmAP]:
    cfg = MmAPConfig(n_tokens=n_tokens, source_rows=2, source_cols=8)
    return cfg, MmAP(cfg, backbone.text_width, backbone.vision_width, backbone.text_layers, backbone.vision_layers)


def _classify_logits(backbone, text_enc, img_enc, prompts: ClassifyPrompts, classes, images) -> torch.Tensor:
    tp = prompts()
    tokens = text_enc.tokenize([TEMPLATE.format(c) for c in classes], tp.text_tokens)
    return backbone.logit_scale * img_enc(images, tp.vision) @ text_enc(tokens, tp.text).T


def train_classify(backbone: Backbone, specs: list[ClassifySpec], group: MmAP | None, train_group: bool,
                   steps: int = 60) -> dict[str, MmAP]:
    """Train one MmAP per task (and the shared group MmAP if `train_group`); asserts held-out accuracy 1.0."""
    torch.manual_seed(0)
    text_enc, img_enc = PromptedTextEncoder(backbone), PromptedImageEncoder(backbone)
    modules = {s.name: _mmap(backbone, s.n_tokens)[1] for s in specs}
    pools = {s.name: _pool(backbone, s, 12, seed=1) for s in specs}
    params = [p for m in modules.values() for p in m.parameters()]
    if group is not None:
        group.requires_grad_(train_group)
        params += list(group.parameters()) if train_group else []
    opt = torch.optim.Adam(params, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.zeros(())
        for s in specs:
            images, labels = pools[s.name]
            pick = torch.randint(0, len(labels), (16,), generator=gen)
            prompts = ClassifyPrompts(modules[s.name], group if s.group else None)
            logits = _classify_logits(backbone, text_enc, img_enc, prompts, s.classes, images[pick])
            loss = loss + F.cross_entropy(logits, labels[pick])
        loss.backward()
        opt.step()
    with torch.no_grad():
        for s in specs:
            images, labels = _pool(backbone, s, 8, seed=99)
            prompts = ClassifyPrompts(modules[s.name], group if s.group else None)
            acc = (_classify_logits(backbone, text_enc, img_enc, prompts, s.classes, images).argmax(-1) == labels)
            assert bool(acc.all()), f"fixture task {s.name} did not learn: accuracy {acc.float().mean():.2f}"
    return modules


def fusion_sample(rng: np.random.Generator, n: int) -> list[tuple[Image.Image, str, str, str]]:
    """n (image, text, colour, animal) tuples."""
    out = []
    for _ in range(n):
        color, animal = rng.choice(list(COLORS)), rng.choice(ANIMALS)
        out.append((color_image(color, rng), rng.choice(FUSION_TEXTS).format(animal), color, animal))
    return out


def train_fusion(backbone: Backbone, steps: int = 80) -> dict[str, tuple[FusionModel, MoPEConfig, tuple, str]]:
    """Train 'tags' (multi-label: colour + animal) and 'pet' (multi-class: animal from text)."""
    torch.manual_seed(0)
    img_enc, complement = PromptedImageEncoder(backbone), ClipTextComplement(backbone)
    rng = np.random.default_rng(2)
    data = fusion_sample(rng, 48)
    images = torch.stack([backbone.preprocess(d[0]) for d in data])
    psi = complement.encode([d[1] for d in data])
    cfg = MoPEConfig(prompt_len=2, n_experts=4, mapped_len=1, mapper_hidden=32)
    tags_classes = (*COLORS, *ANIMALS)
    tags_target = torch.tensor([[float(c == d[2] or c == d[3]) for c in tags_classes] for d in data])
    pet_target = torch.tensor([ANIMALS.index(d[3]) for d in data])
    tasks = {
        "tags": (FusionModel(cfg, backbone.vision_width, backbone.vision_layers, backbone.embed_dim,
                             complement.dim, len(tags_classes), "multilabel"), tags_classes, "multilabel"),
        "pet": (FusionModel(cfg, backbone.vision_width, backbone.vision_layers, backbone.embed_dim,
                            complement.dim, len(ANIMALS), "multiclass"), ANIMALS, "multiclass"),
    }
    gen = torch.Generator().manual_seed(0)
    for model, _, head in tasks.values():
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        model.train()
        for _ in range(steps):
            pick = torch.randint(0, len(data), (16,), generator=gen)
            logits = model(img_enc, images[pick], psi[pick]).logits
            if head == "multilabel":
                loss = F.binary_cross_entropy_with_logits(logits, tags_target[pick])
            else:
                loss = F.cross_entropy(logits, pet_target[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    test = fusion_sample(np.random.default_rng(77), 16)
    t_images = torch.stack([backbone.preprocess(d[0]) for d in test])
    t_psi = complement.encode([d[1] for d in test])
    with torch.no_grad():
        tags_pred = tasks["tags"][0](img_enc, t_images, t_psi).logits.sigmoid() > 0.5
        tags_true = torch.tensor([[c == d[2] or c == d[3] for c in tags_classes] for d in test])
        assert bool((tags_pred == tags_true).all()), "fixture task tags did not learn"
        pet_pred = tasks["pet"][0](img_enc, t_images, t_psi).logits.argmax(-1)
        assert bool((pet_pred == torch.tensor([ANIMALS.index(d[3]) for d in test])).all()), "pet did not learn"
    return {name: (model, cfg, classes, head) for name, (model, classes, head) in tasks.items()}


def _classify_entry(spec: ClassifySpec, module: MmAP, acc: float = 1.0) -> TaskEntry:
    return TaskEntry(name=spec.name, kind="classify", classes=list(spec.classes),
                     prompt_config=module.config.to_dict(), trainable_params=count_params(module),
                     template=TEMPLATE, group=spec.group, metrics={"synthetic_accuracy": acc})


def write_registry(root: Path, backbone: Backbone, group_cfg: MmAPConfig, group: MmAP, specs: list[ClassifySpec],
                   modules: dict[str, MmAP], fusion: dict) -> None:
    """Save a registry with the classification tasks of `specs` and the fusion tasks of `fusion`."""
    tasks = [_classify_entry(s, modules[s.name]) for s in specs]
    weights = {s.name: modules[s.name].state_dict() for s in specs}
    for name, (model, cfg, classes, head) in fusion.items():
        tasks.append(TaskEntry(name=name, kind="fuse", classes=list(classes), prompt_config=cfg.to_dict(),
                               trainable_params=count_params(model), head=head, complementary={"kind": "clip_text"},
                               psi_dim=backbone.embed_dim, threshold=0.5, metrics={"synthetic_accuracy": 1.0}))
        weights[name] = model.state_dict()
    grouped = [s.name for s in specs if s.group == "synthetic"]
    manifest = Manifest(
        backbone=BackboneRef(model=TINY_MODEL, fingerprint=backbone.fingerprint),
        groups=[GroupEntry(name="synthetic", tasks=grouped, prompt_config=group_cfg.to_dict(),
                           trainable_params=sum(p.numel() for p in group.parameters()))],
        tasks=tasks,
    )
    save_registry(root, manifest, {"synthetic": group.state_dict()}, weights)


@dataclass(frozen=True)
class Registries:
    """v1 (colour classes red/green/blue), v2 (same tasks, colour classes renamed crimson/lime/navy)."""

    v1: Path
    v2: Path


def build_registries(base: Path) -> Registries:
    """Train and write both registry versions under `base` (the session fixture `demo_registries` calls it once)."""
    out = Registries(base / "v1", base / "v2")
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention for this tiny model
    backbone = load_backbone(TINY)
    torch.manual_seed(0)
    group_cfg, group = _mmap(backbone, 2)
    specs = _specs(COLORS)
    modules = train_classify(backbone, specs, group, train_group=True)
    fusion = train_fusion(backbone)
    write_registry(out.v1, backbone, group_cfg, group, specs, modules, fusion)
    specs_v2 = _specs(COLORS_V2)
    retrained = train_classify(backbone, specs_v2[:1], group, train_group=False)  # only 'colors' changes
    write_registry(out.v2, backbone, group_cfg, group, specs_v2, {**modules, **retrained}, fusion)
    return out


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a PIL image as an upload."""
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


if __name__ == "__main__":  # python tests/_registry_fixture.py DIR: the demo registries, without pytest
    import sys

    built = build_registries(Path(sys.argv[1]).resolve())
    env = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
    print(f"v1: {built.v1}\nv2: {built.v2}\nserve: {env} MMSERVE_REGISTRY={built.v1} "
          f"bentoml serve mmserve.service:MmServe")
