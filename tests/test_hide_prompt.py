"""HiDe-Prompt (methods/hide_prompt.py): prompt choice, ensemble, L_CR, alignment scopes, cost, run.

Expected values are derived in the tests: hand-written attention, closed forms, explicit sums.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.config import ConfigError
from methods.alignment import ClassStats
from methods.base import Task
from methods.hide_prompt import HiDePrompt, contrastive_regulariser, reshape_quirk_layout
from methods.vit import prefix_from_kv

T, C, LAYERS = 3, 6, [0, 1, 2, 3, 4]


def task(i: int, num_tasks: int = T, per: int = 2) -> Task:
    return Task(i, num_tasks, per * i, per * (i + 1), [per * j for j in range(num_tasks + 1)])


def make(backbone, upto: int, **cfg) -> HiDePrompt:
    """A HiDe-Prompt method on the micro ViT with tasks 0..upto begun."""
    cfg = HiDePrompt.Config(**{"prompt_length": 2, "n_centroids": 2, **cfg})
    m = HiDePrompt(backbone, C, cfg, num_tasks=T)
    for i in range(upto + 1):
        m.begin_task(task(i))
    with torch.no_grad():
        for p in m.prompts:
            p.uniform_(-1, 1)
    return m


def explicit_logits(m: HiDePrompt, x, prompt) -> torch.Tensor:
    """Head(prompted [CLS]) with ``prompt`` (layers, 2, L, D) built by hand into per-layer K/V."""
    h = m.backbone.num_heads
    prefix = {layer: prefix_from_kv(prompt[i, 0][None], prompt[i, 1][None], h) for i, layer in enumerate(LAYERS)}
    return m.head(m.backbone(x, prefix=prefix))


def manual_cls(vit, x, kv):
    """A ViT forward written out by hand; ``kv`` maps block -> (K, V) prefix tokens (L, D)."""
    z = vit._pos_embed(vit.patch_embed(x))
    for i, blk in enumerate(vit.blocks):
        y = blk.norm1(z)
        b, n, d = y.shape
        heads = blk.attn.num_heads
        dh = d // heads
        q, k, v = blk.attn.qkv(y).reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        if i in kv:
            pk, pv = (t.reshape(1, -1, heads, dh).transpose(1, 2).expand(b, -1, -1, -1) for t in kv[i])
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        a = (q @ k.transpose(-2, -1) / math.sqrt(dh)).softmax(-1)
        z = z + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        z = z + blk.mlp(blk.norm2(z))
    return vit.norm(z)[:, 0]


def test_tii_prediction_picks_that_tasks_prompt_at_test_time(micro_backbone):
    m = make(micro_backbone, upto=2).eval()
    x = torch.randn(3, 3, 32, 32)
    table = torch.full((3, C), -5.0)
    table[0, 3], table[1, 5], table[2, 0] = 5.0, 5.0, 5.0  # classes of tasks 1, 2, 0
    m.tii_logits = lambda q: table  # force the TII network's output
    with torch.no_grad():
        out = m(x)
        assert out.diagnostics["task_pred"].tolist() == [1, 2, 0]
        assert out.diagnostics["selection"].tolist() == [[1], [2], [0]]
        for b, k in enumerate([1, 2, 0]):
            expected = explicit_logits(m, x[b : b + 1], m.prompts[k])[0]
            torch.testing.assert_close(out.logits[b], expected, rtol=1e-5, atol=1e-5)
            other = explicit_logits(m, x[b : b + 1], m.prompts[(k + 1) % 3])[0]
            assert not torch.allclose(out.logits[b], other, atol=1e-3)  # the prompt matters


def test_tii_prediction_is_restricted_to_seen_classes(micro_backbone):
    m = make(micro_backbone, upto=1).eval()  # after task 1: classes 0..3 seen
    table = torch.tensor([[0.0, 0.0, 5.0, 0.0, 9.0, 9.0], [1.0, 0.0, 0.0, 0.5, 0.0, 9.0]])
    m.tii_logits = lambda q: table
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.diagnostics["task_pred"].tolist() == [1, 0]  # classes 2 and 0, not the unseen 4, 5


def test_training_forces_ground_truth_prompt_with_ensemble(micro_backbone):
    m = make(micro_backbone, upto=2, prompt_momentum=0.25, reg=0.0).train()

    def tii_must_not_decide(q):
        raise AssertionError("the TII network must not choose the training prompt")

    m.tii_logits = tii_must_not_decide
    phases = m.phases(task(2))
    assert [p.name for p in phases] == ["tii", "prompt"]
    prompt_phase = phases[1]
    assert prompt_phase.needs_query is False and prompt_phase.forward_kwargs == {"stage": "prompt"}
    x = torch.randn(4, 3, 32, 32)
    out = m(x, query=None, **prompt_phase.forward_kwargs)
    with torch.no_grad():
        p0, p1, p2 = (m.prompts[i].detach() for i in range(3))
        ensemble = 0.75 * p2 + 0.25 * (p0 + p1) / 2
        torch.testing.assert_close(out.logits, explicit_logits(m, x, ensemble), rtol=1e-5, atol=1e-5)
    assert out.diagnostics["selection"].flatten().tolist() == [2, 2, 2, 2]
    # only the current prompt and the head are optimised; the head at 0.1× (larger_prompt_lr)
    groups = prompt_phase.param_groups
    assert groups[0]["params"][0] is m.prompts[2] and len(groups[0]["params"]) == 1
    assert groups[1]["lr_mult"] == pytest.approx(0.1)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.head.parameters()}


def test_prompt_ensemble_copy_and_consolidation_closed_form(micro_backbone):
    m = make(micro_backbone, upto=0, prompt_momentum=0.25)
    with torch.no_grad():
        m.prompts[0].fill_(1.0)
    m.begin_task(task(1))  # shared_prompt_pool: prompt 1 starts as a copy of prompt 0
    assert torch.equal(m.prompts[1], m.prompts[0])
    assert [p.requires_grad for p in m.prompts] == [False, True, False]
    with torch.no_grad():
        m.prompts[1].fill_(3.0)
    m.begin_task(task(2))
    with torch.no_grad():
        m.prompts[2].fill_(10.0)
    ens = m.train_prompt(2)  # 0.75·10 + 0.25·(1 + 3)/2 = 8
    assert torch.allclose(ens, torch.full_like(ens, 8.0))
    ens.sum().backward()  # the earlier prompts' mean is detached: only p_2 gets (1 - α)
    assert torch.allclose(m.prompts[2].grad, torch.full_like(ens, 0.75))
    assert m.prompts[0].grad is None and m.prompts[1].grad is None
    m.consolidate_prompt(2)
    assert torch.allclose(m.prompts[2], torch.full_like(ens, 8.0))
    assert m.prompts[0].eq(1.0).all() and m.prompts[1].eq(3.0).all()
    assert torch.equal(m.train_prompt(0), m.prompts[0])  # task 0: no ensemble


def _hand_cr(rows, tau=0.8):
    """mean_i [log Σ_j exp(<m_i, m_j>/τ) − <m_i, m_i>/τ], with Python floats."""
    total = 0.0
    for i, mi in enumerate(rows):
        s = [sum(a * b for a, b in zip(mi, mj)) / tau for mj in rows]
        total += math.log(sum(math.exp(v) for v in s)) - s[i]
    return total / len(rows)


def test_contrastive_regulariser_matches_hand_computation():
    cents = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    feats = [[0.5, -1.0], [2.0, 0.0]]
    f = torch.tensor(feats, requires_grad=True)
    c = torch.tensor(cents)
    loss = contrastive_regulariser(f, c)
    assert loss.item() == pytest.approx(_hand_cr(cents + feats), rel=1e-6)
    assert contrastive_regulariser(f, None).item() == pytest.approx(_hand_cr(feats), rel=1e-6)  # task 0
    per_device = (_hand_cr(cents + feats[:1]) + _hand_cr(cents + feats[1:])) / 2
    assert contrastive_regulariser(f, c, chunk=1).item() == pytest.approx(per_device, rel=1e-6)
    loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_forward_adds_reg_times_cr_against_old_class_centroids(micro_backbone):
    m = make(micro_backbone, upto=1, reg=0.5).train()
    d = micro_backbone.embed_dim
    # small centroids: their rows' cross-entropy stays far from 0, so float32 cancellation is negligible
    m.tap_stats.means = {k: 0.3 * torch.randn(2, d, dtype=torch.float64) for k in (0, 1)}
    m.tap_stats.spreads = {k: torch.ones(2, d, dtype=torch.float64) for k in (0, 1)}
    out = m(torch.randn(3, 3, 32, 32), stage="prompt")
    mat = torch.cat([m.tap_stats.means[0], m.tap_stats.means[1], out.features.double()])
    s = mat @ mat.T / 0.8
    expected = 0.5 * (s.logsumexp(1) - s.diagonal()).mean()
    assert expected.item() > 0.005
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reshape_quirk_layout_mixes_keys_values_and_samples_as_the_reference():
    # prompts (B=2, layers=1, 2, L=1, D=1): sample b has key 10b+1, value 10b+2
    p = torch.tensor([[[[[1.0]], [[2.0]]]], [[[[11.0]], [[12.0]]]]])
    q = reshape_quirk_layout(p)
    # reference: (2, B) memory order [k0, k1, v0, v1] read back as (B, 2): sample 0 gets
    # (k0, k1), sample 1 gets (v0, v1)
    assert q[:, 0, :, 0, 0].tolist() == [[1.0, 11.0], [2.0, 12.0]]
    # one prompt for the whole batch (training): first half keys as K and V, second half values
    same = p[:1].expand(4, -1, -1, -1, -1)
    assert reshape_quirk_layout(same)[:, 0, :, 0, 0].tolist() == [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    assert reshape_quirk_layout(same, chunk=2)[:, 0, :, 0, 0].tolist() == [[1.0, 1.0], [2.0, 2.0]] * 2


def _fill_stats(stats: ClassStats, classes, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        stats.add(c, torch.randn(12, d, generator=g) + 3 * c)


def test_tap_alignment_changes_only_the_head_and_tii_alignment_only_mlp_and_head(micro_backbone):
    m = make(micro_backbone, upto=1, tap_epochs=2, tii_align_epochs=3, n_centroids=1)
    d = micro_backbone.embed_dim
    _fill_stats(m.tap_stats, range(4), d)
    _fill_stats(m.tii_stats, range(4), d, seed=1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}

    def changed():
        return {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}

    info = m.align_tap(task(1), samples_per_class=8, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert changed() == {"head.weight", "head.bias"}
    assert info["iterations"] == 2 * 2  # epochs × classes of earlier tasks
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    info = m.align_tii(task(1), lr=0.01, samples_per_class=8, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"))
    tii_names = {n for n, _ in m.named_parameters() if n.startswith(("tii_mlp.", "tii_head."))}
    assert changed() == tii_names
    assert info["iterations"] == 3 * 2


def test_prompted_cls_matches_hand_written_attention_and_zero_prompts_dilute(micro_backbone):
    m = make(micro_backbone, upto=2).eval()
    vit = micro_backbone.vit
    x = torch.randn(2, 3, 32, 32)
    m.tii_logits = lambda q: torch.tensor([[0.0, 0, 0, 0, 9, 0], [0.0, 0, 0, 0, 9, 0]])  # task 2
    with torch.no_grad():
        p = m.prompts[2]
        kv = {layer: (p[i, 0], p[i, 1]) for i, layer in enumerate(LAYERS)}
        torch.testing.assert_close(m(x).features, manual_cls(vit, x, kv), rtol=1e-4, atol=1e-4)
        for q in m.prompts:
            q.zero_()
        zero_kv = {layer: (torch.zeros_like(p[i, 0]), torch.zeros_like(p[i, 1])) for i, layer in enumerate(LAYERS)}
        feats = m(x).features
        torch.testing.assert_close(feats, manual_cls(vit, x, zero_kv), rtol=1e-4, atol=1e-4)
        plain = micro_backbone.query(x)
        torch.testing.assert_close(manual_cls(vit, x, {}), plain, rtol=1e-4, atol=1e-4)
        # zero prompts are not a no-op: L zero-logit columns join every softmax (weight 1 each)
        assert not torch.allclose(feats, plain, atol=1e-3)


def test_vit_b16_added_parameters_equal_reference_configuration():
    from benchmarks.cost.engine import parameter_counts
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):  # shapes only: counting needs no weights (and skips ViT-B's init)
        backbone = PromptedViT(build_model("vit_base_patch16_224"))
    d, layers, pool = 768, 5, 10
    mlp = (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d  # Linear D→2D, Linear 2D→D, LayerNorm(D)
    for classes, length, reference in ((100, 5, 2_900_936), (200, 20, 4_206_736)):
        cfg = HiDePrompt.Config(prompt_length=length)
        with torch.device("meta"):
            m = HiDePrompt(backbone, classes, cfg, num_tasks=pool)
        prompts = layers * 2 * pool * length * d
        head = d * classes + classes
        expected = prompts + head + mlp + head  # prompts, TAP head, TII MLP, TII head
        assert mlp == 2_363_136 and expected == reference
        assert parameter_counts(m)["added_params"] == expected
        m.begin_task(task(3, num_tasks=pool, per=classes // pool))
        assert m.used_parameters() == expected - 6 * layers * 2 * length * d  # prompts 4..9 unused


def test_state_dict_holds_everything_needed_to_continue(micro_backbone):
    m = make(micro_backbone, upto=1)
    d = micro_backbone.embed_dim
    _fill_stats(m.tii_stats, range(4), d)
    _fill_stats(m.tap_stats, range(4), d, seed=2)
    m.align_log.append({"task": 1})
    state = m.checkpoint_state()
    assert not any(k.startswith("backbone.") for k in state)
    fresh = HiDePrompt(micro_backbone, C, m.cfg, num_tasks=T)
    for i in range(2):
        fresh.begin_task(task(i))
    fresh.load_checkpoint_state(state)
    assert fresh.tap_stats.classes == [0, 1, 2, 3] and fresh.align_log == [{"task": 1}]
    for c in range(4):
        assert torch.equal(fresh.tii_stats.means[c], m.tii_stats.means[c])
        assert torch.equal(fresh.tap_stats.spreads[c], m.tap_stats.spreads[c])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x).logits, m.eval()(x).logits)
    # both statistics sets: 4 classes × 2 centroids × (mean + variance) × D each
    assert m.state_numbers() == {"tii_class_stats": 4 * 2 * 2 * d, "tap_class_stats": 4 * 2 * 2 * d}


def test_config_errors_are_config_errors(micro_backbone):
    with pytest.raises(ConfigError):
        HiDePrompt(micro_backbone, C, HiDePrompt.Config(prompt_layers=[0, 9]))
    with pytest.raises(ConfigError):
        HiDePrompt.Config(stats_mode="diagonal").validate()  # variance is the code's third option
    m = HiDePrompt(micro_backbone, C, HiDePrompt.Config(pool_size=2))
    with pytest.raises(ConfigError):
        m.begin_task(task(0))  # 3 tasks, 2 prompts


def test_tiny_run_end_to_end(tiny_run):
    res = tiny_run("hide_prompt", {
        "method": {"prompt_length": 2, "n_centroids": 2, "tii_epochs": 1, "tii_align_epochs": 2, "tap_epochs": 2},
    })
    acc, tii = res["acc_matrix"], res["tii_matrix"]
    assert len(acc) == T and all(len(r) == T for r in acc)
    for t in range(T):
        for j in range(T):
            if j <= t:
                assert 0.0 <= acc[t][j] <= 100.0 and 0.0 <= tii[t][j] <= 100.0
            else:
                assert acc[t][j] is None and tii[t][j] is None
    assert tii[0][0] == 100.0  # after task 0 only task 0's classes are seen: TII cannot miss
    log = res["diagnostics"]["method"]["alignment"]
    assert [e["task"] for e in log] == [0, 1, 2] and "tap_align" not in log[0]
    # iterations per epoch = classes of earlier tasks (2 per task), 2 epochs each
    assert [e["tap_align"]["iterations"] for e in log[1:]] == [2 * 2, 2 * 4]
    assert [e["tii_align"]["iterations"] for e in log[1:]] == [2 * 2, 2 * 4]
    assert res["diagnostics"]["selection_size"] == T
