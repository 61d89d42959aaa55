"""NoRGa (methods/norga.py): the residual gate, the gated prefix attention, gate training, size.

Expected values are derived here: the gate formula with math on hand-made scores, a ViT forward
written out by hand with the gated prefix logits, and the reference configuration's arithmetic for
the ViT-B/16 parameter count (scripts/imr_Sup21k_NoRGa.sh, configs/*_norgaprompt.py). The HiDe
pipeline NoRGa inherits is tested in test_hide_prompt.py; the checks every method gets in
test_conformance.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.config import ConfigError, TrainConfig
from benchmarks.run.protocol import build_optimizer
from methods.base import Task
from methods.norga import NoRGa, gated_scores

T, C, LAYERS = 3, 6, [0, 1, 2, 3, 4]


def task(i: int, num_tasks: int = T, per: int = 2) -> Task:
    return Task(i, num_tasks, per * i, per * (i + 1), [per * j for j in range(num_tasks + 1)])


def make(backbone, upto: int = 0, **cfg) -> NoRGa:
    m = NoRGa(backbone, C, NoRGa.Config(**{"prompt_length": 2, **cfg}), num_tasks=T)
    for i in range(upto + 1):
        m.begin_task(task(i))
    return m


def test_gate_is_score_plus_beta_times_activation_of_alpha_score():
    s = torch.tensor([[-2.0, 0.0, 1.5], [0.25, -0.5, 3.0]])
    alpha, beta = torch.tensor(2.0), torch.tensor(0.5)
    sig = [[v + 0.5 / (1 + math.exp(-2 * v)) for v in row] for row in s.tolist()]
    torch.testing.assert_close(gated_scores(s, alpha, beta, "sigmoid"), torch.tensor(sig))
    tanh = [[v + 0.5 * math.tanh(2 * v) for v in row] for row in s.tolist()]
    torch.testing.assert_close(gated_scores(s, alpha, beta, "tanh"), torch.tensor(tanh))
    # β = 0 switches the gate off: plain prefix scores
    torch.testing.assert_close(gated_scores(s, alpha, torch.tensor(0.0)), s)


def manual_gated_cls(vit, x, kv, gates):
    """A ViT forward by hand: prefix logits s + β·σ(α·s) with s = q·P_kᵀ/√d_h, token logits plain."""
    z = vit._pos_embed(vit.patch_embed(x))
    for i, blk in enumerate(vit.blocks):
        y = blk.norm1(z)
        b, n, d = y.shape
        heads = blk.attn.num_heads
        dh = d // heads
        q, k, v = blk.attn.qkv(y).reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if i in kv:
            pk, pv = (t.reshape(1, -1, heads, dh).transpose(1, 2).expand(b, -1, -1, -1) for t in kv[i])
            s = q @ pk.transpose(-2, -1) / math.sqrt(dh)
            a_, b_ = gates[i]
            logits = torch.cat([s + b_ * torch.sigmoid(a_ * s), logits], -1)
            v = torch.cat([pv, v], 2)
        z = z + blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        z = z + blk.mlp(blk.norm2(z))
    return vit.norm(z)[:, 0]


def test_prompted_cls_matches_hand_written_gated_attention(micro_backbone):
    m = make(micro_backbone, upto=1).eval()
    with torch.no_grad():
        for p in m.prompts:
            p.uniform_(-1, 1)
        m.gate.copy_(torch.tensor([[0.5, 2.0], [1.5, -1.0], [3.0, 0.25], [-1.0, 1.0], [2.0, 4.0]]))
    x = torch.randn(2, 3, 32, 32)
    p = m.prompts[1]
    kv = {layer: (p[i, 0], p[i, 1]) for i, layer in enumerate(LAYERS)}
    gates = {layer: (float(m.gate[i, 0]), float(m.gate[i, 1])) for i, layer in enumerate(LAYERS)}
    with torch.no_grad():
        got = m.prompted_features(x, p[None])
        torch.testing.assert_close(got, manual_gated_cls(micro_backbone.vit, x, kv, gates), rtol=1e-4, atol=1e-4)
        # the gate changes the features (with β = 0 it is HiDe-Prompt's plain prefix)
        m.gate[:, 1] = 0.0
        plain = manual_gated_cls(micro_backbone.vit, x, kv, {layer: (1.0, 0.0) for layer in LAYERS})
        torch.testing.assert_close(m.prompted_features(x, p[None]), plain, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, plain, atol=1e-3)


def test_gate_trains_with_the_prompt_lr_in_the_first_task_only(micro_backbone):
    m = make(micro_backbone, upto=0, larger_prompt_lr=True)
    assert m.gate.shape == (5, 2) and torch.equal(m.gate.detach(), torch.ones(5, 2))  # act_scale = ones
    opt = build_optimizer(m.param_groups(), TrainConfig(optimizer="adam", lr=0.03, batch_size=128, lr_scale_batch=256))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert any(p is m.gate for p in by_name["prompt"]["params"])
    assert by_name["prompt"]["lr"] == pytest.approx(0.015) and by_name["head"]["lr"] == pytest.approx(0.0015)
    # the task loss reaches α and β in task 0
    x = torch.randn(2, 3, 32, 32)
    m.train()
    m(x, stage="prompt").logits.sum().backward()
    assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0
    # from task 1 on the gate is frozen and left out of the optimiser
    m.begin_task(task(1))
    assert not m.gate.requires_grad
    opt = build_optimizer(m.param_groups(), TrainConfig(optimizer="adam", lr=0.03))
    assert not any(p is m.gate for g in opt.param_groups for p in g["params"])
    # resume replays begin_task: the same flags
    fresh = make(micro_backbone, upto=1)
    assert not fresh.gate.requires_grad


def test_vit_b16_added_parameters_match_the_reference_configuration_and_the_poster():
    from benchmarks.cost.engine import parameter_counts
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):
        backbone = PromptedViT(build_model("vit_base_patch16_224"))
    d, layers, pool = 768, 5, 10  # e-prompt layers 0-4, --size 10
    mlp = (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d  # TII MlpMapping [2]: D→2D, 2D→D, LayerNorm
    gate = layers * 2  # act_scale (5, 2, 1, 1)
    for classes, length, expected in ((100, 5, 2_900_946), (200, 20, 4_206_746)):
        with torch.device("meta"):
            m = NoRGa(backbone, classes, NoRGa.Config(prompt_length=length), num_tasks=pool)
        prompts = layers * 2 * pool * length * d  # (layers, k/v, pool, L, heads·d_h)
        head = d * classes + classes
        assert prompts + gate + head + mlp + head == expected
        assert parameter_counts(m)["added_params"] == expected
    # the SMoPE poster's 4.21 M is the ImageNet-R configuration (L = 20, 200 classes)
    assert round(4_206_746 / 1e6, 2) == 4.21


def test_bad_gate_is_a_config_error(micro_backbone):
    with pytest.raises(ConfigError):
        NoRGa.Config(gate_act="swish").validate()
    with pytest.raises(ConfigError):
        NoRGa(micro_backbone, C, NoRGa.Config(gate_act="swish"))


def test_imagenet_r_schedule_is_timms_epoch_cosine_stepped_after_each_epoch():
    # engines/norga_prompt_engine.py: lr_scheduler.step(epoch) after epoch e, timm CosineLRScheduler
    # (t_initial 150, lr_min 1e-5): epoch 0 and 1 at the base lr, epoch e at t = e − 1, constant
    # within the epoch. By hand for K = 4, lr_min 0: 1, 1, (1 + cos(π/4))/2, (1 + cos(π/2))/2
    from benchmarks.config import resolve_config
    from benchmarks.run.protocol import schedule_factor

    t = TrainConfig(schedule="timm_cosine", epochs=4, min_lr=0.0)
    want = [1.0, 1.0, (1 + math.sqrt(0.5)) / 2, 0.5]
    for e, w in enumerate(want):
        for it in (3 * e, 3 * e + 2):
            assert schedule_factor(t, it, 3, 0.015) == pytest.approx(w, rel=1e-12)
    cfg = resolve_config("norga", "imagenet_r", "paper").train
    assert (cfg.schedule, cfg.epochs, cfg.min_lr) == ("timm_cosine", 150, 1e-5)
    # lr_min 1e-5 of a base 0.015: floor + (1 − floor)·(1 + cos(π·1/150))/2 in epoch 2
    floor = 1e-5 / 0.015
    assert schedule_factor(cfg, 2, 1, 0.015) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi / 150)) / 2)
