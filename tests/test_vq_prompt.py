"""VQ-Prompt: key weights, quantisation, straight-through gradient, losses, training set-up, size.

Expected values are derived here independently: explicit loops and closed forms on small
hand-made tensors, an explicit re-computation of the prompt path from the method's parameters,
and the reference configuration's arithmetic for the ViT-B/16 parameter count
(jiaolifengmi/VQ-Prompt ``--prompt_param 10 8 τ``, ``models/zoo.py::VQPrompt``). The checks every
method gets (two tasks, determinism, checkpoint, cost, batch size) are in test_conformance.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.config import ConfigError, TrainConfig
from benchmarks.run.protocol import build_optimizer
from methods.base import Task
from methods.vq_prompt import VQPrompt, nearest_prompt, prompt_weights, straight_through, vq_loss


def make(backbone, classes=6, **cfg):
    return VQPrompt(backbone, classes, VQPrompt.Config(**cfg))


def task(i, n=2, per=3):
    return Task(i, n, i * per, (i + 1) * per, [k * per for k in range(n + 1)])


# --- the pieces on hand-made tensors ----------------------------------------------------------

def test_key_weights_are_a_softmax_of_query_times_normalised_keys():
    q = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    keys = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    tau = 2.0
    expected = torch.empty(2, 4)
    for b in range(2):
        logits = []
        for n in range(4):
            norm = math.sqrt(sum(float(v) ** 2 for v in keys[n]))
            logits.append(sum(float(q[b, d]) * float(keys[n, d]) / norm for d in range(3)) / tau)
        z = sum(math.exp(v) for v in logits)
        expected[b] = torch.tensor([math.exp(v) / z for v in logits])
    assert torch.allclose(prompt_weights(q, keys, tau), expected, atol=1e-6)
    # the query is not normalised: scaling it sharpens the weights (a cosine would not change)
    sharper = prompt_weights(3 * q, keys, tau)
    assert not torch.allclose(sharper, expected, atol=1e-3)
    assert sharper.max(1).values.gt(expected.max(1).values).all()
    # normalize_query: a true cosine similarity, invariant to the query's scale
    cos = F.cosine_similarity(q[:, None], keys[None], dim=-1)
    assert torch.allclose(prompt_weights(3 * q, keys, tau, normalize_query=True), torch.softmax(cos / tau, 1), atol=1e-6)


def test_quantisation_picks_the_nearest_pool_element_over_all_tokens():
    # pool of 3 elements, 2 tokens × 2 numbers
    pool = torch.tensor([[[0.0, 0.0], [0.0, 0.0]],
                         [[1.0, 0.0], [5.0, 5.0]],
                         [[4.0, 0.0], [1.0, 1.0]]])
    cont = torch.tensor([[[1.0, 0.0], [4.0, 4.0]],    # element 1 exactly in token 0, close in token 1
                         [[1.1, 0.0], [1.0, 1.0]],    # token 0 nearest to element 1, token 1 equal to element 2, yet 0 wins
                         [[2.0, 0.0], [0.5, 0.5]]])   # d² to 0: 4+0.5=4.5, to 1: 1+40.5, to 2: 4+0.5 -> tie 0/2
    # squared distances by hand: row 1 -> [1.21+2, 0.01+32, 8.41+0] = [3.21, 32.01, 8.41]
    assert nearest_prompt(cont, pool).tolist() == [1, 0, 0]
    cont[1] = torch.tensor([[3.5, 0.0], [1.0, 1.0]])  # d² = [12.25+2, 6.25+32, 0.25] -> element 2
    assert nearest_prompt(cont, pool).tolist()[1] == 2
    # ties go to the first index (torch.min / argmin, as the reference's .min(1))
    assert nearest_prompt(cont[2:], pool).item() == 0


def test_straight_through_forwards_the_codeword_and_passes_the_gradient_to_the_continuous_prompt():
    cont = torch.tensor([[[0.2, -1.0], [3.0, 0.5]]], requires_grad=True)
    code = torch.tensor([[[0.0, -1.5], [2.0, 1.0]]], requires_grad=True)
    out = straight_through(cont, code)
    assert torch.allclose(out, code, atol=1e-6)  # the quantised value goes forward
    w = torch.tensor([[[1.0, 2.0], [-3.0, 4.0]]])
    (out * w).sum().backward()
    assert torch.equal(cont.grad, w)  # identity gradient to p'
    assert code.grad is None or code.grad.abs().sum() == 0  # none to the codeword through this path


def test_vq_loss_equals_the_weighted_mean_squared_errors_and_routes_gradients():
    c = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], requires_grad=True)
    p = torch.tensor([[[0.5, 2.0], [1.0, 1.0]]], requires_grad=True)
    loss = vq_loss(c, p, vq_coef=0.4, commit_coef=0.1)
    sq = (0.5 ** 2 + 0.0 + 1.0 + 2.0 ** 2) / 4  # mean squared difference = 1.3125
    assert loss.item() == pytest.approx(0.4 * sq + 0.1 * sq)
    loss.backward()
    diff = torch.tensor([[[0.5, 0.0], [-1.0, -2.0]]])  # c - p
    assert torch.allclose(c.grad, 0.4 * 2 * diff / 4)  # only the vq term reaches p'
    assert torch.allclose(p.grad, 0.1 * 2 * -diff / 4)  # only the commit term reaches the codeword


# --- the method on the micro ViT ------------------------------------------------------------

def explicit_layer(m, i, q):
    """Layer slot i's continuous prompt, chosen index and quantised prompt, by explicit sums."""
    keys, pool = m.keys[i].detach(), m.prompts[i].detach()
    khat = keys / keys.norm(dim=1, keepdim=True)
    alpha = torch.softmax(torch.stack([(q * khat[n]).sum(1) for n in range(len(keys))], 1) / m.cfg.temperature, 1)
    cont = sum(alpha[:, n, None, None] * pool[n] for n in range(len(pool)))
    d2 = torch.stack([((cont - pool[n]) ** 2).flatten(1).sum(1) for n in range(len(pool))], 1)
    idx = d2.argmin(1)
    return alpha, cont, idx, pool[idx]


