"""Prompt generators: MmAP's Kronecker structure and parameter count, MoPE routing and importance loss."""

from __future__ import annotations

import math

import pytest
import torch

from mmserve.errors import PromptConfigError
from mmserve.fusion import FusionModel
from mmserve.prompts import DeepPrompt, DeepPromptConfig, MmAP, MmAPConfig, count_params, mmap_param_count
from mmserve.prompts.mope import MoPE, MoPEConfig, expert_importance, importance_loss, routing_entropy


@pytest.mark.parametrize(
    ("b", "m", "n", "d_l", "d_v", "layers", "depth"),
    [(4, 2, 8, 64, 64, 2, None), (8, 4, 16, 512, 768, 12, None), (6, 3, 4, 256, 256, 6, 3), (2, 1, 1, 8, 12, 3, 1)],
)
def test_mmap_parameter_count_equals_formula(b, m, n, d_l, d_v, layers, depth):
    cfg = MmAPConfig(n_tokens=b, source_rows=m, source_cols=n, depth=depth)
    mmap = MmAP(cfg, d_l, d_v, layers, layers)
    k = depth or layers
    assert count_params(mmap) == k * (m * n + (b // m) * (d_l // n) + (b // m) * (d_v // n))
    assert count_params(mmap) == mmap_param_count(cfg, d_l, d_v, k)
    prompts = mmap()
    assert prompts.text.shape == (k, b, d_l)
    assert prompts.vision.shape == (k, b, d_v)


def test_mmap_prompts_are_kronecker_products():
    mmap = MmAP(MmAPConfig(n_tokens=4, source_rows=2, source_cols=4), 16, 24, 3, 3)
    prompts = mmap()
    for k in range(3):
        assert torch.allclose(prompts.text[k], torch.kron(mmap.scale_text[k], mmap.source[k]))
        assert torch.allclose(prompts.vision[k], torch.kron(mmap.scale_vision[k], mmap.source[k]))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (MmAPConfig(n_tokens=5, source_rows=2), "b=5 must be divisible by source_rows m=2"),
        (MmAPConfig(source_cols=7), "d_l=64 must be divisible by source_cols n=7"),
        (MmAPConfig(depth=3), "depth 3 must be between 1 and 2"),
    ],
)
def test_mmap_divisibility_errors_are_clear(cfg, message):
    with pytest.raises(PromptConfigError, match=message):
        MmAP(cfg, 64, 64, 2, 2)


def test_deep_prompt_ablation_feeds_one_tower():
    text_only = DeepPrompt(DeepPromptConfig(tower="text", n_tokens=3), 64, 32, 2, 4)()
    vision_only = DeepPrompt(DeepPromptConfig(tower="vision", n_tokens=3), 64, 32, 2, 4)()
    assert text_only.text.shape == (2, 3, 64) and text_only.vision is None
    assert vision_only.vision.shape == (4, 3, 32) and vision_only.text is None


def _mope(**overrides) -> MoPE:
    cfg = MoPEConfig(prompt_len=2, n_experts=4, mapped_len=1, mapper_hidden=16, **overrides)
    return MoPE(cfg, vision_width=32, vision_layers=3, psi_dim=8)


def test_mope_shapes_and_per_sample_prompts():
    torch.manual_seed(0)
    mope = _mope().eval()
    psi = torch.randn(5, 8)
    out = mope(psi)
    assert out.prompts.shape == (5, 3, 2 * 2 + 1, 32)
    assert out.routing.shape == (5, 3, 4)
    assert torch.allclose(out.routing.sum(-1), torch.ones(5, 3))
    # static part identical across samples, dynamic and mapped parts differ with psi
    assert torch.equal(out.prompts[0, :, :2], out.prompts[1, :, :2])
    assert (out.prompts[0, :, 2:] - out.prompts[1, :, 2:]).abs().max() > 1e-6


def test_mope_router_noise_only_in_training():
    torch.manual_seed(0)
    mope = _mope()
    psi = torch.randn(4, 8)
    mope.eval()
    assert torch.equal(mope(psi).routing, mope(psi).routing)
    mope.train()
    assert not torch.equal(mope(psi).routing, mope(psi).routing)


def test_mope_top1_routing_keeps_one_expert():
    mope = _mope(routing="top1").eval()
    routing = mope(torch.randn(6, 8)).routing
    assert ((routing > 0).sum(-1) == 1).all()


def test_mope_router_can_use_image_summary():
    mope = _mope(router_uses_image=True).eval()
    with pytest.raises(PromptConfigError, match="image_summary"):
        mope(torch.randn(2, 8))
    assert mope(torch.randn(2, 8), torch.randn(2, 32)).prompts.shape == (2, 3, 5, 32)
    psi, summary = torch.randn(2, 8), torch.randn(2, 32)
    # the summary enters the router at unit length, like psi: its scale does not change the routing
    assert torch.allclose(mope.route(psi, summary), mope.route(psi, 100 * summary), atol=1e-6)


