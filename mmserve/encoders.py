"""Prompted towers: run open_clip's own image and text blocks with deep prompt tokens swapped in at every layer.

Prompts are per sample: a batch may carry samples of different tasks, each with its own prompts, as a
(B, K, P, d) tensor (K prompted layers, P prompt tokens per layer, d the tower width). A (K, P, d) tensor is
shared by the whole batch. Layers past K keep the prompt tokens of the previous layer (MaPLe's depth rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from mmserve.backbone import Backbone
from mmserve.errors import PromptConfigError

PLACEHOLDER = "X"  # CoOp/MaPLe: template words whose token positions are overwritten by text prompts


def _per_sample(prompts: torch.Tensor | None, batch: int, width: int, layers: int, what: str
                ) -> tuple[torch.Tensor | None, int, int]:
    """Validate deep prompts against a tower, broadcast shared (K, P, d) prompts to (B, K, P, d); with K and P."""
    if prompts is None or prompts.shape[-2] == 0:
        return None, 0, 0
    if prompts.dim() == 3:
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1, -1)
    if prompts.dim() != 4 or prompts.shape[0] != batch or prompts.shape[-1] != width:
        raise PromptConfigError(
            f"{what} prompts must be (K, P, {width}) or ({batch}, K, P, {width}), got {tuple(prompts.shape)}"
        )
    depth, n_prompt = prompts.shape[1], prompts.shape[2]
    if depth > layers:
        tower = "image" if what == "visual" else what
        raise PromptConfigError(f"{what} prompts have depth {depth} but the {tower} tower has {layers} layers")
    return prompts, depth, n_prompt


class _FrozenTower(nn.Module):
    """Base for the prompted towers: the wrapped open_clip modules always stay in eval mode."""

    def train(self, mode: bool = True) -> _FrozenTower:
        """Ignore train(): the backbone is frozen and has no train-time behaviour to switch on."""
        return super().train(False)


def run_prompted_blocks(transformer: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None, depth: int,
                        n_prompt: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's residual blocks on x (B, L, d) whose positions 1..P hold layer 0's prompts; before block i < K
    those positions are overwritten with layer i's prompts (B, K, P, d). Returns (B, L, d)."""
    batch_first = transformer.batch_first
    if not batch_first:
        x = x.transpose(0, 1)
    for i, block in enumerate(transformer.resblocks):
        if 0 < i < depth:
            p = prompts[:, i].to(x.dtype)
            if batch_first:
                x = torch.cat([x[:, :1], p, x[:, 1 + n_prompt:]], dim=1)
            else:
                x = torch.cat([x[:1], p.transpose(0, 1), x[1 + n_prompt:]], dim=0)
        x = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


class PromptedImageEncoder(_FrozenTower):
    """open_clip's VisionTransformer with deep prompts: tokens [CLS, prompts, patches] at every layer."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.visual = backbone.model.visual
        self.width = backbone.vision_width
        self.layers = backbone.vision_layers
        self.eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class embeddings with ln_pre applied: (B, 1 + N, d_v)."""
        return self.visual._embeds(images)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None, normalize: bool = True
                ) -> torch.Tensor:
        """Image features (B, embed_dim) with per-layer prompts (B, K, P, d_v) or (K, P, d_v) inserted after CLS."""
        x = self.embed(images)  # (B, 1 + N, d_v), ln_pre already applied by open_clip
        return self.forward_embeds(x, prompts, normalize)

    def forward_embeds(self, x: torch.Tensor, prompts: torch.Tensor | None = None, normalize: bool = True
                       ) -> torch.Tensor:
        """Run the blocks and the pool on embeddings from `embed` (lets callers reuse them, e.g. for routing)."""
        prompts, depth, n_prompt = _per_sample(prompts, x.shape[0], self.width, self.layers, "visual")
        transformer = self.visual.transformer
        if n_prompt:
            x = torch.cat([x[:, :1], prompts[:, 0].to(x.dtype), x[:, 1:]], dim=1)  # (B, 1 + P + N, d_v)
        x = run_prompted_blocks(transformer, x, prompts, depth, n_prompt)
        if n_prompt:
            x = torch.cat([x[:, :1], x[:, 1 + n_prompt:]], dim=1)  # prompts never enter the pool ('tok' or 'avg')
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled


