"""methods/peft.py: adapter, SSF and VPT on the shared PromptedViT, against hand-written blocks."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from methods.backbones import build_model
from methods.peft import AdapterPEFT, CosineHead, SSFPEFT, VPTPEFT, build_peft
from methods.vit import PromptedViT


@pytest.fixture
def pv():
    torch.manual_seed(0)
    return PromptedViT(build_model("vit_micro_patch8_32"))


def _attn(blk, x):
    """timm's attention written out (softmax(qkᵀ/√d)v, then proj)."""
    b, n, d = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))


def _mlp(blk, x):
    return blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(x)))


def _embed(vit, x):
    t = vit.patch_embed(x)
    return torch.cat([vit.cls_token.expand(len(x), -1, -1), t], 1) + vit.pos_embed


def test_parameter_counts_match_the_reference_logs():
    # ViT-B/16 geometry on the meta device (no memory): the counts of RevisitingCIL's logs
    with torch.device("meta"):
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
    b = PromptedViT(vit)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(AdapterPEFT(b, 64)) == 12 * (768 * 64 + 64 + 64 * 768 + 768) == 1_189_632
    # γ and β after patch proj, norm1, qkv (3D), proj, norm2, fc1 (4D), fc2, final norm
    assert count(SSFPEFT(b)) == 2 * (768 + 12 * (768 + 3 * 768 + 768 + 768 + 4 * 768 + 768) + 768) == 205_824
    assert count(VPTPEFT(b, 5, deep=True)) == 12 * 5 * 768 == 46_080
    assert count(VPTPEFT(b, 5, deep=False)) == 5 * 768 == 3_840
    assert count(b) == sum(p.numel() for p in vit.parameters())  # the modules add nothing to the backbone


def test_adapter_matches_hand_written_block_and_is_off_outside_active(pv):
    ad = AdapterPEFT(pv, bottleneck=8, scale=0.1, dropout=0.1).eval()
    with torch.no_grad():
        for a in ad.adapters:
            a.up.weight.normal_(0, 0.5)
            a.up.bias.normal_(0, 0.5)
    x = torch.randn(2, 3, 32, 32)
    vit = pv.vit
    with torch.no_grad():
        h = _embed(vit, x)
        for i, blk in enumerate(vit.blocks):
            h = h + _attn(blk, blk.norm1(h))  # the post-attention stream feeds the adapter
            a = ad.adapters[i]
            h = h + _mlp(blk, blk.norm2(h)) + 0.1 * a.up(F.relu(a.down(h)))
        expected = vit.norm(h)[:, 0]
        got = ad.features(x)
        plain = pv(x)
    assert (got - expected).abs().max() < 1e-4
    assert (plain - vit.forward_features(x)[:, 0]).abs().max() < 1e-6  # inactive: timm's own pass
    assert (got - plain).abs().max() > 1e-2


def test_adapter_starts_as_identity_and_trains(pv):
    ad = AdapterPEFT(pv, bottleneck=8)
    x = torch.randn(2, 3, 32, 32)
    assert (ad.features(x) - pv(x)).abs().max() == 0  # up projection zero-initialised
    out = ad.features(x)
    (out * torch.randn_like(out)).sum().backward()
    assert ad.adapters[0].up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pv.parameters())


def test_ssf_identity_and_final_scale(pv):
    ssf = SSFPEFT(pv)
    with torch.no_grad():
        for m in ssf.ssf.values():
            m.scale.fill_(1.0)
            m.shift.zero_()
        ssf.ssf["norm"].scale.fill_(2.0)
        ssf.ssf["norm"].shift.fill_(0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ssf.features(x) - (2.0 * pv(x) + 0.5)).abs().max() < 1e-5
        # a qkv scale of 0 on every channel zeroes q, k and v: attention outputs proj's bias only
        ssf.ssf["norm"].scale.fill_(1.0)
        ssf.ssf["norm"].shift.zero_()
        ssf.ssf["b0_qkv"].scale.zero_()
        vit = pv.vit
        h = _embed(vit, x)
        blk = vit.blocks[0]
        h = h + blk.attn.proj.bias
        h = h + _mlp(blk, blk.norm2(h))
        for blk in vit.blocks[1:]:
            h = blk(h)
        assert (ssf.features(x) - vit.norm(h)[:, 0]).abs().max() < 1e-4


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_tokens_after_patches_without_position(pv, deep):
    vpt = VPTPEFT(pv, num_tokens=3, deep=deep)
    with torch.no_grad():
        vpt.tokens.normal_()
    x = torch.randn(2, 3, 32, 32)
    vit = pv.vit
    with torch.no_grad():
        h = _embed(vit, x)
        n = h.shape[1]
        if not deep:
            h = torch.cat([h, vpt.tokens[0].expand(2, -1, -1)], 1)
        for i, blk in enumerate(vit.blocks):
            if deep:
                h = blk(torch.cat([h, vpt.tokens[i].expand(2, -1, -1)], 1))[:, :n]
            else:
                h = blk(h)
        expected = vit.norm(h[:, :n])[:, 0]
        assert (vpt.features(x) - expected).abs().max() < 1e-5
        assert (vpt.features(x) - pv(x)).abs().max() > 1e-3


def test_two_adapters_on_one_backbone_switch_per_pass(pv):
    a, b = build_peft("adapter", pv, bottleneck=4), build_peft("adapter", pv, bottleneck=4)
    with torch.no_grad():
        a.adapters[0].up.weight.normal_()  # not constant: LayerNorm removes a constant shift
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (b.features(x) - pv(x)).abs().max() == 0
        assert (a.features(x) - pv(x)).abs().max() > 1e-3
    with pytest.raises(ValueError):
        build_peft("lora", pv)


def test_cosine_head():
    head = CosineHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        head.sigma.fill_(3.0)
    out = head(torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[3.0, 3.0 / math.sqrt(2)]]))
