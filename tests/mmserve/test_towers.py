"""Prompted towers: parity with open_clip, per-sample prompts, pooling positions, frozen backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmserve.backbone import TINY_MODEL, BackboneSpec, load_backbone
from mmserve.encoders import PromptedImageEncoder, PromptedTextEncoder
from mmserve.errors import PromptConfigError
from mmserve.prompts import MmAP, MmAPConfig

TEXTS = ["a photo of a cat.", "dog", "a long sentence about a small red bicycle."]


def test_zero_prompts_reproduce_open_clip(tiny_backbone):
    model = tiny_backbone.model
    images = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.tokenizer(TEXTS)
    image_enc, text_enc = PromptedImageEncoder(tiny_backbone), PromptedTextEncoder(tiny_backbone)
    with torch.no_grad():
        assert (image_enc(images, None, normalize=False) - model.encode_image(images)).abs().max() <= 1e-5
        assert (text_enc(tokens, None, normalize=False) - model.encode_text(tokens)).abs().max() <= 1e-5
        empty = torch.zeros(2, 0, tiny_backbone.vision_width)  # zero prompt tokens per layer
        assert (image_enc(images, empty, normalize=False) - model.encode_image(images)).abs().max() <= 1e-5


def test_placeholder_embeddings_as_shallow_prompt_reproduce_template(tiny_backbone):
    """Layer-0 prompts equal to the "X" embeddings give exactly open_clip's features of the template text."""
    text_enc = PromptedTextEncoder(tiny_backbone)
    tokens = text_enc.tokenize(["a photo of a cat."], n_prompt=4)
    assert tokens[0, 1:5].tolist() == [text_enc.placeholder_id] * 4
    x_embeds = tiny_backbone.model.token_embedding(tokens)[:, 1:5]  # (1, 4, d)
    with torch.no_grad():
        got = text_enc(tokens, x_embeds[:, None], normalize=False)  # depth 1
        assert (got - tiny_backbone.model.encode_text(tokens)).abs().max() <= 1e-5


def _final_block_output(encoder_blocks, run):
    captured = {}
    handle = encoder_blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        out = run()
    finally:
        handle.remove()
    return out, captured["x"]


def test_text_pools_at_the_true_eot_after_insertion(tiny_backbone):
    """The pooled feature is the EOT token's state: catches pooling at a pre-insertion or shifted index."""
    text_enc = PromptedTextEncoder(tiny_backbone)
    model = tiny_backbone.model
    tokens = text_enc.tokenize(["a cat.", "a very small green frog."], n_prompt=3)
    prompts = torch.randn(2, 3, tiny_backbone.text_width) * 0.5
    with torch.no_grad():
        out, hidden = _final_block_output(text_enc.transformer.resblocks,
                                          lambda: text_enc(tokens, prompts, normalize=False))
        eot = tokens.argmax(dim=-1)
        expected = model.ln_final(hidden)[torch.arange(2), eot] @ model.text_projection
        assert (out - expected).abs().max() <= 1e-5
        wrong = model.ln_final(hidden)[torch.arange(2), eot - 3] @ model.text_projection
        assert (out - wrong).abs().max() > 1e-3  # the check above can tell positions apart


