"""MoPE: per-sample image-tower prompts conditioned on the complementary modality's feature psi.

Per prompted layer the prompt is [static (l) ; dynamic (l) ; mapped (l_m)] tokens:
  static  - a learned (l, d) prompt shared by every sample;
  dynamic - sum_i r_i E_i over k prompt experts (l, d), router r = softmax(W_r psi / tau + noise);
  mapped  - f_m(psi), a 2-layer GELU MLP reshaped to (l_m, d).

The router's noise-free softmax r = softmax(W_r psi / tau) (the paper's eq. 5-6) is what the routing statistics,
the entropy and the importance loss read, in every mode; the noise (training only) and the top-1 gate apply to
the gates that weight the experts, i.e. to the prompts only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.errors import PromptConfigError
from mmserve.prompts.base import resolve_depth
from mmserve.strict import from_dict

# what the fusion head reads: the prompted image feature alone (the paper's linear head), or that feature
# concatenated with psi (mmserve's first head, a late-fusion path around the prompts; registries without the
# field were trained with it)
HEAD_INPUTS = ("image", "image+psi")
LEGACY_HEAD_INPUT = "image+psi"


@dataclass
class MoPEConfig:
    """MoPE hyper-parameters; defaults are the paper's (l = 6, k = 16, tau = 0.1, gamma = 0.05, dense routing)
    but for `head_input`, which defaults to what every registry before the field was trained with."""

    prompt_len: int = 6  # l: tokens of the static prompt and of each expert
    n_experts: int = 16  # k
    mapped_len: int = 1  # l_m: tokens produced by the mapper MLP
    mapper_hidden: int = 256
    temperature: float = 0.1  # tau
    noise_std: float = 1.0  # router noise, training only
    routing: str = "dense"  # "dense" or "top1"
    router_uses_image: bool = False  # public MoPE code: router also sees pooled image embeddings (unit-normalised)
    importance_threshold: float = 0.05  # gamma: no importance loss (nor gradient) below it
    importance_weight: float = 0.01
    depth: int | None = None  # prompted layers of the image tower (None = all)
    init_std: float = 0.02
    head_input: str = LEGACY_HEAD_INPUT  # "image" (the paper's head) or "image+psi" (see HEAD_INPUTS)

    type: str = "mope"

    def to_dict(self) -> dict:
        """Plain dict for the registry manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoPEConfig:
        """Rebuild from a manifest dict, refusing unknown fields."""
        if data.get("type", "mope") != "mope":
            raise PromptConfigError(f"not a MoPE config: type {data.get('type')!r}")
        return from_dict(cls, data, "MoPE config", PromptConfigError)


@dataclass
class MoPEOutput:
    """Per-sample prompts (B, K, P, d_v), the gates that weighted the experts (B, K, k: noisy in training, one
    non-zero per layer under top-1) and the router's noise-free softmax (B, K, k) that statistics and the
    importance loss read."""

    prompts: torch.Tensor
    routing: torch.Tensor
    probs: torch.Tensor