def test_eval_prefixes_are_the_nearest_pool_elements_and_selection_reports_them(micro_backbone):
    torch.manual_seed(1)
    m = make(micro_backbone, temperature=3.0).eval()
    x = torch.rand(4, 3, 32, 32)
    q = micro_backbone.query(x)
    seen = {}
    fwd = micro_backbone.forward

    def spy(inp, prompt_tokens=None, prefix=None):
        seen.update(prefix)
        return fwd(inp, prompt_tokens, prefix)

    micro_backbone.forward = spy
    try:
        out = m(x)
    finally:
        del micro_backbone.forward
    assert sorted(seen) == [0, 1, 2, 3, 4] and out.aux_loss is None
    sel = out.diagnostics["selection"]
    assert sel.shape == (4, 5, 1)
    h, dh = micro_backbone.num_heads, micro_backbone.head_dim
    for i, layer in enumerate([0, 1, 2, 3, 4]):
        _, _, idx, quant = explicit_layer(m, i, q)
        assert torch.equal(sel[:, i, 0], idx)
        # first 4 tokens -> key prefix, last 4 -> value prefix, split into heads
        key = quant[:, :4].reshape(4, 4, h, dh).transpose(1, 2)
        value = quant[:, 4:].reshape(4, 4, h, dh).transpose(1, 2)
        assert torch.allclose(seen[layer].key, key, atol=1e-5)
        assert torch.allclose(seen[layer].value, value, atol=1e-5)


def test_training_loss_and_straight_through_gradients_match_an_explicit_computation(micro_backbone):
    torch.manual_seed(2)
    m = make(micro_backbone).train()
    m.begin_task(task(0))
    x = torch.rand(3, 3, 32, 32)
    q = micro_backbone.query(x)
    out = m(x, query=q)
    # aux loss = Σ_layers (0.4 + 0.1) · mean((p' − P_j)²)
    expected = sum(0.5 * ((c - p) ** 2).mean() for _, c, _, p in (explicit_layer(m, i, q) for i in range(5)))
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # straight-through: the task gradient of layer slot 0 reaches every pool element by α-weights
    # and the keys through α (explicit re-computation with its own autograd graph)
    m.zero_grad()
    upstream = torch.randn(3, 8, micro_backbone.embed_dim)
    tokens, idx, _ = m.layer_prompt(0, q)
    (tokens * upstream).sum().backward()
    alpha, _, _, _ = explicit_layer(m, 0, q)
    expected_pool = torch.einsum("bn,bld->nld", alpha, upstream)
    assert torch.allclose(m.prompts.grad[0], expected_pool, atol=1e-5)
    assert m.prompts.grad[1:].abs().sum() == 0 and m.keys.grad[1:].abs().sum() == 0
    keys = m.keys[0].detach().clone().requires_grad_(True)
    khat = keys / keys.norm(dim=1, keepdim=True)
    a = torch.softmax(torch.stack([(q * khat[n]).sum(1) for n in range(10)], 1), 1)
    cont = sum(a[:, n, None, None] * m.prompts[0, n].detach() for n in range(10))
    (cont * upstream).sum().backward()
    assert torch.allclose(m.keys.grad[0], keys.grad, atol=1e-5)
    assert keys.grad.abs().sum() > 0

    # the full loss trains every key and every pool element of every layer (nothing frozen)
    m2 = make(micro_backbone).train()
    m2.begin_task(task(1))
    o = m2(x, query=q)
    (F.cross_entropy(o.logits, torch.tensor([3, 4, 5])) + o.aux_loss).backward()
    assert (m2.prompts.grad.flatten(2).abs().sum(-1) > 0).all()
    assert (m2.keys.grad.abs().sum(-1) > 0).all()