def _patch_and_cls_embeds(visual, images: torch.Tensor) -> torch.Tensor:
    """CLIP's ViT input written out by hand: [CLS, patches] + positions, then ln_pre: (B, 1 + N, d_v)."""
    patches = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, d_v), row-major over the patch grid
    cls = visual.class_embedding.expand(images.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_image_pool_excludes_prompts(pool_type):
    backbone = load_backbone(BackboneSpec(TINY_MODEL, seed=1))
    backbone.model.visual.pool_type = pool_type
    visual = backbone.model.visual
    image_enc = PromptedImageEncoder(backbone)
    images = torch.randn(2, 3, 32, 32)
    n_prompt = 5
    prompts = torch.randn(2, n_prompt, backbone.vision_width)  # shared (K=2, P, d_v): one set per layer
    blocks = visual.transformer.resblocks
    seq_first = not visual.transformer.batch_first
    block_inputs: list[torch.Tensor] = []
    block_outputs: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0])) for b in blocks]
    handles += [b.register_forward_hook(lambda m, args, out: block_outputs.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            out = image_enc(images, prompts, normalize=False)
            embeds = _patch_and_cls_embeds(visual, images)
    finally:
        for h in handles:
            h.remove()
    ins = [x.transpose(0, 1) if seq_first else x for x in block_inputs]  # (B, L, d_v)
    outs = [x.transpose(0, 1) if seq_first else x for x in block_outputs]
    hidden = outs[-1]
    assert len(ins) == len(outs) == backbone.vision_layers == 2
    # layer 0 sees exactly [CLS, the layer-0 prompts, the 4x4 patches] in that order, independent of the encoder
    expected = torch.cat([embeds[:, :1], prompts[0].expand(2, -1, -1), embeds[:, 1:]], dim=1)
    assert ins[0].shape == (2, 1 + n_prompt + 16, backbone.vision_width)
    assert (ins[0] - expected).abs().max() <= 1e-5
    # layer 1: the layer-1 prompts replace the prompt slots after CLS, CLS and patch states pass through
    expected = torch.cat([outs[0][:, :1], prompts[1].expand(2, -1, -1), outs[0][:, 1 + n_prompt:]], dim=1)
    assert (ins[1] - expected).abs().max() <= 1e-5
    with torch.no_grad():  # the whole prompted forward by hand: blocks, ln_post, pool without prompts, proj
        x = torch.cat([embeds[:, :1], prompts[0].expand(2, -1, -1), embeds[:, 1:]], dim=1)
        for i, block in enumerate(blocks):
            if i:
                x = torch.cat([x[:, :1], prompts[i].expand(2, -1, -1), x[:, 1 + n_prompt:]], dim=1)
            x = block(x.transpose(0, 1)).transpose(0, 1) if seq_first else block(x)
        x = visual.ln_post(x)
        by_hand = (x[:, 0] if pool_type == "tok" else x[:, 1 + n_prompt:].mean(dim=1)) @ visual.proj
        assert (out - by_hand).abs().max() <= 1e-5
        normed = visual.ln_post(hidden)
        if pool_type == "tok":
            pooled = normed[:, 0]
        else:
            pooled = normed[:, 1 + n_prompt:].mean(dim=1)
        assert (out - pooled @ visual.proj).abs().max() <= 1e-5
        with_prompts = normed[:, 1:].mean(dim=1)
        if pool_type == "avg":
            assert (out - with_prompts @ visual.proj).abs().max() > 1e-3


def test_deep_prompts_replace_tokens_at_every_layer(tiny_backbone):
    """Changing the layer-1 prompt changes the output (so deep prompts are really inserted)."""
    image_enc = PromptedImageEncoder(tiny_backbone)
    images = torch.randn(1, 3, 32, 32)
    prompts = torch.randn(2, 2, tiny_backbone.vision_width)
    changed = prompts.clone()
    changed[1] = torch.randn_like(changed[1])  # (a constant shift would vanish in ln_1)
    with torch.no_grad():
        assert (image_enc(images, prompts) - image_enc(images, changed)).abs().max() > 1e-4


def test_mixed_task_batch_equals_single_task_runs(tiny_backbone):
    torch.manual_seed(0)
    image_enc, text_enc = PromptedImageEncoder(tiny_backbone), PromptedTextEncoder(tiny_backbone)
    cfg = MmAPConfig(n_tokens=4, source_rows=2, source_cols=8)
    task_a = MmAP(cfg, 64, 64, 2, 2)()
    task_b = MmAP(cfg, 64, 64, 2, 2)()
    images = torch.randn(4, 3, 32, 32)
    which = [0, 1, 1, 0]
    per_sample_v = torch.stack([(task_a, task_b)[w].vision for w in which])  # (B, K, P, d_v)
    tokens = text_enc.tokenize(["a cat.", "a dog.", "a bird.", "a fish."], n_prompt=4)
    per_sample_t = torch.stack([(task_a, task_b)[w].text for w in which])
    with torch.no_grad():
        mixed_v = image_enc(images, per_sample_v)
        mixed_t = text_enc(tokens, per_sample_t)
        for i, w in enumerate(which):
            alone = (task_a, task_b)[w]
            assert (mixed_v[i] - image_enc(images[i:i + 1], alone.vision)[0]).abs().max() <= 1e-5
            assert (mixed_t[i] - text_enc(tokens[i:i + 1], alone.text)[0]).abs().max() <= 1e-5
        # and the two tasks really differ
        assert (image_enc(images[:1], task_a.vision) - image_enc(images[:1], task_b.vision)).abs().max() > 1e-4


def test_prompts_do_not_change_the_fast_path_result(tiny_backbone):
    """Under no_grad PyTorch may take the fused attention fast path; results must match the autograd path."""
    image_enc, text_enc = PromptedImageEncoder(tiny_backbone), PromptedTextEncoder(tiny_backbone)
    mmap = MmAP(MmAPConfig(), 64, 64, 2, 2)
    images = torch.randn(3, 3, 32, 32)
    tokens = text_enc.tokenize(TEXTS[:2], n_prompt=4)
    prompts = mmap()
    with_grad_v, with_grad_t = image_enc(images, prompts.vision), text_enc(tokens, prompts.text)
    assert with_grad_v.requires_grad and with_grad_t.requires_grad
    with torch.no_grad():
        no_grad_v, no_grad_t = image_enc(images, prompts.vision), text_enc(tokens, prompts.text)
    with torch.inference_mode():
        inf_v = image_enc(images, prompts.vision)
    assert (with_grad_v - no_grad_v).abs().max() <= 1e-5
    assert (with_grad_t - no_grad_t).abs().max() <= 1e-5
    assert (with_grad_v - inf_v).abs().max() <= 1e-5


def test_optimizer_step_moves_only_prompts(tiny_backbone):
    backbone = tiny_backbone
    before = copy.deepcopy(backbone.model.state_dict())
    image_enc, text_enc = PromptedImageEncoder(backbone), PromptedTextEncoder(backbone)
    image_enc.train()
    text_enc.train()
    assert not backbone.model.training and not backbone.model.visual.training
    mmap = MmAP(MmAPConfig(), 64, 64, 2, 2)
    prompt_before = [p.detach().clone() for p in mmap.parameters()]
    opt = torch.optim.SGD(mmap.parameters(), lr=0.1)
    tokens = text_enc.tokenize(["a cat.", "a dog."], n_prompt=4)
    images = torch.randn(4, 3, 32, 32)
    prompts = mmap()
    logits = backbone.logit_scale * image_enc(images, prompts.vision) @ text_enc(tokens, prompts.text).T
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in backbone.model.parameters())
    after = backbone.model.state_dict()
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
    assert all(not torch.equal(a, b) for a, b in zip(prompt_before, mmap.parameters(), strict=True))


def test_prompt_shape_errors_are_clear(tiny_backbone):
    image_enc = PromptedImageEncoder(tiny_backbone)
    with pytest.raises(PromptConfigError, match="visual prompts must be"):
        image_enc(torch.randn(2, 3, 32, 32), torch.randn(3, 2, 4, 64))  # batch 3 for 2 images
    with pytest.raises(PromptConfigError, match="depth 3"):
        image_enc(torch.randn(2, 3, 32, 32), torch.randn(3, 4, 64))
    text_enc = PromptedTextEncoder(tiny_backbone)
    with pytest.raises(PromptConfigError, match="context length"):
        text_enc.tokenize(["word " * 40], n_prompt=4)
    # SOT + 4 placeholders + n words + EOT: exactly the context fits, one word more does not
    fits = text_enc.context_length - 6
    tokens = text_enc.tokenize(["word " * fits], n_prompt=4)
    assert tokens.shape == (1, text_enc.context_length) and int(tokens[0, -1]) != 0  # EOT in the last slot
    with pytest.raises(PromptConfigError, match="context length"):
        text_enc.tokenize(["word " * (fits + 1)], n_prompt=4)


def test_truncation_after_eot_is_exact(tiny_backbone):
    """Dropping padding after the last EOT (causal mask) gives the same features as the full sequence."""
    text_enc = PromptedTextEncoder(tiny_backbone)
    assert text_enc.truncate_after_eot
    tokens = text_enc.tokenize(["a cat.", "a rather longer description of a dog."], n_prompt=2)
    prompts = torch.randn(2, 2, tiny_backbone.text_width)
    with torch.no_grad():
        short = text_enc(tokens, prompts)
        text_enc.truncate_after_eot = False
        full = text_enc(tokens, prompts)
    assert (short - full).abs().max() <= 1e-5