class MoPE(nn.Module):
    """Prompt generator for the image tower conditioned on psi (B, d_psi) from the complementary encoder."""

    def __init__(self, config: MoPEConfig, vision_width: int, vision_layers: int, psi_dim: int):
        super().__init__()
        if config.routing not in ("dense", "top1"):
            raise PromptConfigError(f"MoPE routing must be 'dense' or 'top1', got {config.routing!r}")
        if config.prompt_len < 1 or config.n_experts < 1 or config.mapped_len < 0:
            raise PromptConfigError(f"MoPE sizes must be positive: {config}")
        if config.temperature <= 0:
            raise PromptConfigError(f"MoPE temperature must be > 0, got {config.temperature}")
        self.config = config
        self.depth = k = resolve_depth(config.depth, vision_layers)
        self.width = d = vision_width
        self.psi_dim = psi_dim
        n_len, e, std = config.prompt_len, config.n_experts, config.init_std
        self.static = nn.Parameter(torch.randn(k, n_len, d) * std)  # (K, l, d_v)
        self.experts = nn.Parameter(torch.randn(k, e, n_len, d) * std)  # (K, k, l, d_v)
        router_in = psi_dim + (vision_width if config.router_uses_image else 0)
        self.router = nn.Parameter(torch.randn(k, e, router_in) * router_in ** -0.5)  # W_r per layer: (K, k, d_in)
        if config.mapped_len:
            self.mapper = nn.Sequential(  # f_m: psi -> (K * l_m * d_v)
                nn.Linear(psi_dim, config.mapper_hidden),
                nn.GELU(),
                nn.Linear(config.mapper_hidden, k * config.mapped_len * d),
            )
            nn.init.normal_(self.mapper[2].weight, std=std)
            nn.init.zeros_(self.mapper[2].bias)
        else:
            self.mapper = None
        # training across processes: draw the whole batch's router noise (n rows) and keep this rank's rows lo:hi,
        # so every sample gets the noise one process would give it (None: the batch is whole)
        self.noise_rows: tuple[int, int, int] | None = None

    @property
    def n_tokens(self) -> int:
        """Prompt tokens per layer: static + dynamic + mapped."""
        return 2 * self.config.prompt_len + self.config.mapped_len

    def router_logits(self, psi: torch.Tensor, image_summary: torch.Tensor | None = None) -> torch.Tensor:
        """Noise-free router logits W_r psi / tau (B, K, k)."""
        router_in = psi
        if self.config.router_uses_image:
            if image_summary is None:
                raise PromptConfigError("this MoPE routes on image embeddings too: pass image_summary")
            # unit length like psi: the mean patch embedding (after ln_pre) has norm ~sqrt(d_v), which would
            # swamp psi and, divided by tau, start the router nearly one-hot
            router_in = torch.cat([psi, F.normalize(image_summary, dim=-1)], dim=-1)
        return torch.einsum("bi,kei->bke", router_in, self.router) / self.config.temperature  # (B, K, k)

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        """The expert weights of the prompts from router logits: softmax (+ noise when training), top-1 masked."""
        if self.training and self.config.noise_std > 0:
            if self.noise_rows is None:
                noise = torch.randn_like(logits)
            else:
                lo, hi, n = self.noise_rows
                noise = torch.randn((n, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)[lo:hi]
            logits = logits + noise * self.config.noise_std
        scores = logits.softmax(dim=-1)
        if self.config.routing == "top1":
            keep = F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
            scores = scores * keep  # the winner keeps its (differentiable) score, the others get 0
        return scores

    def route(self, psi: torch.Tensor, image_summary: torch.Tensor | None = None) -> torch.Tensor:
        """The gates (B, K, k) that weight the experts: softmax over experts of W_r psi / tau (+ noise when
        training), top-1 masked in top-1 mode."""
        return self.gates(self.router_logits(psi, image_summary))

    def forward(self, psi: torch.Tensor, image_summary: torch.Tensor | None = None) -> MoPEOutput:
        """Prompts (B, K, 2l + l_m, d_v) for every sample, the gates that made them and the noise-free softmax."""
        batch = psi.shape[0]
        logits = self.router_logits(psi, image_summary)  # (B, K, k)
        routing = self.gates(logits)
        dynamic = torch.einsum("bke,keld->bkld", routing, self.experts)  # (B, K, l, d)
        static = self.static.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, K, l, d)
        parts = [static, dynamic]
        if self.mapper is not None:
            parts.append(self.mapper(psi).view(batch, self.depth, self.config.mapped_len, self.width))
        return MoPEOutput(prompts=torch.cat(parts, dim=2), routing=routing, probs=logits.softmax(dim=-1))


def importance_loss(routing: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Squared coefficient of variation of per-expert summed routing scores, averaged over layers (eq. 5-6).

    routing: (B, K, k), the router's noise-free softmax (MoPEOutput.probs) in every routing mode. Layers whose CV^2
    is at or below `threshold` contribute 0 and no gradient.
    """
    return importance_of_mass(routing.sum(dim=0), threshold)


def importance_of_mass(importance: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """importance_loss from each expert's summed score per layer (K, k) (a batch split over processes: the sum of
    every shard's)."""
    mean = importance.mean(dim=-1)
    cv2 = importance.var(dim=-1, unbiased=False) / (mean.pow(2) + 1e-10)  # (K,)
    return torch.where(cv2 > threshold, cv2, torch.zeros_like(cv2)).mean()


def routing_entropy(routing: torch.Tensor) -> float:
    """Mean entropy (nats) of per-sample routing distributions (pass MoPEOutput.probs): log k = uniform, 0 = one
    expert."""
    p = routing.detach().clamp_min(1e-12)
    return float(-(p * p.log()).sum(dim=-1).mean())


def expert_importance(routing: torch.Tensor) -> list[list[float]]:
    """Per layer, each expert's share of the summed routing scores (rows sum to 1)."""
    importance = routing.detach().sum(dim=0)
    return (importance / importance.sum(dim=-1, keepdim=True).clamp_min(1e-12)).tolist()
