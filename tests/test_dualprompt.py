"""DualPrompt and CODA's DualPrompt (methods/dualprompt.py): forced E-prompt in training, key
match at test time, zero-prefix reference, shared pool, reshape quirk, ViT-B parameter counts,
end-to-end run with task-identity accuracy.

Expected values come from hand computations and the reference configurations' arithmetic
(baselines.md §5), never from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.config import ConfigError, resolve_config
from methods.base import Task
from methods.registry import create_method, get_method_class
from tests.test_l2p import reference_forward

D = 64  # micro ViT width
TASKS = [Task(t, 3, 2 * t, 2 * t + 2, [0, 2, 4, 6]) for t in range(3)]


def make(backbone, num_classes: int = 6, **cfg):
    return create_method("dualprompt", backbone, num_classes, get_method_class("dualprompt").Config(**cfg))


@pytest.mark.parametrize("variant", ["dualprompt", "coda"])
def test_training_updates_only_the_current_task_e_prompt(micro_backbone, variant):
    m = make(micro_backbone, variant=variant)
    m.begin_task(TASKS[1])
    m.train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 2, 3])
    out = m(x, query=torch.randn(4, D))
    assert out.diagnostics["selection"].flatten().tolist() == [1] * out.diagnostics["selection"].numel()
    mask = torch.zeros(6, dtype=torch.bool)
    mask[2:4] = True
    m.training_loss(out, y, mask).backward()
    others = [0] + list(range(2, 10))
    assert m.e_prompt.grad[:, others].abs().max() == 0  # (E-layers, slot, rows, D)
    assert m.keys.grad[:, others].abs().max() == 0  # (key sets, slot, D)
    assert (m.e_prompt.grad[:, 1].abs().amax(dim=(1, 2)) > 0).all()  # every E-layer's slot 1
    assert (m.keys.grad[:, 1].abs().amax(dim=1) > 0).all()  # the pull reaches key 1 of every set
    assert m.g_prompt.grad.abs().max() > 0


def test_pull_loss_values(micro_backbone):
    q = torch.randn(5, D)
    dp = make(micro_backbone)
    dp.begin_task(TASKS[2])
    dp.train()
    cos = F.cosine_similarity(q.double(), dp.keys[0, 2].detach().double()[None], dim=1)
    # dualprompt-pytorch: CE - 1.0 * (1/B) * sum_b cos(q_b, k_t)
    assert dp(torch.zeros(5, 3, 32, 32), query=q).aux_loss.item() == pytest.approx(-cos.mean().item(), abs=1e-5)
    coda = make(micro_backbone, variant="coda")
    coda.begin_task(TASKS[2])
    coda.train()
    # CODA: sum over the 3 E-layers' key sets and the batch of (1 - cos(q_b, k_t))
    expected = sum((1 - F.cosine_similarity(q.double(), coda.keys[j, 2].detach().double()[None], dim=1)).sum().item()
                   for j in range(3))
    assert coda(torch.zeros(5, 3, 32, 32), query=q).aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_test_time_picks_the_prompt_whose_key_matches(micro_backbone):
    m = make(micro_backbone, shared_prompt_pool=False).eval()  # no slot copies in begin_task below
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, D, generator=g)
    with torch.no_grad():
        m.keys[0, 3] = q[0] * 2.0
        m.keys[0, 7] = q[1] * 0.5
        m.keys[0, 5] = q[2]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = m(x, query=q)
    assert out.diagnostics["selection"][:, 0].tolist() == [3, 7, 5]
    assert out.diagnostics["task_pred"].tolist() == [3, 7, 5]
    # the logits are those of the matched prompt, forced (training path, no gradient needed)
    for b, slot in enumerate([3, 7, 5]):
        m.begin_task(Task(slot, 10, 0, 6, list(range(0, 11))))
        m.train()
        with torch.no_grad():
            forced = m(x[b : b + 1], query=q[b : b + 1])
        m.eval()
        assert torch.allclose(forced.logits, out.logits[b : b + 1], atol=1e-5)


@pytest.mark.parametrize("variant,g_cols,e_cols", [("dualprompt", 5, 5), ("coda", 3, 10)])
def test_zeroed_prompts_equal_reference_with_zero_columns(micro_backbone, variant, g_cols, e_cols):
    """Zero prompts are zero-key / zero-value prefix columns: logit 0, so they take softmax mass
    and the [CLS] feature equals the hand-written forward with those columns, not the plain one."""
    m = make(micro_backbone, variant=variant, init="zero").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feat = m(x).features
        expected = reference_forward(micro_backbone.vit, x, prefix_len={0: g_cols, 1: g_cols, 2: e_cols, 3: e_cols,
                                                                       4: e_cols})[:, 0]
    assert torch.allclose(feat, expected, atol=1e-5)
    assert (feat - micro_backbone.query(x)).abs().max() > 1e-3


def test_shared_pool_copies_the_previous_task_prompt(micro_backbone):
    m = make(micro_backbone)
    before = m.e_prompt.detach().clone()
    m.begin_task(TASKS[0])
    assert torch.equal(m.e_prompt.detach(), before)
    m.begin_task(TASKS[1])
    assert torch.equal(m.e_prompt.detach()[:, 1], before[:, 0])
    assert torch.equal(m.e_prompt.detach()[:, 2:], before[:, 2:])
    coda = make(micro_backbone, variant="coda")  # CODA has no copy
    before = coda.e_prompt.detach().clone()
    coda.begin_task(TASKS[1])
    assert torch.equal(coda.e_prompt.detach(), before)


def test_reshape_quirk_gives_half_the_batch_keys_and_half_values(micro_backbone):
    """dualprompt-pytorch#8: (2, B, L, D) read as (B, 2, L, D). With one prompt for the whole batch
    of 4, samples 0-1 get its key tokens as key *and* value prefix, samples 2-3 its value tokens."""
    m = make(micro_backbone, reshape_quirk=True)
    idx = torch.full((4, 1), 6)
    p = m._e_prefix(0, idx)
    k_tokens, v_tokens = m.e_prompt[0, 6, :5].detach(), m.e_prompt[0, 6, 5:].detach()
    heads = lambda t: t.reshape(5, 4, 16).transpose(0, 1)  # noqa: E731  (H=4, d_h=16)
    for b, tokens in enumerate([k_tokens, k_tokens, v_tokens, v_tokens]):
        assert torch.equal(p.key[b].detach(), heads(tokens))
        assert torch.equal(p.value[b].detach(), heads(tokens))


def test_used_and_trainable_parameters_leave_out_other_tasks_slots(micro_backbone):
    m = make(micro_backbone, num_classes=6)  # G 2x(5+5)xD, E 3x10x(5+5)xD, keys 10xD, head
    total = 2 * 10 * D + 3 * 10 * 10 * D + 10 * D + (D * 6 + 6)
    assert sum(p.numel() for p in m.method_parameters()) == total
    m.begin_task(TASKS[1])
    assert m.used_parameters() == total - 8 * 3 * 10 * D  # slots 2..9 of the 3 E-layers unused
    # training touches G, E-slot 1 of every E-layer, key 1 and the head
    assert m.trainable_parameters() == 2 * 10 * D + 3 * 10 * D + D + (D * 6 + 6)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        resolve_config("dualprompt", "synthetic", "quick", {"method": {"variant": "jax"}})
    with pytest.raises(ConfigError):
        resolve_config("dualprompt", "synthetic", "quick", {"method": {"g_layers": [0, 2]}})


# --- ViT-B/16 parameter counts ------------------------------------------------------------------

def test_vit_b_added_parameters_equal_reference_configs():
    from benchmarks.cost.engine import parameter_counts
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):  # counting needs shapes only: no weights, no download
        vit_b = PromptedViT(build_model("vit_base_patch16_224"))

    def added(preset: str, bench: str, classes: int) -> int:
        cfg = resolve_config("dualprompt", bench, preset)
        with torch.device("meta"):
            return parameter_counts(create_method("dualprompt", vit_b, classes, cfg.method))["added_params"]

    d = 768
    head = lambda c: d * c + c  # noqa: E731
    # dualprompt-pytorch: G 2 layers x 2 (K,V) x 5 x D; E 3 layers x 2 x pool 10 x L x D; 10 keys
    g = 2 * 2 * 5 * d
    cifar = g + 3 * 2 * 10 * 5 * d + 10 * d + head(100)
    imr = g + 3 * 2 * 10 * 20 * d + 10 * d + head(200)
    assert (cifar, imr) == (330_340, 1_098_440)  # baselines.md §5
    assert added("paper", "cifar100", 100) == cifar
    assert added("paper", "imagenet_r", 200) == imr
    # CODA (--prompt_param 10 20 6): G 2 x 6 x D; E 3 x 10 x 20 x D; a key set of 10 per E-layer
    coda = 2 * 6 * d + 3 * 10 * 20 * d + 3 * 10 * d
    assert (coda + head(100), coda + head(200)) == (569_956, 646_856)
    assert added("coda", "cifar100", 100) == coda + head(100)
    assert added("coda", "imagenet_r", 200) == coda + head(200)


# --- end to end ---------------------------------------------------------------------------------

def test_tiny_run_records_matrix_selection_and_task_identity(tiny_run):
    res = tiny_run("dualprompt", {"method": {"variant": "coda", "pool_size": 3, "e_length": 4, "g_length": 2}})
    acc = np.array(res["acc_matrix"], dtype=float)
    assert acc.shape == (3, 3)
    assert not np.isnan(acc[np.tril_indices(3)]).any() and np.isnan(acc[np.triu_indices(3, 1)]).all()
    tii = np.array(res["tii_matrix"], dtype=float)
    assert not np.isnan(tii[np.tril_indices(3)]).any() and ((tii >= 0) & (tii <= 100))[np.tril_indices(3)].all()
    hist = res["diagnostics"]["selection_hist"]
    assert res["diagnostics"]["selection_size"] == 3
    for j in ("0", "1", "2"):
        h = np.array(hist["final"][j])
        assert h.shape == (3, 3) and (h.sum(1) == 12).all()  # per E-layer key set; 12 test images
    # task-identity accuracy of task j after the last task = share of its images whose first
    # key set picked slot j, which the histogram records independently
    for j in range(3):
        assert tii[2, j] == pytest.approx(100.0 * hist["final"][str(j)][0][j] / 12)
