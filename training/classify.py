"""Classification by CLIP cosine similarity: class text features from a template, optional deep prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmserve.backbone import Backbone
from mmserve.encoders import PromptedImageEncoder, PromptedTextEncoder
from mmserve.prompts import TowerPrompts
from mmserve.registry import DEFAULT_TEMPLATE


@dataclass
class Towers:
    """The frozen backbone and its two prompted towers."""

    backbone: Backbone
    image: PromptedImageEncoder
    text: PromptedTextEncoder

    @classmethod
    def of(cls, backbone: Backbone) -> Towers:
        """Wrap a loaded backbone."""
        return cls(backbone, PromptedImageEncoder(backbone), PromptedTextEncoder(backbone))

    @property
    def device(self) -> torch.device:
        """Where the backbone lives."""
        return self.backbone.device


def class_tokens(towers: Towers, class_names: list[str], template: str, n_prompt: int) -> torch.Tensor:
    """Token ids (C, L) of "X..X <template with class name>" with `n_prompt` placeholders."""
    return towers.text.tokenize([template.format(c) for c in class_names], n_prompt).to(towers.device)


def text_features(towers: Towers, class_names: list[str], template: str, prompts: TowerPrompts | None
                  ) -> torch.Tensor:
    """Normalised class text features (C, E) from the text tower with the task's text prompts."""
    text = None if prompts is None else prompts.text
    tokens = class_tokens(towers, class_names, template, 0 if text is None else text.shape[-2])
    return towers.text(tokens, text)


@torch.no_grad()
def image_features(towers: Towers, images: torch.Tensor, prompts: TowerPrompts | None, batch_size: int = 128
                   ) -> torch.Tensor:
    """Normalised image features (N, E) from the image tower with the task's visual prompts, in batches."""
    vision = None if prompts is None else prompts.vision
    out = [towers.image(images[i:i + batch_size].to(towers.device), vision) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def class_scores(towers: Towers, images: torch.Tensor, class_names: list[str], template: str = DEFAULT_TEMPLATE,
                 prompts: TowerPrompts | None = None, batch_size: int = 128) -> torch.Tensor:
    """Cosine logits times CLIP's temperature (N, C)."""
    txt = text_features(towers, class_names, template, prompts)
    img = image_features(towers, images, prompts, batch_size)
    return towers.backbone.logit_scale * img @ txt.T


def predict(towers: Towers, images: torch.Tensor, class_names: list[str], template: str = DEFAULT_TEMPLATE,
            prompts: TowerPrompts | None = None, batch_size: int = 128) -> torch.Tensor:
    """Predicted class indices (N,)."""
    return class_scores(towers, images, class_names, template, prompts, batch_size).argmax(dim=-1).cpu()
