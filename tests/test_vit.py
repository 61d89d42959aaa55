"""PromptedViT: equality with timm, prompt tokens, prefixes, logit bias, query pass, frozen weights."""
import math

import pytest
import timm
import torch

from methods.backbones import build_model
from methods.vit import Prefix, PromptedViT, prefix_from_kv, to_heads


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_model("vit_micro_patch8_32")


def test_no_prompt_equals_timm_micro(vit):
    x = torch.randn(3, 3, 32, 32)
    pv = PromptedViT(vit)
    assert (pv.forward_features(x) - vit.forward_features(x)).abs().max() < 1e-5
    assert (pv.query(x) - vit.forward_features(x)[:, 0]).abs().max() < 1e-5


def test_no_prompt_equals_timm_standard_config():
    # timm's own ViT-Ti/16 architecture (random weights) at 64 px, to cover a stock config
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    assert (PromptedViT(vit).forward_features(x) - vit.forward_features(x)).abs().max() < 1e-5


def test_backbone_is_frozen_and_gets_no_grad(vit):
    pv = PromptedViT(vit)
    assert not any(p.requires_grad for p in pv.parameters())
    h, dh = pv.num_heads, pv.head_dim
    pk = torch.randn(1, h, 2, dh, requires_grad=True)
    pvv = torch.randn(1, h, 2, dh, requires_grad=True)
    out = pv(torch.randn(2, 3, 32, 32), prefix={1: Prefix(pk, pvv)})
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of a LayerNorm output is constant
    assert pk.grad is not None and pk.grad.abs().sum() > 0
    assert all(p.grad is None for p in pv.parameters())


def test_frozen_backbone_stays_in_eval_mode(vit):
    pv = PromptedViT(vit)
    pv.train()
    assert not pv.vit.training
    pv.set_trainable(True)
    pv.train()
    assert pv.vit.training and all(p.requires_grad for p in pv.parameters())


def _explicit_block(blk, x, pk=None, pv=None, bias=None, num_heads=4):
    """Reference computation of a timm pre-norm block with a prefix, written out by hand."""
    b, n, d = x.shape
    dh = d // num_heads
    y = blk.norm1(x)
    qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.split(d, dim=-1)
    q, k, v = (t.reshape(b, n, num_heads, dh).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if pv is not None:
        key = torch.zeros_like(pv) if pk is None else pk
        plog = q @ key.transpose(-1, -2) / math.sqrt(dh)
        if bias is not None:
            plog = plog + bias
        logits = torch.cat([plog, logits], dim=-1)
        v = torch.cat([pv, v], dim=2)
    att = logits.softmax(-1) @ v
    att = att.transpose(1, 2).reshape(b, n, d)
    x = x + blk.attn.proj(att)
    return x + blk.mlp(blk.norm2(x))


def test_prefix_attention_matches_explicit_softmax(vit):
    pv_ = PromptedViT(vit)
    x = torch.randn(2, 3, 32, 32)
    h, dh = pv_.num_heads, pv_.head_dim
    pk, pvv = torch.randn(2, h, 3, dh), torch.randn(2, h, 3, dh)
    bias = torch.randn(2, h, 1, 3)
    got = pv_.forward_features(x, prefix={0: Prefix(pk, pvv, bias)})
    tokens = pv_.embed(x)
    ref = _explicit_block(vit.blocks[0], tokens, pk, pvv, bias, h)
    for blk in vit.blocks[1:]:
        ref = blk(ref)
    ref = vit.norm(ref)
    assert (got - ref).abs().max() < 1e-5


def test_zero_key_bias_prefix_is_proxy_score_attention(vit):
    """Zero keys + a row-broadcast bias give every query row the same prompt logit (SMoPE)."""
    pv_ = PromptedViT(vit)
    x = torch.randn(1, 3, 32, 32)
    h, dh = pv_.num_heads, pv_.head_dim
    vals, bias = torch.randn(1, h, 4, dh), torch.randn(1, h, 1, 4)
    got = pv_.forward_features(x, prefix={2: Prefix(None, vals, bias)})
    t = pv_.embed(x)
    for blk in vit.blocks[:2]:
        t = blk(t)
    t = _explicit_block(vit.blocks[2], t, None, vals, bias, h)
    for blk in vit.blocks[3:]:
        t = blk(t)
    assert (got - vit.norm(t)).abs().max() < 1e-5


def test_prefix_with_minus_inf_bias_is_a_no_op(vit):
    pv_ = PromptedViT(vit)
    x = torch.randn(2, 3, 32, 32)
    h, dh = pv_.num_heads, pv_.head_dim
    p = Prefix(torch.randn(2, h, 5, dh), torch.randn(2, h, 5, dh), torch.full((2, h, 1, 5), -1e9))
    assert (pv_.forward_features(x, prefix={0: p, 3: p}) - vit.forward_features(x)).abs().max() < 1e-5


def test_callable_prefix_receives_layer_queries(vit):
    pv_ = PromptedViT(vit)
    seen = {}

    class Spy:
        layers = (1, 4)

        def __call__(self, layer, q):
            seen[layer] = q.shape
            return None

    x = torch.randn(2, 3, 32, 32)
    out = pv_.forward_features(x, prefix=Spy())
    assert seen == {1: (2, 4, 17, 16), 4: (2, 4, 17, 16)}
    assert (out - vit.forward_features(x)).abs().max() < 1e-5


def test_prompt_tokens_inserted_after_cls(vit):
    pv_ = PromptedViT(vit)
    x = torch.randn(2, 3, 32, 32)
    tok = torch.randn(2, 3, 64)
    got = pv_.forward_features(x, prompt_tokens=tok)
    seq = pv_.embed(x)
    seq = torch.cat([seq[:, :1], tok, seq[:, 1:]], dim=1)
    for blk in vit.blocks:
        seq = blk(seq)
    ref = vit.norm(seq)
    assert got.shape == (2, 17 + 3, 64)
    assert (got - ref).abs().max() < 1e-5


def test_prefix_helpers_shapes():
    t = torch.arange(2 * 3 * 8, dtype=torch.float).reshape(2, 3, 8)
    h = to_heads(t, 2)
    assert h.shape == (2, 2, 3, 4)
    assert torch.equal(h[1, 1, 2], t[1, 2, 4:])
    p = prefix_from_kv(t, t + 1, 2)
    assert p.length == 3 and torch.equal(p.value, to_heads(t + 1, 2))


def test_geometry(vit):
    pv_ = PromptedViT(vit)
    assert (pv_.embed_dim, pv_.depth, pv_.num_heads, pv_.head_dim, pv_.num_tokens, pv_.img_size) == (64, 6, 4, 16, 17, 32)
