"""L2P and CODA's L2P++ / Deep L2P++ (methods/l2p.py): selection, pull loss, prompt insertion,
zero-prefix reference, batch-wise option, ViT-B parameter counts, end-to-end run.

Expected values come from hand computations (explicit loops, a hand-written ViT forward) and from
the reference configurations' arithmetic (baselines.md §5), never from the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.config import ConfigError, resolve_config
from methods.base import Task
from methods.registry import create_method, get_method_class

D = 64  # micro ViT width


def make(backbone, num_classes: int = 6, **cfg):
    return create_method("l2p", backbone, num_classes, get_method_class("l2p").Config(**cfg))


def hand_cosine(q: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """(B, M) cosine similarities by explicit loops in float64."""
    qn, kn = q.double().numpy(), k.double().numpy()
    out = np.zeros((len(qn), len(kn)))
    for b in range(len(qn)):
        for i in range(len(kn)):
            out[b, i] = float(qn[b] @ kn[i]) / math.sqrt(float(qn[b] @ qn[b]) * float(kn[i] @ kn[i]))
    return out


def reference_forward(vit, x, prompt_tokens=None, prefix_len=None):
    """Hand-written ViT forward: [CLS, prompts, patches]; explicit attention in which every layer of
    ``prefix_len`` (layer -> P) gets P extra key/value columns that are all zero."""
    b = x.shape[0]
    patches = vit.patch_embed(x)
    pos = vit.pos_embed
    seq = [vit.cls_token.expand(b, -1, -1) + pos[:, :1]]
    if prompt_tokens is not None:
        seq.append(prompt_tokens)
    seq.append(patches + pos[:, 1:])
    h = torch.cat(seq, 1)
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        y = blk.norm1(h)
        n = y.shape[1]
        qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
        p = (prefix_len or {}).get(i, 0)
        # zero keys -> logit 0, zero values -> no contribution, but they take softmax mass
        z = logits.exp().sum(-1, keepdim=True) + p * math.exp(0.0)
        att = (logits.exp() / z) @ v
        h = h + a.proj(att.transpose(1, 2).reshape(b, n, -1))
        h = h + blk.mlp(blk.norm2(h))
    return vit.norm(h)


# --- selection and pull loss ----------------------------------------------------------------

def test_topk_keys_by_cosine_match_hand_computation(micro_backbone):
    m = make(micro_backbone).eval()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(10, D, generator=g)
    with torch.no_grad():
        m.keys[0].copy_(keys)
    q = torch.randn(7, D, generator=g) * 3.0
    out = m(torch.zeros(7, 3, 32, 32), query=q)
    sel = out.diagnostics["selection"]
    assert sel.shape == (7, 5)
    cos = hand_cosine(q, keys)
    for b in range(7):
        assert set(sel[b].tolist()) == set(np.argsort(-cos[b])[:5].tolist())


def test_pull_loss_value_and_step_moves_selected_keys_toward_queries(micro_backbone):
    m = make(micro_backbone).train()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(6, D, generator=g)
    out = m(torch.zeros(6, 3, 32, 32), query=q)
    sel = out.diagnostics["selection"]
    keys0 = m.keys[0].detach().clone()
    cos0 = hand_cosine(q, keys0)
    # l2p-pytorch: CE - 0.1 * (1/B) * sum_b sum_{i in sel(b)} cos(q_b, k_i)
    expected = -0.1 * sum(cos0[b, i] for b in range(6) for i in sel[b].tolist()) / 6
    assert out.aux_loss.item() == pytest.approx(expected, abs=1e-5)
    opt = torch.optim.SGD([m.keys[0]], lr=0.5)
    opt.zero_grad()
    out.aux_loss.backward()
    opt.step()
    cos1 = hand_cosine(q, m.keys[0].detach())
    for i in set(sel.flatten().tolist()):
        rows = [b for b in range(6) if i in sel[b].tolist()]
        assert sum(cos1[b, i] for b in rows) > sum(cos0[b, i] for b in rows)
    unselected = sorted(set(range(10)) - set(sel.flatten().tolist()))
    assert torch.equal(m.keys[0].detach()[unselected], keys0[unselected])


def test_coda_pull_losses_match_explicit_sums(micro_backbone):
    """CODA's cos_sim[:, k_idx] quirk sums over all (sample, other sample's selection) pairs."""
    from methods.l2p import pull_loss

    g = torch.Generator().manual_seed(3)
    sim = torch.rand(8, 30, generator=g) * 2 - 1
    idx = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(8)])
    per_sample = sum(1 - sim[b, i].item() for b in range(8) for i in idx[b].tolist())
    pairs = sum(1 - sim[b, i].item() for b in range(8) for c in range(8) for i in idx[c].tolist())
    halves = sum(1 - sim[b, i].item() for lo in (0, 4) for b in range(lo, lo + 4) for c in range(lo, lo + 4)
                 for i in idx[c].tolist())
    assert pull_loss(sim, idx, "coda_per_sample").item() == pytest.approx(per_sample, rel=1e-5)
    assert pull_loss(sim, idx, "coda_pairs").item() == pytest.approx(pairs, rel=1e-5)
    assert pull_loss(sim, idx, "coda_pairs", chunks=2).item() == pytest.approx(halves, rel=1e-5)


# --- injection ------------------------------------------------------------------------------

@pytest.mark.parametrize("pos", ["cls", "none"])
def test_prompt_tokens_follow_cls_and_head_reads_their_mean(micro_backbone, pos):
    m = make(micro_backbone, prompt_pos_embed=pos).eval()
    x = torch.rand(3, 3, 32, 32)
    out = m(x)
    idx = out.diagnostics["selection"]
    vit = micro_backbone.vit
    with torch.no_grad():
        tokens = torch.stack([torch.cat([m.prompts[0][i] for i in row.tolist()]) for row in idx])  # (B, 25, D)
        if pos == "cls":  # l2p-pytorch: every prompt token carries the [CLS] positional embedding
            tokens = tokens + vit.pos_embed[:, :1]
        feats = reference_forward(vit, x, prompt_tokens=tokens)
        assert feats.shape[1] == 1 + 25 + 16
        head_in = feats[:, 1:26].mean(1)
        expected = head_in @ m.head.weight.T + m.head.bias
    assert torch.allclose(out.logits, expected, atol=1e-5)


@pytest.mark.parametrize("variant,layers", [("l2p++", [0]), ("deep_l2p++", [0, 1, 2, 3, 4])])
def test_zeroed_prefixes_equal_reference_with_zero_columns(micro_backbone, variant, layers):
    """All-zero L2P++ prompts add 50 zero-key / zero-value columns per prompted layer: a zero key
    has logit 0, so it still takes softmax mass exp(0) and the output is *not* the un-prompted one;
    it equals the hand-written forward with those columns."""
    m = make(micro_backbone, variant=variant, init="zero").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feat = m(x).features
        expected = reference_forward(micro_backbone.vit, x, prefix_len={l: 5 * 10 for l in layers})[:, 0]
        plain = micro_backbone.query(x)
        assert torch.allclose(reference_forward(micro_backbone.vit, x)[:, 0], plain, atol=1e-5)
    assert torch.allclose(feat, expected, atol=1e-5)
    assert (feat - plain).abs().max() > 1e-3


def test_deep_variant_has_a_pool_and_key_set_per_layer(micro_backbone):
    m = make(micro_backbone, variant="deep_l2p++").eval()
    assert len(m.prompts) == len(m.keys) == 5
    q = torch.randn(4, D)
    out = m(torch.zeros(4, 3, 32, 32), query=q)
    sel = out.diagnostics["selection"]
    assert sel.shape == (4, 5, 5) and m.selection_size == 30
    for j in range(5):
        cos = hand_cosine(q, m.keys[j].detach())
        for b in range(4):
            assert set(sel[b, j].tolist()) == set(np.argsort(-cos[b])[:5].tolist())


# --- batch-wise vote ------------------------------------------------------------------------

@pytest.mark.parametrize("batchwise", [False, True])
def test_batchwise_vote_is_the_only_way_a_batch_changes_a_prediction(micro_backbone, batchwise):
    m = make(micro_backbone, batchwise_prompt=batchwise).eval()
    keys = torch.eye(10, D)
    with torch.no_grad():
        m.keys[0].copy_(keys)
    # sample a prefers keys 0-4, the two others keys 5-9: the vote hands a keys 5-9
    qa = keys[:5].sum(0) + 0.1 * keys[:5].cumsum(0).sum(0)
    qo = keys[5:].sum(0) + 0.1 * keys[5:].cumsum(0).sum(0)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        alone = m(x[:1], query=qa[None])
        batch = m(x, query=torch.stack([qa, qo, qo * 1.5]))
    assert set(alone.diagnostics["selection"][0].tolist()) == {0, 1, 2, 3, 4}
    diff = (alone.logits[0] - batch.logits[0]).abs().max().item()
    if batchwise:
        assert set(batch.diagnostics["selection"][0].tolist()) == {5, 6, 7, 8, 9}
        assert diff > 1e-3
    else:
        assert diff < 1e-5


# --- options ----------------------------------------------------------------------------------

def test_prompt_mask_and_shared_pool_follow_the_task(micro_backbone):
    m = make(micro_backbone, pool_size=10, top_k=5, use_prompt_mask=True, shared_prompt_pool=True)
    task1 = Task(1, 3, 2, 4, [0, 2, 4, 6])
    before = m.prompts[0].detach().clone()
    m.begin_task(task1)
    assert torch.equal(m.prompts[0].detach()[5:10], before[0:5])  # slot 0 copied into slot 1
    m.train()
    out = m(torch.zeros(2, 3, 32, 32), query=torch.randn(2, D))
    assert out.diagnostics["selection"].tolist() == [[5, 6, 7, 8, 9]] * 2
    m.begin_task(Task(2, 3, 4, 6, [0, 2, 4, 6]))  # slots [10, 15) run past the pool: no mask
    out = m(torch.zeros(2, 3, 32, 32), query=torch.eye(2, D))
    assert out.diagnostics["selection"].shape == (2, 5)
    # with the mask, untrained slots of later tasks are not counted as used: after task 0 of 2
    m.begin_task(Task(0, 2, 0, 3, [0, 3, 6]))
    assert m.used_parameters() == sum(p.numel() for p in m.method_parameters()) - 5 * 5 * D


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        resolve_config("l2p", "synthetic", "quick", {"method": {"variant": "l2p+++"}})
    with pytest.raises(ConfigError):
        resolve_config("l2p", "synthetic", "quick", {"method": {"variant": "l2p++", "head": "prompt"}})
    with pytest.raises(ConfigError):
        resolve_config("l2p", "synthetic", "quick", {"method": {"top_k": 11}})


# --- ViT-B/16 parameter counts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b():
    """ViT-B/16 skeleton; counting needs shapes only, so it lives on the meta device (no weights,
    no download, no second of random initialisation of 86M numbers)."""
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):
        return PromptedViT(build_model("vit_base_patch16_224"))


def _added(vit_b, preset: str, bench: str, classes: int, overrides=None) -> int:
    from benchmarks.cost.engine import parameter_counts

    cfg = resolve_config("l2p", bench, preset, overrides)
    with torch.device("meta"):
        method = create_method("l2p", vit_b, classes, cfg.method)
    return parameter_counts(method)["added_params"]


def test_vit_b_added_parameters_equal_reference_configs(vit_b):
    d = 768
    head = lambda c: d * c + c  # noqa: E731
    # l2p-pytorch CIFAR: pool 10 x length 5 x D prompts, 10 keys, head D->100 (baselines.md §5: 122,980)
    l2p = 10 * 5 * d + 10 * d + head(100)
    assert l2p == 122_980
    assert _added(vit_b, "paper", "cifar100", 100) == l2p
    # CODA L2P++ (--prompt_param 30 20 -1): 30 x 20 x D prompts + 30 keys, one layer (560,740 / 637,640)
    pool = 30 * 20 * d + 30 * d
    assert (pool + head(100), pool + head(200)) == (560_740, 637_640)
    shallow = {"method": {"variant": "l2p++"}}
    assert _added(vit_b, "coda", "cifar100", 100, shallow) == pool + head(100)
    assert _added(vit_b, "coda", "imagenet_r", 200, shallow) == pool + head(200)
    # Deep L2P++ (--prompt_param 30 20 1): a pool and key set on each of layers 0-4
    assert _added(vit_b, "coda", "cifar100", 100) == 5 * pool + head(100) == 2_496_100
    assert _added(vit_b, "coda", "imagenet_r", 200) == 5 * pool + head(200) == 2_573_000


# --- end to end ---------------------------------------------------------------------------------

def test_tiny_run_records_matrix_and_selection(tiny_run):
    res = tiny_run("l2p", {"method": {"variant": "deep_l2p++", "pool_size": 6, "top_k": 2, "length": 4}})
    acc = np.array(res["acc_matrix"], dtype=float)
    assert acc.shape == (3, 3)
    assert not np.isnan(acc[np.tril_indices(3)]).any() and np.isnan(acc[np.triu_indices(3, 1)]).all()
    hist = res["diagnostics"]["selection_hist"]
    assert res["diagnostics"]["selection_size"] == 6
    for j in ("0", "1", "2"):
        h = np.array(hist["final"][j])
        assert h.shape == (5, 6)  # per prompted layer, per prompt id
        assert (h.sum(1) == 6 * 2 * 2).all()  # 2 classes x 6 test images, top-2 picks each
    assert set(hist["diagonal"]) == {"0", "1", "2"}