def test_prompts_train_at_five_times_the_head_lr_and_nothing_is_frozen_between_tasks(micro_backbone):
    m = make(micro_backbone)
    for t in (0, 1):
        m.begin_task(task(t))
        assert m.keys.requires_grad and m.prompts.requires_grad
        opt = build_optimizer(m.param_groups(), TrainConfig(optimizer="adamw", lr=0.0025))
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs == {"prompt": pytest.approx(0.0125), "head": pytest.approx(0.0025)}
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 5 * (10 * 8 * 64 + 10 * 64) + 64 * 6 + 6
    assert m.selection_size == 10


def test_uniform_initialisation_and_bad_settings(micro_backbone):
    m = make(micro_backbone)
    for p in (m.keys.detach(), m.prompts.detach()):
        assert 0.0 <= float(p.min()) and float(p.max()) < 1.0 and p.std() > 0.2  # U[0,1): std 0.289
    for bad in ({"prompt_length": 7}, {"temperature": 0.0}, {"layers": [0, 0]}, {"vq_coef": -1.0},
                {"ca_batch_size_ratio": 0.0}):
        with pytest.raises(ConfigError):
            make(micro_backbone, **bad)
    with pytest.raises(ConfigError):
        make(micro_backbone, layers=[0, 6])  # the micro ViT has 6 blocks


def test_classifier_alignment_runs_after_the_second_task_with_the_reference_iteration_count(tiny_run):
    r = tiny_run("vq_prompt", {"benchmark": {"num_tasks": 2}, "method": {"ca_epochs": 4, "ca_batch_size_ratio": 0.5}})
    log = r["diagnostics"]["method"]["alignment"]
    # after task 1 only: (classes of earlier tasks = 3) batches per epoch, of batch 8 × 0.5 = 4
    # draws per class (6 classes × 4 = 24 draws >= 3 batches of 4), for 4 epochs
    assert [e["task"] for e in log] == [1] and log[0]["iterations"] == 3 * 4
    # class statistics of all 6 classes: 1 centroid × (mean + variance) × width 64
    assert r["cost"]["state_by_kind"] == {"class_statistics": 6 * 2 * 64}


def test_vit_b16_added_parameters_match_the_reference_configuration_and_the_poster():
    import timm

    from benchmarks.cost.engine import parameter_counts
    from methods.vit import PromptedViT

    with torch.device("meta"):  # shapes only: no weights are allocated or drawn
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        heads = {c: VQPrompt(PromptedViT(vit), c, VQPrompt.Config()) for c in (100, 200)}
    d, n, length, layers = 768, 10, 8, 5  # --prompt_param 10 8 τ, e_layers [0..4], key_dim 768
    prompts = layers * (n * length * d + n * d)  # e_p_l (10, 8, 768) + e_k_l (10, 768) per layer
    assert prompts == 345_600
    for c, m in heads.items():
        assert parameter_counts(m)["added_params"] == prompts + d * c + c
    # the SMoPE poster's 0.50 M is the 200-class (ImageNet-R / CUB-200) configuration: 499,400;
    # CIFAR-100's 100-class head gives 422,500 (0.42 M)
    assert parameter_counts(heads[200])["added_params"] == 499_400
    assert round(499_400 / 1e6, 2) == 0.50