class PromptedTextEncoder(_FrozenTower):
    """open_clip's text transformer with deep prompts overwriting the placeholder positions 1..P at every layer."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        model = backbone.model
        self.token_embedding = model.token_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.pool_type = model.text_pool_type
        self.eos_id = getattr(model, "text_eos_id", None)
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.positional_embedding = model.positional_embedding
        self.tokenizer = backbone.tokenizer
        self.width = backbone.text_width
        self.layers = backbone.text_layers
        self.context_length = backbone.context_length
        self.placeholder_id = int(self.tokenizer([PLACEHOLDER])[0, 1])
        mask = self.attn_mask
        # with a causal mask no position sees a later one, so tokens after EOT cannot change the pooled feature
        upper = torch.ones(mask.shape, dtype=torch.bool).triu(1) if mask is not None else None
        self.truncate_after_eot = (
            mask is not None and self.pool_type in ("argmax", "eos")
            and bool(torch.isinf(mask[upper]).all()) and not bool(torch.isinf(mask[~upper]).any())
        )
        self.eval()

    def tokenize(self, texts: Sequence[str], n_prompt: int, truncate: bool = False) -> torch.Tensor:
        """Token ids (B, L) of "X X ... X <text>" with `n_prompt` placeholders right after SOT; a text longer than
        the context is PromptConfigError, or cut as open_clip's tokenizer cuts it with `truncate`."""
        prefix = " ".join([PLACEHOLDER] * n_prompt)
        # one slot more than the context: a text that fills the context exactly leaves it empty, a longer one
        # (which the tokenizer would truncate, writing EOT into the last slot either way) does not
        tokens = self.tokenizer([f"{prefix} {t}" if n_prompt else t for t in list(texts)],
                                context_length=self.context_length + (0 if truncate else 1))
        if n_prompt and not bool((tokens[:, 1:1 + n_prompt] == self.placeholder_id).all()):
            raise PromptConfigError(f"placeholder '{PLACEHOLDER}' did not tokenize to {n_prompt} single tokens")
        if truncate:
            return tokens
        if bool((tokens[:, -1] != 0).any()):
            raise PromptConfigError(f"text longer than the context length {self.context_length} with {n_prompt} "
                                    f"prompt tokens: {texts[int((tokens[:, -1] != 0).nonzero()[0])]!r}")
        return tokens[:, :-1].contiguous()

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None, normalize: bool = True
                ) -> torch.Tensor:
        """Text features (B, embed_dim); prompts (B, K, P, d_l) or (K, P, d_l) replace token positions 1..P."""
        prompts, depth, n_prompt = _per_sample(prompts, tokens.shape[0], self.width, self.layers, "text")
        cast_dtype = self.transformer.get_cast_dtype()
        attn_mask, positional = self.attn_mask, self.positional_embedding
        if self.truncate_after_eot:  # exact: drop the padding after the batch's last EOT (halves typical cost)
            eot = tokens.argmax(dim=-1) if self.pool_type == "argmax" else (tokens == self.eos_id).int().argmax(-1)
            length = max(int(eot.max()) + 1, 1 + n_prompt)
            tokens, attn_mask, positional = tokens[:, :length], attn_mask[:length, :length], positional[:length]
        x = self.token_embedding(tokens).to(cast_dtype)  # (B, L, d_l)
        if n_prompt:
            x = torch.cat([x[:, :1], prompts[:, 0].to(cast_dtype), x[:, 1 + n_prompt:]], dim=1)
        x = x + positional.to(cast_dtype)
        x = run_prompted_blocks(self.transformer, x, prompts, depth, n_prompt, attn_mask)
        x = self.ln_final(x)  # (B, L, d_l)
        # the sequence length never changes, so the EOT position (argmax of ids) is the true one
        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return F.normalize(pooled, dim=-1) if normalize else pooled
