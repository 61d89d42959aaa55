"""SMoPE: sparse routing, proxy-score attention, noise, losses, usage state, size, end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.config import ConfigError
from methods.base import Task
from methods.smope import SMoPE, proto_loss, router_loss
from methods.vit import prefix_attention


def make(backbone, num_classes=6, **cfg):
    c = SMoPE.Config(**cfg)
    return SMoPE(backbone, num_classes, c)


def task(i, n=2, per=3):
    offs = [k * per for k in range(n + 1)]
    return Task(i, n, i * per, (i + 1) * per, offs)


def selection(m, x, **kw):
    return m(x, **kw).diagnostics["selection"]


def test_exactly_k_experts_per_sample_and_head(micro_backbone):
    m = make(micro_backbone).eval()
    x = torch.randn(3, 3, 32, 32)
    router = m.router()
    seen = {}

    def spy(layer, q):
        p = router(layer, q)
        seen[layer] = p
        return p

    spy.layers = router.layers
    m.backbone(x, prefix=spy)
    b, h, k = 3, micro_backbone.num_heads, 5
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    for layer, p in seen.items():
        assert p.key is None  # zero keys: the prompt logits come from the bias alone
        assert p.value.shape == (b, h, k, micro_backbone.head_dim)
        assert p.bias.shape == (b, h, 1, k)  # one row, broadcast over the N query rows
        sel = router.selected[layer]
        assert sel.shape == (b, h, k)
        assert all(len(set(row.tolist())) == k for row in sel.reshape(-1, k))
        # the selection is the top-K of the raw proxy scores (no noise outside training)
        assert torch.equal(sel.sort(-1).values, router.scores[layer].topk(k, -1).indices.sort(-1).values)
    assert router.selection().shape == (b, 6, h, k)


def test_only_selected_values_and_keys_receive_gradient(micro_backbone):
    m = make(micro_backbone, router_loss=False).train()
    m.begin_task(task(0))
    x = torch.randn(1, 3, 32, 32)
    out = m(x)
    assert out.aux_loss is None  # task 0, router loss off
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    sel = out.diagnostics["selection"][0]  # (L, H, K)
    mask = torch.zeros(6, micro_backbone.num_heads, 25, dtype=torch.bool).scatter(-1, sel, True)
    assert torch.equal(m.values.grad.abs().sum(-1) > 0, mask)
    assert torch.equal(m.keys.grad.abs().sum(-1) > 0, mask)  # through the prompt-logit bias only
    # the router loss reaches every key (softmax over all experts), still no other value
    m.zero_grad()
    m2 = make(micro_backbone, alpha_router=1.0).train()
    m2.begin_task(task(0))
    out = m2(x)
    out.aux_loss.backward()
    assert bool((m2.keys.grad.abs().sum(-1) > 0).all())


def test_proxy_score_attention_equals_explicit_softmax_over_prompt_and_token_logits(micro_backbone):
    torch.manual_seed(3)
    m = make(micro_backbone, eps=1.0).eval()  # ε = 1: a flagged expert drops to at most the minimum
    attn = micro_backbone.vit.blocks[0].attn
    b, n, d = 2, micro_backbone.num_tokens, micro_backbone.embed_dim
    h, dh = micro_backbone.num_heads, micro_backbone.head_dim
    x = torch.randn(b, n, d)

    def reference(idx=None):
        qkv = x @ attn.qkv.weight.T + attn.qkv.bias
        q, k, v = (t.reshape(b, n, h, dh).transpose(1, 2) for t in qkv.split(d, dim=-1))
        qbar = q.mean(2)  # (B, H, dh)
        keys, values = m.keys[0], m.values[0]  # (H, E, dh)
        s = torch.stack([torch.stack([keys[j] @ qbar[i, j] for j in range(h)]) for i in range(b)])  # (B, H, E)
        if idx is None:
            idx = s.topk(5, -1).indices
        out = torch.zeros(b, h, n, dh)
        for i in range(b):
            for j in range(h):
                e = idx[i, j]
                prompt_logits = (s[i, j, e] / math.sqrt(dh)).expand(n, -1)  # same row for every token
                token_logits = q[i, j] @ k[i, j].T / math.sqrt(dh)
                a = torch.cat([prompt_logits, token_logits], dim=1).softmax(-1)
                out[i, j] = a @ torch.cat([values[j, e], v[i, j]])
        return out.transpose(1, 2).reshape(b, n, d) @ attn.proj.weight.T + attn.proj.bias

    with torch.no_grad():
        router = m.router()
        got = prefix_attention(attn, x, 0, router)
        assert (got - reference()).abs().max() < 1e-5
        # dense mode: every expert in the softmax
        got = prefix_attention(attn, x, 0, m.router(dense=True))
        assert (got - reference(torch.arange(25).expand(b, h, 25))).abs().max() < 1e-5
        # training noise: changes the chosen experts, never their logits (raw scores)
        m.begin_task(task(1))
        m.frequent.zero_()  # (all-zero counters flag every expert, a uniform shift)
        m.frequent[0, :, :10] = True
        m.train()
        router = m.router()
        got = prefix_attention(attn, x, 0, router)
        assert (router.selected[0] >= 10).all()
        assert (got - reference(router.selected[0])).abs().max() < 1e-5


def test_noise_changes_selection_only_in_training_and_from_the_second_task(micro_backbone):
    m = make(micro_backbone, eps=1.0)  # ε = 1: a flagged expert drops to at most the minimum score
    x = torch.randn(1, 3, 32, 32)
    h = micro_backbone.num_heads
    m.begin_task(task(0))
    m.eval()
    with torch.no_grad():
        base = selection(m, x)
        # counters by hand: in layer 0 only the experts this sample uses were ever used; the other
        # layers used every expert once (all flagged, a uniform shift that changes no ranking)
        m.usage.fill_(1)
        m.usage[0] = 0
        for j in range(h):
            m.usage[0, j, base[0, 0, j]] = 7
        m.train()
        assert torch.equal(selection(m, x), base)  # task 0: no flags, no noise
        m.begin_task(task(1))
        expect = torch.ones(6, h, 25, dtype=torch.bool)
        expect[0] = m.usage[0] == 7  # threshold ΣF/#{F>0} = 7
        assert torch.equal(m.frequent, expect)
        noisy = selection(m, x)
        for j in range(h):
            assert not set(noisy[0, 0, j].tolist()) & set(base[0, 0, j].tolist())
        m.eval()
        assert torch.equal(selection(m, x), base)  # evaluation is never noised
        m.cfg.noise = False
        m.train()
        assert torch.equal(selection(m, x), base)  # the ablation switch


def test_usage_threshold_code_vs_paper_and_sticky_flags(micro_backbone):
    for mode, flagged in (("used", {0}), ("all", {0, 1})):
        m = make(micro_backbone, usage_threshold=mode)
        m.usage[0, 0, 0], m.usage[0, 0, 1] = 10, 2  # code: 12 / 2 used = 6; paper: 12 / 25 = 0.48
        m.begin_task(task(1))
        assert set(m.frequent[0, 0].nonzero().flatten().tolist()) == flagged
        m.usage[0, 0, 1] = 100  # expert 0 is now below the threshold, but flags are never cleared
        m.begin_task(task(2, n=3))
        assert bool(m.frequent[0, 0, 0]) and bool(m.frequent[0, 0, 1])


def test_ban_of_unused_experts_is_an_evaluation_option(micro_backbone):
    x = torch.randn(2, 3, 32, 32)
    for mode, banned in (("internal", False), ("always", True), ("never", False)):
        m = make(micro_backbone, ban_unused=mode).eval()
        with torch.no_grad():
            free = selection(m, x)
            m.usage[:, :, 5:10] = 1  # only experts 5..9 were ever selected
            sel = selection(m, x)
            if banned:
                assert torch.equal(sel.sort(-1).values, torch.arange(5, 10).expand_as(sel))
            else:
                assert torch.equal(sel, free)
            # the passes the reference runs on its live model (usage count, statistics) ban too
            inner = m(x, ban=m.internal_ban()).diagnostics["selection"]
            assert torch.equal(inner.sort(-1).values, torch.arange(5, 10).expand_as(sel)) == (mode != "never")


def test_dense_mode_uses_all_experts(micro_backbone):
    m = make(micro_backbone).train()
    m.begin_task(task(0))
    out = m(torch.randn(2, 3, 32, 32), dense=True)
    sel = out.diagnostics["selection"]
    assert sel.shape == (2, 6, micro_backbone.num_heads, 25)
    assert torch.equal(sel, torch.arange(25).expand_as(sel))
    assert out.aux_loss is None  # router loss off in dense mode, prototype loss off in task 0
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    assert bool((m.values.grad.abs().sum(-1) > 0).all())
    phases = m.phases(task(0))
    assert [p.name for p in phases] == ["dense_warmup", "train"]
    assert phases[0].forward_kwargs == {"dense": True} and phases[0].train == {"epochs": 10}
    assert [p.name for p in m.phases(task(1))] == ["train"]
    assert [p.name for p in make(micro_backbone, dense_warmup=False).phases(task(0))] == ["train"]


def test_router_loss_equals_hand_computation():
    s = torch.tensor([[[1.0, 0.5, -0.2, 0.3]], [[0.1, 0.9, 0.4, -0.5]]])  # (B=2, H=1, E=4)
    sel = torch.tensor([[[0, 1]], [[1, 2]]])
    eps = 0.5
    total = 0.0
    for b in range(2):
        row = s[b, 0].tolist()
        chosen = sel[b, 0].tolist()
        margin = eps * (max(row) - min(row))
        z = [v + (0.0 if i in chosen else margin) for i, v in enumerate(row)]
        lse = math.log(sum(math.exp(v) for v in z))
        total += sum(lse - z[j] for j in chosen) / 2  # mean over the batch of 2
    assert router_loss(s, sel, eps).item() == pytest.approx(total, rel=1e-6)
    # without the margin it is the plain sum of cross-entropies
    plain = sum(F.cross_entropy(s[:, 0], sel[:, 0, i]) for i in range(2))
    assert router_loss(s, sel, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_proto_loss_equals_hand_computation():
    old = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]]])  # (H=1, E=3, d=2)
    cur = torch.tensor([[[1.0, 0.5], [0.2, 1.0], [0.5, 0.5]]])
    flags = torch.tensor([[True, False, True]])

    def nll(p, target):
        logits = [sum(a * b for a, b in zip(p, c)) for c in cur[0].tolist()]
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    # prototype 0 = (1, 0): old logits (1, 0, 1) -> K_p = {0, 2}; prototype 2 = (1, .5): (1, .5, 1.25) -> {2, 0}
    p0, p2 = [1.0, 0.0], [1.0, 0.5]
    expect = ((nll(p0, 0) + nll(p0, 2)) + (nll(p2, 2) + nll(p2, 0))) / 2
    assert proto_loss(old, cur, flags, 2).item() == pytest.approx(expect, rel=1e-6)
    assert proto_loss(old, cur, torch.zeros_like(flags), 2).item() == 0.0
    # only the current keys get gradient
    c = cur.clone().requires_grad_(True)
    proto_loss(old, c, flags, 2).backward()
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_proto_loss_uses_the_snapshot_from_the_task_start(micro_backbone):
    m = make(micro_backbone, alpha_router=0.0, alpha_proto=1.0)
    m.usage.fill_(1)
    m.begin_task(task(1))
    with torch.no_grad():
        m.keys.add_(0.3 * torch.randn_like(m.keys))  # the keys moved during the task
    m.train()
    aux = m(torch.randn(1, 3, 32, 32)).aux_loss
    expect = sum(proto_loss(m.old_keys[i], m.keys[i], m.frequent[i], 5) for i in range(6))
    assert aux.item() == pytest.approx(expect.item(), rel=1e-6)
    assert not torch.equal(m.old_keys, m.keys)


def test_usage_counts_and_flags_survive_a_checkpoint_round_trip(micro_backbone):
    m = make(micro_backbone)
    m.usage.copy_(torch.randint(0, 50, m.usage.shape))
    m.frequent.copy_(torch.rand(m.frequent.shape) > 0.5)
    m.stats.add(0, torch.randn(10, micro_backbone.embed_dim))
    m.begin_task(task(1))  # snapshots the keys for the prototype loss
    m.alignment_log.append({"task": 1, "iterations": 3, "last_loss": 0.5})
    state = m.checkpoint_state()
    assert not any(k.startswith("backbone.") for k in state)
    m2 = make(micro_backbone)
    m2.begin_task(task(0))  # the runner replays begin_task on a fresh method, then loads
    m2.begin_task(task(1))
    m2.load_checkpoint_state(state)
    assert torch.equal(m2.usage, m.usage) and torch.equal(m2.frequent, m.frequent)
    assert torch.equal(m2.old_keys, m.keys) and m2.alignment_log == m.alignment_log
    assert torch.equal(m2.keys, m.keys) and torch.equal(m2.values, m.values)
    assert torch.equal(m2.stats.means[0], m.stats.means[0])
    d = micro_backbone.embed_dim
    assert m.state_numbers() == {"usage_counters": 6 * 4 * 25, "usage_flags": 6 * 4 * 25, "class_statistics": 2 * d,
                                 "old_key_snapshot": 6 * 4 * 25 * micro_backbone.head_dim}


def test_config_errors_are_one_sentence(micro_backbone):
    with pytest.raises(ConfigError, match="exceeds"):
        make(micro_backbone, topk=30)
    with pytest.raises(ConfigError, match="more than 7 blocks"):
        make(micro_backbone, layers=[0, 7])
    with pytest.raises(ConfigError, match="usage_threshold"):
        make(micro_backbone, usage_threshold="median")


def test_vit_b16_added_parameters_match_the_reference_count():
    from methods.backbones import build_model
    from methods.vit import PromptedViT

    with torch.device("meta"):  # shapes only: no memory, no weight initialisation
        m = SMoPE(PromptedViT(build_model("vit_base_patch16_224")), 200, SMoPE.Config())
    assert (m.backbone.depth, m.backbone.num_heads, m.backbone.head_dim, m.backbone.embed_dim) == (12, 12, 64, 768)
    layers, experts, heads, head_dim, width, classes = 6, 25, 12, 64, 768, 200
    prompt = layers * experts * heads * 2 * head_dim  # one key and one value per (layer, expert, head)
    head = width * classes + classes
    assert prompt == 230_400 and prompt + head == 384_200  # the poster's 0.38 M
    assert sum(p.numel() for p in m.method_parameters()) == prompt + head
    assert m.keys.numel() + m.values.numel() == prompt
    assert m.uses_query is False


def test_tiny_end_to_end_run(tiny_run):
    res = tiny_run("smope", {"method": {"warmup_epochs": 1, "ca_epochs": 2}})
    acc = res["acc_matrix"]
    assert len(acc) == 3 and all(len(r) == 3 for r in acc)
    for t in range(3):
        for j in range(3):
            assert (acc[t][j] is None) == (j > t)
            if j <= t:
                assert 0.0 <= acc[t][j] <= 100.0
    diag = res["diagnostics"]
    assert diag["selection_size"] == 25
    hist = diag["selection_hist"]
    # per test task: 2 classes × 6 images, K = 5 experts per layer and head
    for j in range(3):
        h = torch.tensor(hist["final"][str(j)])
        assert h.shape == (6, 4, 25)
        assert bool((h.sum(-1) == 2 * 6 * 5).all())
    assert sorted(hist["diagonal"]) == ["0", "1", "2"]
    usage = torch.tensor(diag["method"]["usage_counts"])
    assert bool((usage.sum(-1) == 3 * 2 * 12 * 5).all())  # every training image of 3 tasks, K each
    assert [a["task"] for a in diag["method"]["alignment"]] == [1, 2]
    assert res["cost"]["added_params"] == 6 * 25 * 4 * 2 * 16 + 64 * 6 + 6
    assert res["cost"]["query_pass"] is False


def test_dense_ablation_topk_0_matches_the_reference(micro_backbone):
    """Reference with K = prompt_param[1] = 0 (models/zoo.py, learners/prompt.py @ 27b982c):
    learn_batch still runs the dense warm-up in task 0 (no K test there); router_loss's first
    block needs topk > 0; its prototype block sums ``for i in range(self.topk)`` -> no term;
    update_prompt counts nothing. So in task 1 the only loss is the CE: aux_loss is None."""
    m = make(micro_backbone, topk=0, alpha_router=1.0, alpha_proto=1.0)
    phases = m.phases(task(0))
    assert [p.name for p in phases] == ["dense_warmup", "train"] and phases[0].train == {"epochs": 10}
    m.usage.fill_(3)
    m.begin_task(task(1))
    assert bool(m.frequent.all())
    with torch.no_grad():
        m.keys.add_(0.3 * torch.randn_like(m.keys))  # would give a non-zero prototype loss for K >= 1
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    assert out.aux_loss is None
    sel = out.diagnostics["selection"]
    assert torch.equal(sel, torch.arange(25).expand_as(sel))  # dense in the main phase too
    # the same model with K = 1 does have the prototype term
    m1 = make(micro_backbone, topk=1, alpha_router=0.0, alpha_proto=1.0)
    m1.usage.fill_(3)
    m1.begin_task(task(1))
    with torch.no_grad():
        m1.keys.add_(0.3 * torch.randn_like(m1.keys))
    assert m1.train()(torch.randn(2, 3, 32, 32)).aux_loss.item() > 0