def test_importance_loss_zero_without_gradient_when_balanced():
    logits = torch.zeros(8, 3, 4, requires_grad=True)  # uniform routing: CV^2 = 0
    routing = logits.softmax(-1)
    loss = importance_loss(routing, threshold=0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0
    # slightly unbalanced but below gamma: still zero and no gradient
    logits2 = (torch.randn(64, 3, 4) * 0.05).requires_grad_()
    loss2 = importance_loss(logits2.softmax(-1), threshold=0.05)
    assert loss2.item() == 0.0
    loss2.backward()
    assert logits2.grad.abs().max() == 0


def test_importance_loss_positive_with_gradient_when_one_expert_dominates():
    logits = torch.zeros(8, 3, 4)
    logits[..., 0] = 5.0
    logits.requires_grad_()
    routing = logits.softmax(-1)
    loss = importance_loss(routing, threshold=0.05)
    share = routing.sum(0)[0]
    expected = (share.var(unbiased=False) / share.mean() ** 2).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > 1.0
    loss.backward()
    assert logits.grad.abs().max() > 0
    assert routing_entropy(routing) < math.log(4)
    assert expert_importance(routing)[0][0] > 0.9


def test_fusion_model_heads():
    from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
    from mmserve.encoders import PromptedImageEncoder

    backbone = load_backbone(BackboneSpec(TINY_MODEL))
    enc = PromptedImageEncoder(backbone)
    cfg = MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=16)
    for head in ("multiclass", "multilabel"):
        model = FusionModel(cfg, 64, 2, backbone.embed_dim, 8, n_classes=3, head=head).eval()
        out = model(enc, torch.randn(2, 3, 32, 32), torch.randn(2, 8))
        probs = out.probabilities(model.multilabel)
        assert probs.shape == (2, 3) and model.multilabel == (head == "multilabel")
        if head == "multiclass":
            assert torch.allclose(probs.sum(-1), torch.ones(2))
            assert torch.allclose(probs, out.logits.softmax(-1))
        else:
            assert torch.allclose(probs, out.logits.sigmoid())  # independent labels: not a softmax
    with pytest.raises(PromptConfigError, match="fusion head"):
        FusionModel(cfg, 64, 2, 32, 8, 3, head="softmax")


def _hand_router(routing: str) -> MoPE:
    """One layer, two experts, tau 1: psi = e_1 gives router logits (ln 3, 0), i.e. softmax (0.75, 0.25)."""
    cfg = MoPEConfig(prompt_len=1, n_experts=2, mapped_len=0, temperature=1.0, noise_std=1.0, routing=routing,
                     importance_threshold=0.05)
    mope = MoPE(cfg, vision_width=4, vision_layers=1, psi_dim=2)
    with torch.no_grad():
        mope.router.copy_(torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]]))
    return mope


@pytest.mark.parametrize("routing", ["dense", "top1"])
def test_routing_statistics_and_importance_read_the_noise_free_softmax(routing: str):
    """Eq. 5-6 by hand: r = (0.75, 0.25) for both samples, in either mode, noise or not.

    entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623; importance = (1.5, 0.5), mean 1, variance 0.25: CV^2 = 0.25;
    shares (0.75, 0.25). The top-1 gate keeps (0.75, 0) for the prompts only: read from the gates, top-1 entropy
    would be 0.2158 and CV^2 1.0.
    """
    mope = _hand_router(routing).eval()
    psi = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = mope(psi)
    assert torch.allclose(out.probs, torch.tensor([0.75, 0.25]).expand(2, 1, 2))
    gates = torch.tensor([0.75, 0.0] if routing == "top1" else [0.75, 0.25]).expand(2, 1, 2)
    assert torch.allclose(out.routing, gates)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert routing_entropy(out.probs) == pytest.approx(entropy, abs=1e-6) == pytest.approx(0.5623, abs=1e-4)
    assert importance_loss(out.probs, 0.05).item() == pytest.approx(0.25, abs=1e-6)
    assert expert_importance(out.probs) == [pytest.approx([0.75, 0.25], abs=1e-6)]
    mope.train()  # router noise (std 1) moves the gates, never the statistics nor the importance loss
    torch.manual_seed(0)
    noisy = [mope(psi) for _ in range(3)]
    assert any(not torch.allclose(o.routing, gates) for o in noisy)
    for o in noisy:
        assert torch.allclose(o.probs, out.probs)
        assert importance_loss(o.probs, 0.05).item() == pytest.approx(0.25, abs=1e-6)


def test_fusion_head_reads_the_image_feature_alone_or_with_psi():
    from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
    from mmserve.encoders import PromptedImageEncoder

    backbone = load_backbone(BackboneSpec(TINY_MODEL))
    enc = PromptedImageEncoder(backbone)
    images, psi = torch.randn(2, 3, 32, 32), torch.randn(2, 8)
    feats = torch.nn.functional.normalize(torch.randn(2, backbone.embed_dim), dim=-1)
    for head_input, width in (("image", backbone.embed_dim), ("image+psi", backbone.embed_dim + 8)):
        cfg = MoPEConfig(prompt_len=2, n_experts=4, mapper_hidden=16, head_input=head_input)
        model = FusionModel(cfg, 64, 2, backbone.embed_dim, 8, n_classes=3).eval()
        assert model.head.in_features == width and model.head_uses_psi == (head_input == "image+psi")
        other = model.logits(feats, -psi)
        assert torch.equal(model.logits(feats, psi), other) == (head_input == "image")  # psi only via the prompts
        out = model(enc, images, psi)
        assert out.logits.shape == (2, 3) and out.probs.shape == out.routing.shape == (2, 2, 4)
    with pytest.raises(PromptConfigError, match="head_input"):
        FusionModel(MoPEConfig(head_input="psi"), 64, 2, 32, 8, 3)


def test_a_config_without_head_input_is_the_head_it_was_trained_with():
    legacy = MoPEConfig(prompt_len=2, n_experts=4).to_dict()
    del legacy["head_input"]  # every registry written before the field
    assert MoPEConfig.from_dict(legacy).head_input == "image+psi"
    assert FusionModel(MoPEConfig.from_dict(legacy), 64, 2, 32, 8, 3).head.in_features == 32 + 8
    assert MoPEConfig.from_dict({**legacy, "head_input": "image"}).head_input == "image"
