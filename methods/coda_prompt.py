"""CODA-Prompt (Smith et al., CVPR'23): attention-weighted sums of prompt components.

Faithful to the current reference code, GT-RIPL/CODA-Prompt @ 6417d4f (``models/zoo.py::CodaPrompt``,
``learners/prompt.py``, ``experiments/*.sh`` with ``--prompt_param 100 8 0.0``):

* On each of layers 0-4 a pool of M=100 components ``P_m`` (L=8 tokens × D), keys ``K_m`` (D)
  and attention vectors ``A_m`` (D). For the frozen query ``q`` (final [CLS] of the un-prompted
  pass), ``α_m = cos(q ⊙ A_m, K_m)`` and the layer's prompt is ``p = Σ_m α_m P_m``: no top-k,
  no softmax, α in [-1, 1]. The first L/2 tokens of ``p`` are key prefixes, the last L/2 value
  prefixes, in post-projection per-head space (``models/vit.py::Attention.forward``).
* Task t owns components ``[t·M/T, (t+1)·M/T)``. While task t trains, earlier components take part
  frozen and later ones are excluded; at test time every component up to the current task is used.
  Here each task's slice is its own ``nn.Parameter`` (allocated up front, so the added-parameter
  count is the reference's), and only the current slice has ``requires_grad``: the reference's
  ``detach()`` of earlier rows, and a trainable count that is the reference's 10 components per
  layer plus the head.
* Initialisation (``init="gram_schmidt"``, reference since 605ac87): at construction and at each
  new task (``process_task_count``) the new slice's rows of P (flattened to L·D), K and A are drawn
  Gaussian and orthonormalised against all earlier rows; later rows stay zero until their task.
  The reference projects onto each earlier row separately, which is exact only while the earlier
  rows are still orthogonal; after training they are not, so here the new rows are made
  orthogonal to the *span* of the earlier rows (an orthonormal QR basis of them), which is what
  the reference's comment intends. New rows are written in place into the existing parameters,
  so parameter identity (and any optimiser holding them) survives; the reference instead returns
  new ``nn.Parameter`` objects and relies on the per-task optimiser rebuild.
  ``init="orthogonal"`` is the paper-era code (22948d2): ``nn.init.orthogonal_`` on the whole
  pool at construction, nothing at later tasks.
* Loss: CE + ``ortho_mu·ortho_scale`` · Σ_layers [Π(K) + Π(A) + Π(P_flat)], Π(X) =
  mean((XXᵀ − I)²) over the first (t+1)·M/T rows (earlier rows frozen). The current code runs
  μ=0 (README: "with updated code, now can be 0"). The paper-era code ran μ=0.1 with a hidden
  ×1e-6 inside ``ortho_penalty`` (GT-RIPL/CODA-Prompt#4): ``ortho_mu=0.1, ortho_scale=1e-6``.
* Head: one ``nn.Linear(D, C)`` on the prompted final [CLS].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.base import ContinualMethod, MethodOutput, Task
from methods.prompts import gram_schmidt
from methods.registry import register_method
from methods.vit import PromptedViT, Prefix, prefix_from_tokens

INITS = ("gram_schmidt", "orthogonal")
REFERENCE_NUM_TASKS = 10  # used when the method is built without a scenario (the reference's 10-task splits)


def ortho_penalty(x: Tensor) -> Tensor:
    """Π(X) = mean((X Xᵀ − I)²) over the rows of a 2-D tensor (``models/zoo.py::ortho_penalty``)."""
    gram = x @ x.T
    return (gram - torch.eye(x.shape[0], dtype=x.dtype, device=x.device)).pow(2).mean()


def component_weights(query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """α (B, M) with α[b, m] = cos(q_b ⊙ A_m, K_m).

    Written as two matrix products instead of materialising the (B, M, D) tensor q ⊙ A (the
    reference's einsum): cos = Σ_d q_d A_md K̂_md / ‖q ⊙ A_m‖ with K̂ = K / ‖K‖.
    """
    k_hat = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    num = query @ (attention * k_hat).T
    den = ((query * query) @ (attention * attention).T).clamp_min(0).sqrt().clamp_min(1e-12)
    return num / den


class ComponentPool(nn.Module):
    """One layer's components, keys and attention vectors, one parameter per task slice."""

    def __init__(self, num_tasks: int, per_task: int, length: int, embed_dim: int, key_dim: int) -> None:
        super().__init__()
        self.per_task = per_task
        self.p = nn.ParameterList([nn.Parameter(torch.zeros(per_task, length, embed_dim)) for _ in range(num_tasks)])
        self.k = nn.ParameterList([nn.Parameter(torch.zeros(per_task, key_dim)) for _ in range(num_tasks)])
        self.a = nn.ParameterList([nn.Parameter(torch.zeros(per_task, key_dim)) for _ in range(num_tasks)])

    def slices(self, kind: str, count: int) -> Tensor:
        """Rows of the first ``count`` task slices of ``kind`` ('p', 'k' or 'a'), concatenated."""
        parts = list(getattr(self, kind))[:count]
        return parts[0] if count == 1 else torch.cat(parts, dim=0)

    def set_trainable_slice(self, index: int) -> None:
        for params in (self.p, self.k, self.a):
            for t, param in enumerate(params):
                param.requires_grad_(t == index)

    @torch.no_grad()
    def init_slice_gram_schmidt(self, index: int) -> None:
        """Gaussian rows for slice ``index``, orthonormal to the span of all earlier rows."""
        for params in (self.p, self.k, self.a):
            new = params[index]
            rows = new.reshape(self.per_task, -1)
            fresh = torch.randn(rows.shape, dtype=torch.float64)  # on CPU: the same draws on every device
            if index:
                earlier = torch.cat([params[t].reshape(self.per_task, -1) for t in range(index)]).double().cpu()
                # Earlier rows were trained and are no longer orthonormal: project the draws off an
                # orthonormal (QR) basis of their span, twice for float precision, as one block
                # product instead of a row-by-row loop over every earlier row.
                basis = torch.linalg.qr(earlier.T, mode="reduced").Q.T
                for _ in range(2):
                    fresh = fresh - (fresh @ basis.T) @ basis
            # Orthonormalising among themselves keeps the rows in the orthogonal complement.
            new.copy_(gram_schmidt(fresh).reshape(new.shape).to(new.dtype))

    @torch.no_grad()
    def init_orthogonal(self) -> None:
        """Paper-era init: ``nn.init.orthogonal_`` on the whole pool (all task slices at once)."""
        for params in (self.p, self.k, self.a):
            whole = torch.empty(len(params) * self.per_task, params[0][0].numel())
            nn.init.orthogonal_(whole)
            for t, param in enumerate(params):
                param.copy_(whole[t * self.per_task : (t + 1) * self.per_task].reshape(param.shape))

    def forward(self, query: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """(α (B, count·M/T), prompt tokens (B, L, D)) from the first ``count`` slices."""
        # fp32 even under bf16 autocast: the reference computes α and Σ α P in fp32, and this
        # is a few small matrix products next to the ViT pass.
        with torch.autocast(device_type=query.device.type, enabled=False):
            alpha = component_weights(query.float(), self.slices("k", count).float(), self.slices("a", count).float())
            tokens = torch.einsum("bm,mld->bld", alpha, self.slices("p", count).float())
        return alpha, tokens

    def penalty(self, count: int) -> Tensor:
        """Π(K) + Π(A) + Π(P_flat) over the first ``count`` slices."""
        with torch.autocast(device_type=self.p[0].device.type, enabled=False):
            p = self.slices("p", count).float()
            return (ortho_penalty(self.slices("k", count).float()) + ortho_penalty(self.slices("a", count).float())
                    + ortho_penalty(p.reshape(p.shape[0], -1)))


@register_method("coda_prompt")
class CodaPrompt(ContinualMethod):
    """CODA-Prompt: per-layer component pools, α = cos(q ⊙ A, K), prompt = Σ α P, prefix-tuning."""

    @dataclass
    class Config:
        pool_size: int = 100  # M components per layer (--prompt_param arg 1)
        prompt_length: int = 8  # L tokens per component: L/2 key + L/2 value prefix tokens (arg 2)
        layers: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # models/zoo.py e_layers
        init: str = "gram_schmidt"  # gram_schmidt (605ac87+, per task) | orthogonal (paper era 22948d2)
        ortho_mu: float = 0.0  # orthogonality weight μ (arg 3): 0.0 current scripts, 0.1 paper era
        ortho_scale: float = 1.0  # extra factor on μ; the paper-era ortho_penalty hid ×1e-6 (CODA-Prompt#4)

        def validate(self) -> None:
            if self.pool_size < 1:
                raise ConfigError(f"method.pool_size must be at least 1, got {self.pool_size}")
            if self.prompt_length < 2 or self.prompt_length % 2:
                raise ConfigError(f"method.prompt_length must be a positive even number (half key, half value tokens), got {self.prompt_length}")
            if self.init not in INITS:
                raise ConfigError(f"unknown method.init '{self.init}'; choose {' or '.join(INITS)}")
            if self.ortho_mu < 0 or self.ortho_scale < 0:
                raise ConfigError("method.ortho_mu and method.ortho_scale must not be negative")
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"method.layers must be a non-empty list of distinct block indices, got {self.layers}")

    uses_query = True

    def __init__(self, backbone: PromptedViT, num_classes: int, cfg: Any, num_tasks: Optional[int] = None) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        self.num_tasks = REFERENCE_NUM_TASKS if num_tasks is None else num_tasks
        if cfg.pool_size % self.num_tasks:
            raise ConfigError(
                f"method.pool_size={cfg.pool_size} cannot be split evenly into {self.num_tasks} task slices; "
                f"use a multiple of {self.num_tasks}"
            )
        if max(cfg.layers) >= backbone.depth:
            raise ConfigError(f"method.layers={cfg.layers} reaches past the backbone's {backbone.depth} blocks")
        d = backbone.embed_dim
        if cfg.init == "gram_schmidt" and cfg.pool_size > d:
            raise ConfigError(
                f"method.pool_size={cfg.pool_size} exceeds the backbone width {d}, so Gram-Schmidt cannot make "
                f"that many keys orthogonal; use pool_size <= {d}"
            )
        self.per_task = cfg.pool_size // self.num_tasks
        self.task_count = 0  # index of the task being trained / last trained (the reference's task_count)
        self.pools = nn.ModuleDict(
            {str(layer): ComponentPool(self.num_tasks, self.per_task, cfg.prompt_length, d, d) for layer in cfg.layers}
        )
        self.head = nn.Linear(d, num_classes)
        self._initialised = 0  # number of slices given their initial values
        if cfg.init == "orthogonal":
            for pool in self.pools.values():
                pool.init_orthogonal()
            self._initialised = self.num_tasks
        else:
            self._init_next_slice()
        self._set_trainable(0)
        self._alpha_sum: Optional[Tensor] = None  # eval-time Σ|α| per component, for diagnostics
        self._alpha_count = 0
        self._alpha_history: List[List[float]] = []

    # -- life cycle -----------------------------------------------------------------------
    def _init_next_slice(self) -> None:
        for pool in self.pools.values():
            pool.init_slice_gram_schmidt(self._initialised)
        self._initialised += 1

    def _set_trainable(self, index: int) -> None:
        for pool in self.pools.values():
            pool.set_trainable_slice(index)

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if task.num_tasks != self.num_tasks:
            raise ConfigError(
                f"coda_prompt was built for {self.num_tasks} tasks but the scenario has {task.num_tasks}"
            )
        while self._initialised <= task.index:
            self._init_next_slice()
        self.task_count = task.index
        self._set_trainable(task.index)

    def end_task(self, task: Task, ctx: Any) -> None:
        # The evaluation after this task starts now: keep the previous one's α statistics.
        if self._alpha_sum is not None:
            self._alpha_history.append(self._alpha_by_slice())
        self._alpha_sum, self._alpha_count = None, 0

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        q = self.get_query(x, query)
        count = self.task_count + 1
        prefix: Dict[int, Prefix] = {}
        alphas = []
        for layer, pool in self.pools.items():
            alpha, tokens = pool(q, count)
            prefix[int(layer)] = prefix_from_tokens(tokens, self.backbone.num_heads)
            alphas.append(alpha)
        feat = self.backbone(x, prefix=prefix)
        aux = None
        mu = self.cfg.ortho_mu * self.cfg.ortho_scale
        if self.training and mu > 0:
            aux = mu * sum(pool.penalty(count) for pool in self.pools.values())
        if not self.training:
            self._record_alpha(torch.stack(alphas, 1))
        return MethodOutput(logits=self.head(feat), aux_loss=aux, features=feat)

    # -- diagnostics and cost -------------------------------------------------------------
    @torch.no_grad()
    def _record_alpha(self, alpha: Tensor) -> None:
        """Accumulate Σ_b |α| per (layer, component) over the evaluation images."""
        s = alpha.detach().abs().float().sum(0).cpu()
        if self._alpha_sum is None or self._alpha_sum.shape != s.shape:
            self._alpha_sum, self._alpha_count = torch.zeros_like(s), 0
        self._alpha_sum += s
        self._alpha_count += alpha.shape[0]

    def _alpha_by_slice(self) -> List[float]:
        """Mean |α| per task slice (over layers, the slice's components and the evaluated images)."""
        per_comp = self._alpha_sum / max(1, self._alpha_count)  # (layers, components)
        return [float(v) for v in per_comp.reshape(per_comp.shape[0], -1, self.per_task).mean(dim=(0, 2))]

    def diagnostics(self) -> Dict[str, Any]:
        """``mean_abs_alpha[t][s]``: mean |α| of slice s's components on the test images of every
        seen task, in the evaluation after task t. How much the model still leans on old slices."""
        history = list(self._alpha_history)
        if self._alpha_sum is not None:
            history.append(self._alpha_by_slice())
        return {"mean_abs_alpha": history} if history else {}

    def slice_numbers(self) -> int:
        """Prompt, key and attention numbers of one task slice over all prompted layers."""
        d = self.backbone.embed_dim
        return len(self.pools) * self.per_task * (self.cfg.prompt_length * d + 2 * d)

    def used_parameters(self) -> int:
        """Slices 0..t (the rest are allocated but unused until their task) plus the head."""
        head = sum(p.numel() for p in self.head.parameters())
        return (self.task_count + 1) * self.slice_numbers() + head
