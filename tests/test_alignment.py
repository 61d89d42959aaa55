"""Class statistics (both storage forms) and classifier alignment on sampled features."""
import math

import pytest
import torch
from torch import nn

from methods.alignment import VAR_EPS, AlignConfig, ClassStats, align_classifier, lr_at


def test_single_centroid_stores_mean_and_unbiased_variance():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    s = ClassStats("multi-centroid", n_centroids=1)
    s.add(4, x)
    assert torch.allclose(s.means[4], torch.tensor([[3.0, 6.0]], dtype=torch.float64))
    # unbiased variance: ((1-3)^2 + 0 + (5-3)^2) / 2 = 4 ; ((2-6)^2 + 0 + (10-6)^2)/2 = 16
    assert torch.allclose(s.spreads[4], torch.tensor([[4.0, 16.0]], dtype=torch.float64))
    assert s.numbers() == 4


def test_multi_centroid_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=g) * 0.01 + torch.tensor([10.0, 0, 0])
    b = torch.randn(20, 3, generator=g) * 0.01 + torch.tensor([-10.0, 0, 0])
    s = ClassStats("multi-centroid", n_centroids=2, seed=0)
    s.add(0, torch.cat([a, b]))
    centers = sorted(s.means[0][:, 0].tolist())
    assert centers == pytest.approx([-10.0, 10.0], abs=0.01)
    assert s.centroids().shape == (2, 3)


def test_covariance_form_and_sampling_moments():
    g = torch.Generator().manual_seed(1)
    L = torch.tensor([[2.0, 0.0], [1.0, 0.5]])
    x = torch.randn(4000, 2, generator=g) @ L.T + torch.tensor([1.0, -1.0])
    s = ClassStats("covariance")
    s.add(0, x)
    cov = L @ L.T
    assert torch.allclose(s.spreads[0].float(), cov, atol=0.15)
    draws = s.sample(0, 20000, torch.Generator().manual_seed(2))
    assert torch.allclose(draws.mean(0), torch.tensor([1.0, -1.0]), atol=0.06)
    assert torch.allclose(torch.cov(draws.T), cov + VAR_EPS * torch.eye(2), atol=0.15)


def test_diagonal_sampling_has_variance_plus_eps():
    s = ClassStats("multi-centroid", n_centroids=1)
    s.means[0] = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    s.spreads[0] = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    d = s.sample(0, 50000, torch.Generator().manual_seed(0))
    assert d.shape == (50000, 2)
    assert d[:, 0].std().item() == pytest.approx(math.sqrt(VAR_EPS), rel=0.03)
    assert d[:, 1].std().item() == pytest.approx(math.sqrt(4 + VAR_EPS), rel=0.03)
    assert d[:, 1].mean().item() == pytest.approx(5.0, abs=0.05)


def test_stats_round_trip_through_state_dict():
    holder = nn.Module()
    holder.stats = ClassStats("multi-centroid", n_centroids=1)
    holder.stats.add(3, torch.randn(5, 4))
    state = holder.state_dict()
    other = nn.Module()
    other.stats = ClassStats("covariance")
    other.load_state_dict(state)
    assert other.stats.mode == "multi-centroid" and torch.equal(other.stats.means[3], holder.stats.means[3])


def test_alignment_fixes_a_miscalibrated_head_and_touches_only_given_params():
    torch.manual_seed(0)
    s = ClassStats("multi-centroid", n_centroids=1)
    for c, mu in enumerate([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]]):
        s.means[c] = torch.tensor([mu], dtype=torch.float64)
        s.spreads[c] = torch.full((1, 2), 0.25, dtype=torch.float64)
    head = nn.Linear(2, 5)
    other = nn.Linear(2, 2)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))  # class 2 dominates everything
    w_other = other.weight.clone()
    cfg = AlignConfig(epochs=30, lr=0.1, optimizer="sgd", samples_per_class=32, iterations="all")
    info = align_classifier(head, list(head.parameters()), s, num_seen=3, num_old=2, cfg=cfg,
                            generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    probe = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]])
    assert head(probe)[:, :3].argmax(1).tolist() == [0, 1, 2]
    assert torch.equal(other.weight, w_other)
    assert info["iterations"] == 30 * math.ceil(3 * 32 / 32)


def test_reference_iteration_count_is_the_number_of_old_classes():
    s = ClassStats("multi-centroid", n_centroids=1)
    for c in range(4):
        s.means[c] = torch.zeros(1, 2, dtype=torch.float64)
        s.spreads[c] = torch.ones(1, 2, dtype=torch.float64)
    head = nn.Linear(2, 4)
    info = align_classifier(head, list(head.parameters()), s, num_seen=4, num_old=2,
                            cfg=AlignConfig(epochs=3, samples_per_class=8), generator=torch.Generator().manual_seed(0),
                            device=torch.device("cpu"))
    assert info["iterations"] == 3 * 2


def test_alignment_schedules():
    c = AlignConfig(epochs=30, lr=0.005, schedule="cosine")
    assert lr_at(c, 0, 0, 100) == pytest.approx(0.005)
    assert lr_at(c, 50, 15, 100) == pytest.approx(0.0025)
    sm = AlignConfig(epochs=50, lr=1e-4, schedule="smope", min_lr=1e-6)
    assert lr_at(sm, 0, 0, 1000) == pytest.approx(1e-4)
    # stepped after each update: iteration 1 uses the cosine's first entry, cos(0) -> lr/10
    assert lr_at(sm, 1, 0, 1000) == pytest.approx(1e-5)
    assert lr_at(sm, 2, 0, 1000) == pytest.approx(1e-6 + (1e-5 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 1000)))
    assert lr_at(sm, 1001, 49, 1000) == pytest.approx(1e-6)


def test_variance_mode_is_hides_diagonal_sample_variance():
    """HiDe-Prompt _compute_mean, ca_storage_efficient_method 'variance': mean and
    diag(torch.cov(X.T) + 1e-4·I) -- torch.cov uses ddof 1 -- sampled from a diagonal Gaussian.
    X = [[0, 1], [2, 1], [4, 4]]: mean (2, 2); sample variances (4+0+4)/2 = 4 and (1+1+4)/2 = 3;
    the covariance of the two dimensions, ((-2)(-1) + 0 + 2·2)/2 = 3, is dropped."""
    from methods.alignment import ClassStats

    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    st = ClassStats("variance")
    st.add(7, x)
    assert st.means[7].tolist() == [[2.0, 2.0]]
    assert st.spreads[7].tolist() == [[4.0, 3.0]]
    draws = st.sample(7, 200_000, torch.Generator().manual_seed(0)).double()
    assert draws.shape == (200_000, 2)
    assert draws.mean(0).tolist() == pytest.approx([2.0, 2.0], abs=0.02)
    assert draws.var(0).tolist() == pytest.approx([4.0001, 3.0001], rel=0.02)
    assert float(torch.corrcoef(draws.T)[0, 1]) == pytest.approx(0.0, abs=0.01)
    full = ClassStats("covariance")
    full.add(7, x)
    d2 = full.sample(7, 200_000, torch.Generator().manual_seed(0)).double()
    assert float(torch.cov(d2.T)[0, 1]) == pytest.approx(3.0, rel=0.03)  # the covariance form keeps it
    from benchmarks.config import resolve_config

    cfg = resolve_config("hide_prompt", "cifar100", "paper", {"method": {"stats_mode": "variance"}})
    assert cfg.method.stats_mode == "variance"
