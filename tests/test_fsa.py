"""APER and RanPAC on hand-made numbers: ridge algebra, λ choice, accumulation, prototype order."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.config import ConfigError
from methods.aper import APER, merged_prototype_logits
from methods.backbones import build_model
from methods.base import Task
from methods.ranpac import RanPAC, choose_ridge, random_features, ridge_readout
from methods.vit import PromptedViT


@pytest.fixture
def pv():
    torch.manual_seed(0)
    return PromptedViT(build_model("vit_micro_patch8_32"))


def _task(i, per=3, n=2):
    return Task(i, n, i * per, (i + 1) * per, [k * per for k in range(n + 1)])


class FakeCtx:
    """The two TaskContext members the methods use: seeded generators and features(fn)."""

    def __init__(self, images=None, labels=None, feats=None):
        self.images, self.labels, self.feats = images, labels, feats
        self.logs = []

    def generator(self, *parts):
        return torch.Generator().manual_seed(abs(hash(parts)) % (2 ** 31))

    def features(self, fn, transform="train"):
        assert transform == "test"  # both reference codes use the test transform for prototypes / G
        if self.feats is not None:
            return self.feats, self.labels
        with torch.no_grad():
            return fn(self.images), self.labels

    def log(self, msg):
        self.logs.append(msg)


# --- RanPAC --------------------------------------------------------------------------------

def test_ridge_readout_closed_form():
    G = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    Q = torch.tensor([[1.0], [0.0]])
    # (G + I)^-1 = [[3, -1], [-1, 3]] / 8, times Q = [3/8, -1/8]
    assert torch.allclose(ridge_readout(G, Q, 1.0), torch.tensor([[0.375, -0.125]]))


def test_choose_ridge_hand_derived():
    # 1-d features: fit rows h = 1 (4 rows, y = 1) -> Wo = 4 / (4 + λ); validation row h = 2, y = 1:
    # squared error (1 - 8 / (4 + λ))²: λ=1 -> 0.36, λ=10 -> (6/14)² = 0.184, λ=100 -> 0.852
    H = torch.tensor([[1.0], [1.0], [1.0], [1.0], [2.0]])
    Y = torch.ones(5, 1)
    assert choose_ridge(H, Y, [-1, 0, 1, 2, 3]) == 10.0
    assert choose_ridge(H, Y, [0, 2], fit_fraction=0.8) == 1.0  # (1-8/5)² = .36 < (1-8/104)² = .85


def test_random_features_relu_projection():
    f = torch.tensor([[1.0, -2.0]])
    w = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    assert torch.equal(random_features(f, w), torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.equal(random_features(f, None), f)


def test_ranpac_state_shapes_and_counts(pv):
    cfg = RanPAC.Config(M=50, bottleneck=8)
    m = RanPAC(pv, 6, cfg)
    assert m.w_rand.shape == (64, 50) and m.G.shape == (50, 50) and m.Q.shape == (50, 6) and m.Wo.shape == (6, 50)
    assert m.state_numbers() == {"gram_matrix": 2500, "class_feature_sums": 300, "ridge_readout": 300,
                                 "random_projection": 3200}
    assert RanPAC(pv, 6, RanPAC.Config(M=0, bottleneck=8)).G.shape == (64, 64)  # no RP: D×D
    assert RanPAC(pv, 6, RanPAC.Config(M=10, gram_dtype="float64")).G.dtype == torch.float64
    with pytest.raises(ConfigError):
        RanPAC.Config(gram_dtype="float16").validate()


def test_ranpac_accumulates_G_and_Q_over_tasks_and_solves(pv):
    m = RanPAC(pv, 6, RanPAC.Config(M=4, bottleneck=8, ridge_exponents=[-2, 0, 2]))
    torch.manual_seed(3)
    H1, y1 = torch.rand(10, 4), torch.tensor([0, 1, 2] * 3 + [0])
    H2, y2 = torch.rand(10, 4), torch.tensor([3, 4, 5] * 3 + [5])
    m.begin_task(_task(0))
    m.end_task(_task(0), FakeCtx(labels=y1, feats=H1))
    assert bool(m.projection_drawn) and m.w_rand.abs().sum() > 0
    m.begin_task(_task(1))
    m.end_task(_task(1), FakeCtx(labels=y2, feats=H2))
    H, Y = torch.cat([H1, H2]), F.one_hot(torch.cat([y1, y2]), 6).float()
    assert torch.allclose(m.G, H.T @ H, atol=1e-5)  # row order does not change the sums
    assert torch.allclose(m.Q, H.T @ Y, atol=1e-5)
    lam = m.ridges[-1]
    assert lam in (0.01, 1.0, 100.0)
    expected = torch.linalg.inv((H.T @ H).double() + lam * torch.eye(4, dtype=torch.float64)) @ (H.T @ Y).double()
    assert torch.allclose(m.Wo.double(), expected.T, atol=1e-4)
    # readout: plain linear in the projected features (no normalisation)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = F.relu(m.peft.features(x) @ m.w_rand)
        assert torch.allclose(m(x).logits, h @ m.Wo.T, atol=1e-5)


def test_ranpac_trains_task_one_only(pv):
    m = RanPAC(pv, 6, RanPAC.Config(M=8, bottleneck=8))
    m.begin_task(_task(0))
    assert [p.name for p in m.phases(_task(0))] == ["adapt"]
    n_adapter = 6 * (64 * 8 + 8 + 8 * 64 + 64)
    assert sum(p.numel() for g in m.param_groups() for p in g["params"]) == n_adapter + 3 * 64 + 1  # + head, σ
    m.begin_task(_task(1))
    assert m.phases(_task(1)) == [] and not any(p.requires_grad for p in m.parameters())


# --- APER ----------------------------------------------------------------------------------

def test_aper_prototypes_are_frozen_then_adapted_means(pv):
    m = APER(pv, 6, APER.Config(bottleneck=8)).eval()
    with torch.no_grad():
        for a in m.peft.adapters:
            a.up.weight.normal_(0, 0.3)
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    m.begin_task(_task(0))
    m.end_task(_task(0), FakeCtx(images=x, labels=y))
    with torch.no_grad():
        frozen = pv.vit.forward_features(x)[:, 0]  # timm's own pass: the PTM branch
        adapted = m.peft.features(x)
    d = pv.embed_dim
    assert (adapted - frozen).abs().max() > 1e-3
    for c in range(3):
        assert torch.allclose(m.prototypes[c, :d], frozen[y == c].mean(0), atol=1e-5)  # PTM first
        assert torch.allclose(m.prototypes[c, d:], adapted[y == c].mean(0), atol=1e-5)
    assert m.prototypes[3:].abs().sum() == 0


def test_aper_one_norm_over_both_halves():
    # feature [3, 4 | 0, 0] (norm 5) against prototypes [1, 0 | 0, 0] and [0, 0 | 0, 1]
    feat = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(merged_prototype_logits(feat, protos), torch.tensor([[0.6, 0.0, 0.0]]))
    # per-half normalisation would differ: a large PTM half dominates the joint cosine
    big = torch.tensor([[30.0, 40.0, 0.0, 1.0]])
    out = merged_prototype_logits(big, protos)
    assert math.isclose(float(out[0, 1]), 1.0 / math.sqrt(2501.0), rel_tol=1e-5)


def test_aper_variants_and_phases(pv):
    for petl, n in [("ssf", 2 * (64 + 6 * 11 * 64 + 64)), ("vpt_deep", 6 * 5 * 64), ("vpt_shallow", 5 * 64)]:
        m = APER(pv, 6, APER.Config(petl=petl))
        assert sum(p.numel() for p in m.peft.parameters()) == n
    m = APER(pv, 6, APER.Config(bottleneck=8))
    m.begin_task(_task(0))
    assert [p.name for p in m.phases(_task(0))] == ["adapt"] and m.phases(_task(1)) == []
    assert m.uses_query  # the frozen branch is the protocol's cached query pass
    with pytest.raises(ConfigError):
        APER.Config(petl="lora").validate()


# --- SLCA ----------------------------------------------------------------------------------

from methods.slca import SLCA, logit_norm_loss, shrunk_mean  # noqa: E402


def test_slca_shrunk_mean_and_logit_norm_loss_by_hand():
    mu = torch.full((3,), 10.0)
    assert torch.allclose(shrunk_mean(mu, 0, 1), torch.full((3,), 9.5))  # 0.9 + 0.1·1/2
    assert torch.allclose(shrunk_mean(mu, 1, 1), mu)  # the current task: unchanged
    assert torch.allclose(shrunk_mean(mu, 0, 3), torch.full((3,), 9.25))  # 0.9 + 0.1·1/4
    # blocks [3, 4] (norm 5) and [0, 1] (norm 1): mean norm 3, τ 0.5 -> [2, 8/3, 0, 2/3]
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    z = [2.0, 8.0 / 3.0, 0.0, 2.0 / 3.0]
    expected = -z[1] + math.log(sum(math.exp(v) for v in z))
    got = float(logit_norm_loss(logits, torch.tensor([1]), [0, 2, 4], 0.5))
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_slca_trains_backbone_with_fresh_norm_and_slow_lr(pv):
    from benchmarks.cost.engine import trainable_parameter_count

    m = SLCA(pv, 6, SLCA.Config())
    assert pv.trainable and all(p.requires_grad for p in pv.parameters())
    assert torch.equal(pv.vit.norm.weight, torch.ones(64)) and torch.equal(pv.vit.norm.bias, torch.zeros(64))
    assert pv.vit.norm.eps == 1e-5
    m.begin_task(_task(0))
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["backbone"]["lr_mult"] == 0.01 and groups["head"]["lr_mult"] == 1.0
    backbone = sum(p.numel() for p in pv.parameters())
    assert trainable_parameter_count(m) == backbone + 3 * 64 + 3  # the ViT + the current task's head
    m.begin_task(_task(1))
    assert not any(p.requires_grad for p in m.heads[0].parameters())  # freeze_old
    assert trainable_parameter_count(m) == backbone + 3 * 64 + 3


def test_slca_aligns_then_restores_raw_heads(pv):
    m = SLCA(pv, 6, SLCA.Config(ca_epochs=2, ca_samples_per_class=8))
    torch.manual_seed(0)
    for t in range(2):
        m.begin_task(_task(t))
        feats = torch.randn(12, 64) + 3 * torch.arange(12).remainder(3)[:, None].float() + 5 * t
        labels = torch.arange(12).remainder(3) + 3 * t
        ctx = FakeCtx(labels=labels, feats=feats)
        ctx.device = torch.device("cpu")
        raw = {k: v.clone() for k, v in m.heads.state_dict().items()}
        m.end_task(_task(t), ctx)
        aligned = m.heads.state_dict()
        same = all(torch.equal(raw[k], aligned[k]) for k in raw)
        assert same == (t == 0)  # no alignment after the first task
    assert m.align_log[0]["iterations"] == 2 * 6  # C = 6 seen classes mini-batches per epoch
    assert sorted(m.stats.classes) == list(range(6)) and m.stats.spreads[0].shape == (64, 64)
    m.begin_task(_task(2, n=3))  # fc.recall(): the next task starts from the raw heads
    for k, v in raw.items():
        assert torch.equal(m.heads.state_dict()[k], v)


def test_only_backbone_training_methods_unfreeze_it():
    from benchmarks.run.runner import prepare
    from conftest import make_tiny_config
    from methods.registry import list_methods

    for name in list_methods():
        p = prepare(make_tiny_config(name))
        trainable = any(q.requires_grad for q in p.method.backbone.parameters())
        assert trainable == (name in ("finetune", "joint", "slca")), name


# --- EASE ----------------------------------------------------------------------------------

from methods.ease import EASE, complement_prototypes, reweight_logits  # noqa: E402


def test_ease_complement_hand_derived():
    # 2 tasks of 1 class each, dim 2, current task t = 1. Class 0 (task 0) has a real prototype
    # only in subspace 0; class 1 (task 1) has real prototypes in subspaces 0 and 1. With one class
    # in R = {1}, softmax over one entry is 1, so class 0's subspace-1 prototype copies class 1's.
    P = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 5.0, 6.0]])
    complement_prototypes(P, [0, 1, 2], 1, 2)
    assert torch.equal(P[0], torch.tensor([1.0, 0.0, 5.0, 6.0]))
    # two classes in R: weights softmax(cos) = softmax([1, 0]) = [e/(e+1), 1/(e+1)]
    P = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 1.0]])
    complement_prototypes(P, [0, 1, 3], 1, 2)
    e = math.e
    assert torch.allclose(P[0, 2:], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert torch.equal(P[1:], torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 1.0]]))  # real ones untouched


def test_ease_complement_every_pair_at_task_two():
    # 3 tasks of 1 class, dim 1: old task 0 gets subspaces 1 and 2, old task 1 subspace 2
    P = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, 3.0, 4.0]])
    complement_prototypes(P, [0, 1, 2, 3], 2, 1)
    # (i=0, s=1): R = {1, 2}, cos in subspace 0 all 1 -> weights 1/2: P[0,1] = (2 + 3)/2
    # (i=0, s=2): R = {2}: P[0,2] = 4;  (i=1, s=2): R = {2}: P[1,2] = 4
    assert torch.equal(P, torch.tensor([[1.0, 2.5, 4.0], [1.0, 2.0, 4.0], [1.0, 3.0, 4.0]]))


def test_ease_reweight_logits_hand_derived():
    # t = 2 (3 subspaces), α = 0.2 -> off-diagonal weight 0.1. Unit features and prototypes, so
    # every cosine is a dot product. Class 0 of task 0, class 1 of task 2.
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (B=1, S=3, D=2)
    p = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],   # class 0: cos = 1, 0, 0
                      [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # class 1: cos = 0, 1, 1
    out = reweight_logits(f, p, torch.tensor([0, 2]), 2, 0.2, 0.0)
    assert torch.allclose(out, torch.tensor([[1.0, 0.1 + 1.0]]))
    # with a PTM subspace first (β = 0.5): subspace 0 weighted β, adapters shifted by one
    out = reweight_logits(f, p, torch.tensor([0, 1]), 1, 0.2, 0.5, ptm=True)
    # class 0 (task 0 = subspace 1): 0.5·1 + 1·0 + 0.2·0 ; class 1 (task 1 = subspace 2): 0.5·0 + 0.2·1 + 1·1
    assert torch.allclose(out, torch.tensor([[0.5, 1.2]]))


def test_ease_adapters_per_task_and_passes(pv):
    m = EASE(pv, 6, EASE.Config(bottleneck=8), num_tasks=2)
    m.begin_task(_task(0))
    m.begin_task(_task(1))
    assert len(m.adapters) == 2 and m.adapters[0] is not m.adapters[1]
    assert not any(p.requires_grad for p in m.adapters[0].parameters())
    assert sum(p.numel() for g in m.param_groups() for p in g["params"]) == 6 * (64 * 8 + 8 + 8 * 64 + 64) + 3 * 64 + 1
    assert m.prototypes.shape == (6, 2 * 64)
    calls = []
    h = pv.vit.norm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m.eval()(torch.randn(2, 3, 32, 32))
    h.remove()
    assert len(calls) == 2  # one ViT pass per adapter


def test_readouts_stay_fp32_under_bf16_autocast(pv):
    """RanPAC's projection (which G and Q accumulate) and the prototype cosines of APER / EASE are
    computed in float32 even inside the protocol's bf16 autocast (the references run fp32)."""
    x = torch.randn(2, 3, 32, 32)
    r = RanPAC(pv, 6, RanPAC.Config(M=16, bottleneck=8))
    r.w_rand.normal_()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f = r.feature(x)
        h = r.projected(x)
    assert h.dtype == torch.float32
    assert torch.equal(h, F.relu(f.float() @ r.w_rand))
    a = APER(pv, 6, APER.Config(bottleneck=8)).eval()
    a.begin_task(_task(0))
    a.prototypes.normal_()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(x)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, merged_prototype_logits(out.features.float(), a.prototypes))


