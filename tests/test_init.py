"""Initialisation of every trainable tensor, per method and preset, against its reference.

Expected distributions, from the authors' code:
* l2p-pytorch / dualprompt-pytorch (prompt.py, vision_transformer.py): prompts, G-/E-prompts and
  keys ``nn.init.uniform_(p, -1, 1)``; the head is an ``nn.Linear`` built inside their
  VisionTransformer, whose ``init_weights('')`` applies timm's ``init_weights_vit_timm`` to every
  Linear: ``trunc_normal_(std=.02)`` weight, zero bias; the head is not in the checkpoint.
* CODA-Prompt models/zoo.py (L2P++ / DualPrompt reimplementations, CODA-P), SMoPE, VQ-Prompt:
  ``tensor_prompt`` = ``nn.init.uniform_`` = U[0, 1) (CODA-P: orthonormal rows); the head
  ``self.last = nn.Linear(768, C)`` keeps PyTorch's init: weight and bias U(-1/√D, 1/√D).
* HiDe-Prompt: prompts U(-1, 1); its head, TII head and MLP are Linear layers of its
  VisionTransformer / MlpMapping: trunc_normal(.02), zero bias.
None of them re-initialises a head, prompt or key at a task boundary (CODA-P initialises the new
task's slice, which nothing used before).
"""
import math

import pytest
import torch

from benchmarks.config import resolve_config
from methods.base import Task
from methods.registry import create_method

C = 100


def build(method, preset, backbone, **over):
    cfg = resolve_config(method, "cifar100", preset, {"method": over} if over else None)
    torch.manual_seed(0)
    return create_method(method, backbone, C, cfg.method, num_tasks=10)


def uniform(t, low, high):
    t = t.detach().double().flatten()
    assert float(t.min()) >= low and float(t.max()) < high
    assert float(t.mean()) == pytest.approx((low + high) / 2, abs=0.05 * (high - low))
    assert float(t.std()) == pytest.approx((high - low) / math.sqrt(12), rel=0.05)


def timm_linear(lin):
    # trunc_normal_(std .02) truncated at ±2 (absolute): no cut at this std
    assert float(lin.weight.detach().double().std()) == pytest.approx(0.02, rel=0.05)
    assert float(lin.weight.detach().double().mean()) == pytest.approx(0.0, abs=0.002)
    assert torch.count_nonzero(lin.bias) == 0


def torch_linear(lin):
    bound = 1 / math.sqrt(lin.in_features)
    uniform(lin.weight, -bound, bound)
    assert float(lin.bias.detach().abs().max()) < bound and torch.count_nonzero(lin.bias) == lin.out_features


def test_l2p_paper_port_init(micro_backbone):
    m = build("l2p", "paper", micro_backbone)
    for p in list(m.prompts) + list(m.keys):
        uniform(p, -1.0, 1.0)
    timm_linear(m.head)


def test_l2p_coda_reimplementation_init(micro_backbone):
    m = build("l2p", "coda", micro_backbone)
    for p in list(m.prompts) + list(m.keys):
        uniform(p, 0.0, 1.0)
    torch_linear(m.head)


def test_dualprompt_paper_port_init(micro_backbone):
    m = build("dualprompt", "paper", micro_backbone)
    for p in (m.e_prompt, m.g_prompt, m.keys):
        uniform(p, -1.0, 1.0)
    timm_linear(m.head)


def test_dualprompt_coda_reimplementation_init(micro_backbone):
    m = build("dualprompt", "coda", micro_backbone)
    for p in (m.e_prompt, m.g_prompt, m.keys):
        uniform(p, 0.0, 1.0)
    torch_linear(m.head)


def test_hide_prompt_init(micro_backbone):
    m = build("hide_prompt", "paper", micro_backbone)
    for p in m.prompts:
        uniform(p, -1.0, 1.0)
    for lin in [m.head, m.tii_head] + [x for x in m.tii_mlp.modules() if isinstance(x, torch.nn.Linear)]:
        timm_linear(lin)


def test_smope_and_vq_prompt_init(micro_backbone):
    s = build("smope", "paper", micro_backbone)
    uniform(s.keys, 0.0, 1.0)
    uniform(s.values, 0.0, 1.0)
    torch_linear(s.head)
    v = build("vq_prompt", "paper", micro_backbone)
    uniform(v.keys, 0.0, 1.0)
    uniform(v.prompts, 0.0, 1.0)
    torch_linear(v.head)


def test_coda_prompt_head_and_first_slice(micro_backbone):
    m = build("coda_prompt", "coda", micro_backbone, pool_size=30)
    torch_linear(m.head)
    pool = next(iter(m.pools.values()))
    k = pool.k[0].detach().double()
    assert torch.allclose(k @ k.T, torch.eye(k.shape[0], dtype=k.dtype), atol=1e-6)  # orthonormal rows


@pytest.mark.parametrize("method,preset", [("l2p", "paper"), ("l2p", "coda"), ("dualprompt", "paper"),
                                           ("dualprompt", "coda"), ("smope", "paper"), ("vq_prompt", "paper"),
                                           ("hide_prompt", "paper")])
def test_no_head_or_key_is_reinitialised_at_a_task_boundary(micro_backbone, method, preset):
    m = build(method, preset, micro_backbone)
    offs = list(range(0, C + 1, 10))
    m.begin_task(Task(0, 10, 0, 10, offs))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if "backbone" not in n}
    m.begin_task(Task(1, 10, 10, 20, offs))
    after = dict(m.named_parameters())
    for n, p in before.items():
        if n.startswith("head") or "key" in n or n.startswith("tii"):
            assert torch.equal(after[n].detach(), p), n
