"""Class-statistics classifier alignment (HiDe-Prompt's TII / TAP stages, SMoPE's CA stage).

After each task the method stores Gaussian statistics of each new class's features; after task
t ≥ 1 it retrains its head (or the TII network) on features *sampled* from the Gaussians of every
seen class, with no images (baselines.md §4.2–4.3, smope.md §4.4).

Storage forms (``ClassStats.mode``):

* ``multi-centroid``: sklearn KMeans with ``n_centroids`` clusters per class; each cluster keeps
  its mean and per-dimension variance. HiDe's default (10 centroids); SMoPE uses 1 centroid
  (``KMeans(random_state=seed)`` with one cluster is the class mean).
* ``covariance``: one mean and a full covariance per class (the HiDe paper's text).
* ``variance``: one mean and the per-dimension *sample* variance (ddof 1) per class, a diagonal
  Gaussian: HiDe-Prompt's ``--ca_storage_efficient_method variance`` (``_compute_mean`` stores
  ``diag(torch.cov(X.T) + 1e-4·I)``; nothing is skipped when sampling).

Sampling draws from N(μ, Σ + ε·I) with ε = 1e-4 (both reference codes): for the diagonal form
μ + z·sqrt(σ² + ε) is the same distribution as the reference's MultivariateNormal with a diagonal
covariance, computed in closed form because it is O(D) instead of O(D³) per class.

Alignment loop (both reference codes): every epoch draws ``samples_per_class`` features per class
(and centroid) for every seen class, shuffles them, then runs ``iterations`` mini-batches, where
the reference uses the number of classes of *earlier* tasks (so an epoch covers only a fraction
of the draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

VAR_EPS = 1e-4
STATS_MODES = ("multi-centroid", "covariance", "variance")


class ClassStats(nn.Module):
    """Per-class feature Gaussians; part of the owning method's state_dict (extra state)."""

    def __init__(self, mode: str = "multi-centroid", n_centroids: int = 10, seed: int = 0,
                 unbiased: bool = True, skip_zero_variance: bool = False) -> None:
        super().__init__()
        if mode not in STATS_MODES:
            raise ValueError(f"unknown statistics mode '{mode}'; use {', '.join(STATS_MODES)}")
        self.mode = mode
        self.n_centroids = n_centroids
        self.seed = seed
        # multi-centroid only. unbiased=False is np.var's population variance (ddof 0), what
        # HiDe-Prompt's _compute_mean stores; skip_zero_variance drops centroids whose variance is
        # all zero (singleton clusters) from sampling, as HiDe's alignment loops do
        # (engines/hide_tii_engine.py, engines/hide_promtp_wtp_and_tap_engine.py).
        self.unbiased = unbiased
        self.skip_zero_variance = skip_zero_variance
        self.means: Dict[int, Tensor] = {}  # class -> (K, D) float64
        self.spreads: Dict[int, Tensor] = {}  # class -> (K, D) variances, or (D, D) covariance

    # -- building ----------------------------------------------------------------------------
    def add(self, label: int, feats: Tensor) -> None:
        """Store the statistics of one class from its features (N, D)."""
        x = feats.detach().double().cpu()
        if self.mode == "covariance":
            mu = x.mean(0, keepdim=True)
            cov = torch.cov(x.T) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
            self.means[label], self.spreads[label] = mu, cov
            return
        if self.mode == "variance":  # torch.cov's default correction=1: the sample variance
            var = x.var(0, unbiased=True) if len(x) > 1 else torch.zeros(x.shape[1], dtype=x.dtype)
            self.means[label], self.spreads[label] = x.mean(0, keepdim=True), var[None]
            return
        k = min(self.n_centroids, len(x))
        if k == 1:
            centers, assign = x.mean(0, keepdim=True), torch.zeros(len(x), dtype=torch.long)
        else:
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=k, random_state=self.seed, n_init=10).fit(x.numpy())
            assign = torch.from_numpy(km.labels_.astype(np.int64))
            centers = torch.stack([x[assign == i].mean(0) for i in range(k)])
        var = torch.stack([x[assign == i].var(0, unbiased=self.unbiased) if int((assign == i).sum()) > 1
                           else torch.zeros(x.shape[1], dtype=x.dtype) for i in range(k)])
        self.means[label], self.spreads[label] = centers, var

    def add_all(self, feats: Tensor, labels: Tensor) -> None:
        for c in labels.unique().tolist():
            self.add(int(c), feats[labels == c])

    # -- using ---------------------------------------------------------------------------
    @property
    def classes(self) -> List[int]:
        return sorted(self.means)

    def centroids(self, classes: Optional[Iterable[int]] = None) -> Tensor:
        """All stored centroids (means) of ``classes`` stacked, (ΣK, D) float32."""
        cs = self.classes if classes is None else list(classes)
        if not cs:
            return torch.zeros(0, 0)
        return torch.cat([self.means[c] for c in cs]).float()

    def sample(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws per centroid of class ``label``: (K·n, D) float32."""
        mu = self.means[label]
        if self.mode == "covariance":
            d = mu.shape[1]
            chol = torch.linalg.cholesky(self.spreads[label] + VAR_EPS * torch.eye(d, dtype=mu.dtype))
            z = torch.randn(n, d, generator=generator, dtype=mu.dtype)
            return (mu + z @ chol.T).float()
        var = self.spreads[label]
        if self.skip_zero_variance and self.mode == "multi-centroid":
            keep = var.mean(1) != 0
            mu, var = mu[keep], var[keep]
        std = (var + VAR_EPS).sqrt()  # (K, D)
        z = torch.randn(mu.shape[0], n, mu.shape[1], generator=generator, dtype=mu.dtype)
        return (mu[:, None] + z * std[:, None]).reshape(-1, mu.shape[1]).float()

    def numbers(self) -> int:
        """How many numbers are stored (for the cost report)."""
        return sum(m.numel() for m in self.means.values()) + sum(s.numel() for s in self.spreads.values())

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"mode": self.mode, "n_centroids": self.n_centroids, "seed": self.seed,
                "unbiased": self.unbiased, "skip_zero_variance": self.skip_zero_variance,
                "means": dict(self.means), "spreads": dict(self.spreads)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.mode, self.n_centroids, self.seed = state["mode"], state["n_centroids"], state["seed"]
        self.unbiased = state.get("unbiased", True)
        self.skip_zero_variance = state.get("skip_zero_variance", False)
        self.means, self.spreads = dict(state["means"]), dict(state["spreads"])


@dataclass
class AlignConfig:
    """Hyper-parameters of one alignment stage (filled from the method's config)."""

    epochs: int = 30
    lr: float = 0.005
    optimizer: str = "sgd"  # sgd (HiDe) | adamw (SMoPE)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine: CosineAnnealingLR over epochs (HiDe) | smope: see lr_at
    min_lr: float = 1e-6
    samples_per_class: int = 120
    batch_size: Optional[int] = None  # None: samples_per_class (both reference codes)
    iterations: str = "old_classes"  # old_classes (reference) | all (cover every draw once)


def lr_at(cfg: AlignConfig, it: int, epoch: int, total_iters: int) -> float:
    """Learning rate of alignment iteration ``it``.

    ``cosine``: torch's CosineAnnealingLR stepped per epoch (T_max = epochs, eta_min 0).
    ``smope``: the first iteration at ``lr``, then a per-iteration cosine from lr/10 to
    ``min_lr`` (SMoPE's CA stage: a ``CosineSchedulerIter`` from ca_lr/10 takes over after the
    first iteration, smope.md §4.4); it steps after each update, so iteration i ≥ 1 uses the
    cosine's entry i − 1 (cos(π·(i−1)/total)).
    """
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "smope":
        if it == 0:
            return cfg.lr
        start = cfg.lr / 10
        p = min(1.0, (it - 1) / max(1, total_iters))
        return cfg.min_lr + (start - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown alignment schedule '{cfg.schedule}'")


def align_classifier(
    head: Callable[[Tensor], Tensor],
    params: List[nn.Parameter],
    stats: ClassStats,
    num_seen: int,
    num_old: int,
    cfg: AlignConfig,
    generator: torch.Generator,
    device: torch.device,
    mask_seen: bool = True,
) -> Dict[str, Any]:
    """Retrain ``params`` of ``head`` (features -> logits over all classes) on sampled features.

    Returns ``{"iterations": ..., "last_loss": ...}``. ``mask_seen`` restricts the softmax to the
    ``num_seen`` seen classes (both reference codes do, HiDe by -inf masking, SMoPE by slicing).
    """
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown alignment optimizer '{cfg.optimizer}'")
    bs = cfg.batch_size or cfg.samples_per_class
    classes = [c for c in stats.classes if c < num_seen]
    draws_per_epoch = sum(stats.means[c].shape[0] * cfg.samples_per_class for c in classes)
    iters = num_old if cfg.iterations == "old_classes" else math.ceil(draws_per_epoch / bs)
    iters = min(iters, math.ceil(draws_per_epoch / bs))
    total = iters * cfg.epochs
    it, last = 0, float("nan")
    for epoch in range(cfg.epochs):
        xs, ys = [], []
        for c in classes:
            x = stats.sample(c, cfg.samples_per_class, generator)
            xs.append(x)
            ys.append(torch.full((len(x),), c, dtype=torch.long))
        X, Y = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(len(X), generator=generator)
        X, Y = X[perm], Y[perm]
        for i in range(min(iters, math.ceil(len(X) / bs))):  # fewer draws when centroids are skipped
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, it, epoch, total)
            xb = X[i * bs : (i + 1) * bs].to(device)
            yb = Y[i * bs : (i + 1) * bs].to(device)
            logits = head(xb).float()
            if mask_seen:
                logits = logits[:, :num_seen]
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            last = float(loss.detach())
    return {"iterations": it, "last_loss": last}