def test_ease_ptm_subspace_comes_first(pv):
    m = EASE(pv, 6, EASE.Config(bottleneck=8, use_init_ptm=True, beta=1.0), num_tasks=2).eval()
    assert m.uses_query and m.prototypes.shape == (6, 3 * 64)
    m.begin_task(_task(0))
    with torch.no_grad():
        m.adapters[0].adapters[0].up.weight.normal_()
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    m.end_task(_task(0), FakeCtx(images=x, labels=y))
    with torch.no_grad():
        frozen = pv.vit.forward_features(x)[:, 0]
        adapted = m.adapters[0].features(x)
    for c in range(3):
        assert torch.allclose(m.prototypes[c, :64], frozen[y == c].mean(0), atol=1e-5)  # PTM block first
        assert torch.allclose(m.prototypes[c, 64:128], adapted[y == c].mean(0), atol=1e-5)
    assert m.prototypes[:, 128:].abs().sum() == 0  # task 1's subspace is not filled yet


def test_cosine_epoch_schedule_is_torch_cosine_annealing_per_epoch():
    """The references' CosineAnnealingLR(T_max=epochs, eta_min=min_lr), stepped once per epoch:
    constant within an epoch, (1 + cos(π·e/E))/2 of the way from min_lr to lr at epoch e."""
    from benchmarks.config import TrainConfig
    from benchmarks.run.protocol import schedule_factor

    t = TrainConfig(epochs=4, lr=0.1, min_lr=0.02, schedule="cosine_epoch")
    want = [0.1, 0.02 + 0.08 * (1 + math.cos(math.pi / 4)) / 2, 0.06, 0.02 + 0.08 * (1 - math.cos(math.pi / 4)) / 2]
    for e, lr in enumerate(want):
        for it in (10 * e, 10 * e + 9):
            assert math.isclose(0.1 * schedule_factor(t, it, 10, 0.1), lr, rel_tol=1e-12)
    # the same values as torch's own scheduler stepped per epoch
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.02)
    for e in range(4):
        assert math.isclose(opt.param_groups[0]["lr"], want[e], rel_tol=1e-9)
        opt.step()
        sched.step()
