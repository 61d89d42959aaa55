"""OVOR (methods/ovor.py): k-NN distances, outlier synthesis, energy loss, VOR batches, the single
prompt, the schedule over all epochs, the VOR stage, size.

Expected values are derived here: explicit loops over hand-made points, the loss written out with
math, the reference's batch arithmetic, a ViT forward written out by hand, and the reference
configuration's arithmetic for the ViT-B/16 parameter count (``--prompt_param 10 40 10``,
models/zoo.py ``OnePrompt``). The checks every method gets are in test_conformance.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.config import ConfigError, TrainConfig
from benchmarks.run.protocol import schedule_factor
from methods.base import Task
from methods.ovor import OVOR, energy_loss, kth_neighbour_sqdist, synthesize_outliers, vor_batches


def test_kth_neighbour_distance_counts_the_point_itself_as_faiss_does():
    index = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0]])
    # squared distances from (0,0): 0, 1, 9, 36 -> 2nd = 1, 3rd = 9; from (3,0): 9, 4, 0, 9 -> 2nd 4, 3rd 9
    got = kth_neighbour_sqdist(index, index, 2)
    assert got.tolist() == pytest.approx([1.0, 1.0, 4.0, 9.0])
    assert kth_neighbour_sqdist(index, index, 3).tolist() == pytest.approx([9.0, 4.0, 9.0, 25.0])
    # a query outside the index; k larger than the index is capped at its size
    assert kth_neighbour_sqdist(torch.tensor([[0.0, 2.0]]), index, 10).tolist() == pytest.approx([40.0])


def test_code_outliers_are_the_farthest_scaled_offsets_each_repeated():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5], [1.0, 1.0]])
    d, sample_from, select, k, cov = 2, 5, 3, 2, 0.1
    g = torch.Generator().manual_seed(7)
    out = synthesize_outliers(feats, num_classes=2, generator=g, k=k, sample_from=sample_from, select=select,
                              per_class=2, cov=cov, mode="code")
    offsets = torch.randn(sample_from, d, generator=torch.Generator().manual_seed(7))  # the same draw
    unit = [[float(v) / math.hypot(*r.tolist()) for v in r] for r in feats]
    kth = []
    for o in (cov * offsets).tolist():
        ds = sorted(sum((o[j] - u[j]) ** 2 for j in range(d)) for u in unit)
        kth.append(ds[k - 1])
    order = sorted(range(sample_from), key=lambda i: -kth[i])
    # 2 per class × 2 classes = 4 of the 3 × 5 tiled candidates: the farthest offset 3 times
    # (it appears select = 3 times), then the second farthest once
    expected = [order[0]] * 3 + [order[1]]
    assert out.shape == (4, d)
    for row, i in zip(out, expected):
        torch.testing.assert_close(row, cov * offsets[i])
    assert torch.unique(out, dim=0).shape[0] == 2


def test_boundary_outliers_are_boundary_features_plus_offsets():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5], [1.0, 1.0]])
    g = torch.Generator().manual_seed(3)
    out = synthesize_outliers(feats, num_classes=3, generator=g, k=2, sample_from=4, select=2, per_class=2,
                              cov=0.1, mode="boundary")
    offsets = 0.1 * torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    # boundary points: the 2 features whose normalised versions are farthest from their 2nd neighbour
    unit = feats / feats.norm(dim=1, keepdim=True)
    kth = [sorted(float((u - w).pow(2).sum()) for w in unit)[1] for u in unit]
    boundary = sorted(range(5), key=lambda i: -kth[i])[:2]
    cands = [feats[b] + o for b in boundary for o in offsets]
    assert out.shape == (6, 2)
    for row in out:
        assert any(torch.allclose(row, c) for c in cands)


def huber0(v: float) -> float:
    return 0.5 * v * v if abs(v) < 1 else abs(v) - 0.5


def test_energy_loss_written_out():
    id_logits = torch.tensor([[2.0, 1.0], [10.0, 9.0]])
    ood_logits = torch.tensor([[0.5, -0.5], [4.0, 3.5]])
    t_id, t_ood = -2.0, -1.0
    e_id = [-math.log(sum(math.exp(v) for v in r)) for r in id_logits.tolist()]
    e_ood = [-math.log(sum(math.exp(v) for v in r)) for r in ood_logits.tolist()]
    a = [max(0.0, e - t_id) for e in e_id]  # ID energy above t_id is penalised
    b = [max(0.0, t_ood - e) for e in e_ood]  # OOD energy below t_ood is penalised
    expected = sum(huber0(v) for v in a) / 2 + sum(huber0(v) for v in b) / 2
    assert float(energy_loss(id_logits, ood_logits, t_id, t_ood)) == pytest.approx(expected, rel=1e-6)
    mse = sum(v * v for v in a) / 2 + sum(v * v for v in b) / 2
    assert float(energy_loss(id_logits, ood_logits, t_id, t_ood, "mse")) == pytest.approx(mse, rel=1e-6)


def test_vor_batches_follow_the_reference_loaders():
    # CIFAR-100 task: 5000 images, 400 outliers -> 40 steps of 128 ID features and 10 outliers
    b = vor_batches(5000, 400, 128, torch.Generator().manual_seed(0))
    assert len(b) == 40 and [len(i) for i, _ in b][-1] == 5000 - 39 * 128
    assert b[0][1] == slice(0, 10) and b[-1][1] == slice(390, 400)
    assert sorted(torch.cat([i for i, _ in b]).tolist()) == list(range(5000))
    # ImageNet-R-like: 300 ID, 800 outliers -> 3 steps of floor(800/3) = 266 (the last 2 unused)
    b = vor_batches(300, 800, 128, torch.Generator().manual_seed(0))
    assert [s for _, s in b] == [slice(0, 266), slice(266, 532), slice(532, 798)]


def test_one_prompt_on_g_and_e_layers_matches_hand_written_attention(micro_backbone):
    m = OVOR(micro_backbone, 6, OVOR.Config(g_length=4, e_length=6)).eval()
    assert not m.uses_query  # one backbone pass
    vit = micro_backbone.vit
    x = torch.randn(2, 3, 32, 32)
    kv = {0: (m.g_prompt[0, :2], m.g_prompt[0, 2:]), 1: (m.g_prompt[1, :2], m.g_prompt[1, 2:])}
    kv.update({layer: (m.e_prompt[i, :3], m.e_prompt[i, 3:]) for i, layer in enumerate([2, 3, 4])})
    z = vit._pos_embed(vit.patch_embed(x))
    with torch.no_grad():
        for i, blk in enumerate(vit.blocks):
            y = blk.norm1(z)
            bsz, n, d = y.shape
            h = blk.attn.num_heads
            q, k, v = blk.attn.qkv(y).reshape(bsz, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            if i in kv:
                pk, pv = (t.reshape(1, -1, h, d // h).transpose(1, 2).expand(bsz, -1, -1, -1) for t in kv[i])
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            a = (q @ k.transpose(-2, -1) / math.sqrt(d // h)).softmax(-1)
            z = z + blk.attn.proj((a @ v).transpose(1, 2).reshape(bsz, n, d))
            z = z + blk.mlp(blk.norm2(z))
        out = m(x)
    torch.testing.assert_close(out.features, vit.norm(z)[:, 0], rtol=1e-4, atol=1e-4)
    # U[0, 1) initialisation; the same prompt whatever the task
    assert 0 <= float(m.e_prompt.detach().min()) and float(m.e_prompt.detach().max()) < 1


def test_vor_step_trains_only_the_head_with_ce_over_the_current_task_plus_energy(micro_backbone):
    m = OVOR(micro_backbone, 6, OVOR.Config(lmda=0.5, thres_id=-1.0, thres_ood=-0.5))
    t = Task(1, 3, 2, 4, [0, 2, 4, 6])
    with torch.no_grad():
        m.head.weight.copy_(torch.arange(6 * 64, dtype=torch.float32).reshape(6, 64).sin())
        m.head.bias.copy_(torch.tensor([5.0, 5.0, 0.1, -0.2, 7.0, 7.0]))
    feats, labels, oods = torch.randn(3, 64) * 0.1, torch.tensor([2, 3, 3]), torch.randn(2, 64) * 0.1
    out = m.vor_step_loss(feats, labels, oods, t)
    logits = (feats @ m.head.weight.T + m.head.bias).detach()
    ce = sum(-float(logits[i, y]) + math.log(math.exp(logits[i, 2]) + math.exp(logits[i, 3]))
             for i, y in enumerate(labels.tolist())) / 3  # classes 0-1 (old) and 4-5 (future) excluded
    ol = (oods @ m.head.weight.T + m.head.bias).detach()
    reg = float(energy_loss(logits[:, 2:4], ol[:, 2:4], -1.0, -0.5))
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(ce + 0.5 * reg, rel=1e-5)
    out["loss"].backward()
    assert m.head.weight.grad is not None and m.g_prompt.grad is None and m.e_prompt.grad is None


def test_schedule_runs_over_regular_and_vor_epochs():
    # CIFAR-100: 16 regular epochs of a K = 20 CosineSchedule (utils/schedulers.py), which lags one
    # epoch: epochs 0 and 1 at the base lr, epoch e >= 1 at cos(99π·(e−1) / (200·19))
    tcfg = TrainConfig(epochs=16, schedule="coda_cosine", schedule_epochs=20)
    assert schedule_factor(tcfg, 0, 10, 1e-3) == 1.0 and schedule_factor(tcfg, 10, 10, 1e-3) == 1.0
    for e in (2, 7, 15):
        assert schedule_factor(tcfg, e * 10, 10, 1e-3) == pytest.approx(math.cos(99 * math.pi * (e - 1) / (200 * 19)))
    # not the 16-epoch schedule: epoch 15 would be cos(99π·14/3000)
    assert schedule_factor(tcfg, 150, 10, 1e-3) != pytest.approx(math.cos(99 * math.pi * 14 / 3000))


def test_vor_stage_in_a_tiny_run(tiny_run):
    # 3 tasks × 2 classes, 12 training images per class -> 24 ID features per task: select = 24,
    # 2 × 40 = 80 outliers of the 24 × 600 candidates = 3 full groups of 24 copies + 8 of a 4th
    res = tiny_run("ovor", {"train": {"schedule_epochs": None, "lr": 0.003}, "method": {"vor_epochs": 2}})
    vor = res["diagnostics"]["method"]["vor"]
    assert [v["task"] for v in vor] == [0, 1, 2]
    for v in vor:
        assert len(v["epochs"]) == 2
        for e in v["epochs"]:
            assert e["outliers"] == 80 and e["distinct_outliers"] == 4
        # VOR epochs 1 and 2 of K = 1 + 2 (lagged cosine): the base lr, then lr·cos(99π·1 / (200·2))
        assert [e["lr"] for e in v["epochs"]] == pytest.approx([0.003, 0.003 * math.cos(99 * math.pi / 400)])


def test_vit_b16_added_parameters_match_the_reference_configuration_and_the_poster():
    from benchmarks.cost.engine import parameter_counts
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):
        backbone = PromptedViT(build_model("vit_base_patch16_224"))
    d = 768
    prompts = 2 * 10 * d + 3 * 40 * d  # G: layers 0-1 × length 10; E: layers 2-4 × length 40
    assert prompts == 107_520
    for classes, expected in ((100, 184_420), (200, 261_320)):
        with torch.device("meta"):
            m = OVOR(backbone, classes, OVOR.Config())
        assert prompts + d * classes + classes == expected
        assert parameter_counts(m)["added_params"] == expected
    assert round(261_320 / 1e6, 2) == 0.26  # the SMoPE poster's OVOR row: the 200-class head


def test_bad_settings_are_config_errors(micro_backbone):
    for bad in ({"e_length": 5}, {"outliers": "npos"}, {"vor_loss": "l1"}, {"g_layers": [1], "e_layers": [1]},
                {"knn_k": 0}):
        with pytest.raises(ConfigError):
            OVOR(micro_backbone, 6, OVOR.Config(**bad))
    with pytest.raises(ConfigError):
        OVOR(micro_backbone, 6, OVOR.Config(e_layers=[2, 9]))
