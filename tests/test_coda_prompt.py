"""CODA-Prompt: initialisation, slice freezing, α, prompt assembly, penalty, counts, end to end.

Expected values are computed here independently: torch's own cosine_similarity, explicit sums
over components, a hand-written attention forward, closed forms for the penalty and the
parameter counts of the reference configuration (GT-RIPL/CODA-Prompt ``--prompt_param 100 8 0.0``).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.config import ConfigError
from methods.base import Task
from methods.coda_prompt import CodaPrompt, component_weights, ortho_penalty

LAYERS = [0, 1, 2, 3, 4]


def make(backbone, num_tasks=3, pool=30, classes=6, **cfg):
    return CodaPrompt(backbone, classes, CodaPrompt.Config(pool_size=pool, **cfg), num_tasks=num_tasks)


def task(i, num_tasks=3, per=2):
    return Task(i, num_tasks, i * per, (i + 1) * per, [k * per for k in range(num_tasks + 1)])


def rows(method, kind, layer, upto):
    """Rows of slices 0..upto-1 of one layer, flattened (P: L·D per row)."""
    pool = method.pools[str(layer)]
    return torch.cat([p.detach().reshape(p.shape[0], -1) for p in list(getattr(pool, kind))[:upto]]).double()


# --- initialisation --------------------------------------------------------------------------

def test_gram_schmidt_slices_are_orthonormal_and_future_rows_zero(micro_backbone):
    m = make(micro_backbone)  # 3 tasks, 10 components per slice
    m.begin_task(task(0))
    for layer in LAYERS:
        for kind in ("p", "k", "a"):
            x = rows(m, kind, layer, 1)
            assert torch.allclose(x @ x.T, torch.eye(10, dtype=torch.float64), atol=1e-5)
            assert rows(m, kind, layer, 3)[10:].abs().max() == 0  # later tasks: zero until they start
    m.begin_task(task(1))
    for layer in LAYERS:
        for kind in ("p", "k", "a"):
            x = rows(m, kind, layer, 2)  # untouched slice 0 + new slice 1: one orthonormal set
            assert torch.allclose(x @ x.T, torch.eye(20, dtype=torch.float64), atol=1e-5)
            assert rows(m, kind, layer, 3)[20:].abs().max() == 0


def test_new_slice_is_orthogonal_to_trained_earlier_slices(micro_backbone):
    m = make(micro_backbone)
    m.begin_task(task(0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training" moves slice 0 away from orthonormality
        for pool in m.pools.values():
            for params in (pool.p, pool.k, pool.a):
                params[0].add_(0.3 * torch.randn(params[0].shape, generator=g))
    before = {(l, k): rows(m, k, l, 1).clone() for l in LAYERS for k in "pka"}
    m.begin_task(task(1))
    for layer in LAYERS:
        for kind in ("p", "k", "a"):
            old, new = rows(m, kind, layer, 1), rows(m, kind, layer, 2)[10:]
            assert torch.equal(old, before[(layer, kind)])  # earlier rows keep their trained values
            assert torch.allclose(new @ new.T, torch.eye(10, dtype=torch.float64), atol=1e-5)
            assert (new @ old.T).abs().max() < 1e-5
            assert (old @ old.T - torch.eye(10, dtype=torch.float64)).abs().max() > 0.1  # the check above is not vacuous


def test_paper_era_orthogonal_init_covers_the_whole_pool(micro_backbone):
    m = make(micro_backbone, init="orthogonal")
    for layer in LAYERS:
        for kind in ("p", "k", "a"):
            x = rows(m, kind, layer, 3)
            assert torch.allclose(x @ x.T, torch.eye(30, dtype=torch.float64), atol=1e-5)


def test_reinit_keeps_parameter_identity(micro_backbone):
    m = make(micro_backbone)
    m.begin_task(task(0))
    ids = [id(p) for p in m.parameters()]
    m.begin_task(task(1))
    assert [id(p) for p in m.parameters()] == ids  # an optimiser built earlier still points at them


# --- slices, gradients, α and the prefix -------------------------------------------------------

def test_only_the_current_slice_and_head_get_gradients(micro_backbone):
    m = make(micro_backbone, ortho_mu=1.0)  # the penalty must not reach frozen slices either
    m.begin_task(task(0))
    m.begin_task(task(1))
    m.train()
    out = m(torch.rand(4, 3, 32, 32))
    (out.logits.sum() + out.aux_loss).backward()
    for pool in m.pools.values():
        for params in (pool.p, pool.k, pool.a):
            assert params[1].grad is not None and params[1].grad.abs().sum() > 0
            assert params[0].grad is None and params[2].grad is None
            assert not params[0].requires_grad and not params[2].requires_grad
    assert m.head.weight.grad.abs().sum() > 0
    trainable = {id(p) for g in m.param_groups() for p in g["params"] if p.requires_grad}
    expected = {id(p) for pool in m.pools.values() for ps in (pool.p, pool.k, pool.a) for p in [ps[1]]}
    assert trainable == expected | {id(m.head.weight), id(m.head.bias)}


def test_alpha_is_cosine_of_query_times_attention_with_key():
    g = torch.Generator().manual_seed(0)
    q, keys, att = torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    expected = torch.empty(5, 7)
    for b in range(5):
        for m in range(7):
            expected[b, m] = F.cosine_similarity(q[b] * att[m], keys[m], dim=0)
    assert torch.allclose(component_weights(q, keys, att), expected, atol=1e-6)


def test_prefix_is_alpha_weighted_sum_of_components_over_seen_slices(micro_backbone, monkeypatch):
    m = make(micro_backbone)
    m.begin_task(task(0))
    m.begin_task(task(1))
    m.eval()
    captured = {}
    original = m.backbone.forward

    def spy(x, prompt_tokens=None, prefix=None):
        captured.update(prefix)
        return original(x, prompt_tokens, prefix)

    monkeypatch.setattr(m.backbone, "forward", spy)
    x = torch.rand(3, 3, 32, 32)
    q = m.backbone.query(x)
    m(x, query=q)
    heads, dh = m.backbone.num_heads, m.backbone.head_dim
    assert sorted(captured) == LAYERS
    for layer in LAYERS:
        pool = m.pools[str(layer)]
        keys = torch.cat([pool.k[0], pool.k[1]]).detach()
        att = torch.cat([pool.a[0], pool.a[1]]).detach()
        comps = torch.cat([pool.p[0], pool.p[1]]).detach()  # (20, 8, 64); slice 2 must not take part
        tokens = torch.zeros(3, 8, 64)
        for b in range(3):
            for c in range(20):
                alpha = F.cosine_similarity(q[b] * att[c], keys[c], dim=0)
                tokens[b] += alpha * comps[c]
        # first half key tokens, second half value tokens, split into heads: (B, H, 4, d_h)
        key = tokens[:, :4].reshape(3, 4, heads, dh).transpose(1, 2)
        value = tokens[:, 4:].reshape(3, 4, heads, dh).transpose(1, 2)
        assert torch.allclose(captured[layer].key, key, atol=1e-5)
        assert torch.allclose(captured[layer].value, value, atol=1e-5)


def reference_cls(backbone, x, prefix_len, layers):
    """A hand-written ViT forward in which every layer of ``layers`` attends to ``prefix_len``
    extra key/value slots that are all zero: each contributes exp(0) to the softmax and nothing
    to the output."""
    vit = backbone.vit
    h = backbone.embed(x)
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        b, n, c = h.shape
        qkv = a.qkv(blk.norm1(h)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)
        if i in layers:
            zeros = torch.zeros(b, a.num_heads, n, prefix_len)
            logits = torch.cat([zeros, logits], dim=-1)
            v = torch.cat([torch.zeros(b, a.num_heads, prefix_len, a.head_dim), v], dim=2)
        att = logits.softmax(-1) @ v
        h = h + a.proj(att.transpose(1, 2).reshape(b, n, c))
        h = h + blk.mlp(blk.norm2(h))
    return vit.norm(h)[:, 0]


def test_zeroed_prompts_add_only_softmax_mass(micro_backbone):
    """With every component zero the prefix keys and values are zero. The [CLS] then equals a
    forward whose prefixed layers see 4 extra zero-logit, zero-value slots -- not the un-prompted
    backbone's: a zero key still takes softmax mass (exp(0) per slot). The hand-written forward
    is checked against the backbone first (no prefix)."""
    m = make(micro_backbone)
    m.begin_task(task(0))
    with torch.no_grad():
        for pool in m.pools.values():
            for p in pool.p:
                p.zero_()
    m.eval()
    x = torch.rand(3, 3, 32, 32)
    plain = m.backbone.query(x)
    with torch.no_grad():
        assert torch.allclose(reference_cls(m.backbone, x, 0, []), plain, atol=1e-5)
        expected = reference_cls(m.backbone, x, 4, LAYERS)
        out = m(x).features
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3


# --- orthogonality penalty ---------------------------------------------------------------------

def test_ortho_penalty_hand_value():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # X Xᵀ = [[1, 1], [1, 2]]; minus I = [[0, 1], [1, 1]]; squares 0 + 1 + 1 + 1 = 3 over 4 entries
    assert ortho_penalty(x).item() == pytest.approx(0.75)


def closed_form_penalty(x):
    """mean((XXᵀ − I)²) = (‖XXᵀ‖²_F − 2‖X‖²_F + n) / n²."""
    x = x.double()
    n = x.shape[0]
    return ((x @ x.T).pow(2).sum() - 2 * x.pow(2).sum() + n) / n**2


def test_method_penalty_is_mu_times_scale_times_layer_sum(micro_backbone):
    m = make(micro_backbone, ortho_mu=0.1, ortho_scale=1e-6)  # the paper-era weight
    m.begin_task(task(0))
    m.begin_task(task(1))
    with torch.no_grad():  # push the rows away from orthonormality so the penalty is not ~0
        for pool in m.pools.values():
            for params in (pool.p, pool.k, pool.a):
                params[0].mul_(1.7)
                params[1].add_(0.2)
    m.train()
    out = m(torch.rand(2, 3, 32, 32))
    expected = 0.1 * 1e-6 * sum(closed_form_penalty(rows(m, k, l, 2)) for l in LAYERS for k in "kap")
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    m.eval()
    assert m(torch.rand(2, 3, 32, 32)).aux_loss is None  # training only
    assert make(micro_backbone).train()(torch.rand(2, 3, 32, 32)).aux_loss is None  # μ = 0 (current code)


# --- configuration errors and parameter counts --------------------------------------------------

def test_pool_not_divisible_by_tasks_is_a_config_error(micro_backbone, tiny_config):
    with pytest.raises(ConfigError, match="cannot be split evenly into 3 task slices"):
        make(micro_backbone, num_tasks=3, pool=31)
    from benchmarks.run.runner import prepare

    with pytest.raises(ConfigError, match="pool_size=40 cannot be split evenly into 3"):
        prepare(tiny_config("coda_prompt", {"method": {"pool_size": 40}}))
    m = make(micro_backbone, num_tasks=3)
    with pytest.raises(ConfigError, match="built for 3 tasks"):
        m.begin_task(task(0, num_tasks=5))


@pytest.fixture(scope="module")
def vit_b16():
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    return PromptedViT(build_model("vit_base_patch16_224"))  # random weights, no download


@pytest.mark.parametrize("classes", [100, 200])
def test_vit_b16_parameter_counts_match_the_reference_config(vit_b16, classes):
    from benchmarks.cost.engine import parameter_counts

    m = CodaPrompt(vit_b16, classes, CodaPrompt.Config(), num_tasks=10)
    d, length, pool, per_task = 768, 8, 100, 10
    head = d * classes + classes
    per_layer = pool * length * d + pool * d + pool * d  # components, keys, attention vectors
    slice_numbers = 5 * per_task * (length * d + 2 * d)  # one task's share over the 5 layers
    assert slice_numbers == 384_000
    counts = parameter_counts(m)
    assert counts["added_params"] == 5 * per_layer + head == {100: 3_916_900, 200: 3_993_800}[classes]
    assert counts["trainable_params"] == slice_numbers + head
    assert counts["used_params"] == slice_numbers + head
    m.begin_task(Task(3, 10, 3 * classes // 10, 4 * classes // 10, [t * classes // 10 for t in range(11)]))
    counts = parameter_counts(m)
    assert counts["used_params"] == 4 * slice_numbers + head
    assert counts["trainable_params"] == slice_numbers + head


# --- end to end --------------------------------------------------------------------------------

def test_tiny_run_end_to_end(tiny_run):
    res = tiny_run("coda_prompt")
    acc = res["acc_matrix"]
    assert len(acc) == 3 and all(len(r) == 3 for r in acc)
    for t in range(3):
        for j in range(3):
            if j <= t:
                assert 0.0 <= acc[t][j] <= 100.0
            else:
                assert acc[t][j] is None or math.isnan(acc[t][j])
    assert res["metrics"]["faa"] == pytest.approx(sum(acc[2]) / 3)
    alpha = res["diagnostics"]["method"]["mean_abs_alpha"]
    assert [len(a) for a in alpha] == [1, 2, 3]  # after task t the slices 0..t are used
    assert all(0.0 < v <= 1.0 for a in alpha for v in a)
    # quick preset on the micro ViT: 30 components (10 per slice for 3 tasks), width 64, 6 classes
    slice_numbers = 5 * 10 * (8 * 64 + 2 * 64)
    head = 64 * 6 + 6
    assert res["cost"]["added_params"] == 3 * slice_numbers + head
    assert res["cost"]["trainable_params"] == slice_numbers + head
    assert res["cost"]["used_params"] == 3 * slice_numbers + head


@pytest.mark.parametrize("preset", ["paper", "coda"])
@pytest.mark.parametrize("bench,epochs,test_transform", [("cifar100", 20, "resize"), ("imagenet_r", 50, "resize_crop")])
def test_reference_presets(preset, bench, epochs, test_transform):
    """configs/{cifar-100,imnet-r}_prompt.yaml, experiments/*.sh and dataloaders/utils.py of the reference."""
    from benchmarks.config import resolve_config

    cfg = resolve_config("coda_prompt", bench, preset)
    t, b, m = cfg.train, cfg.benchmark, cfg.method
    assert (t.optimizer, t.lr, tuple(t.betas), t.weight_decay, t.lr_scale_batch) == ("adam", 1e-3, (0.9, 0.999), 0.0, None)
    assert (t.batch_size, t.epochs, t.schedule, t.drop_last, t.train_mask) == (128, epochs, "coda_cosine", True, "current")
    assert (b.num_tasks, b.class_order, b.normalize, b.train_transform, b.rrc_scale_min) == (10, "coda", "none", "rrc_flip", 0.08)
    assert b.test_transform == test_transform
    assert cfg.backbone.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert (m.pool_size, m.prompt_length, m.layers, m.init, m.ortho_mu) == (100, 8, [0, 1, 2, 3, 4], "gram_schmidt", 0.0)
