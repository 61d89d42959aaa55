"""RanPAC (McDonnell et al., NeurIPS 2023): first-session adaptation, a frozen random projection
with a ReLU, and a ridge-regression readout from accumulated second-order statistics.

Faithful to the effective behaviour of the authors' code, GitHub ``RanPAC/RanPAC`` at ``012927f``
(paths below are that repository's): ``RanPAC.py`` (``_train``, ``setup_RP``, ``replace_fc``,
``optimise_ridge_parameter``), ``inc_net.py`` (``CosineLinear`` with ``use_RP``), ``petl/*``,
``args/*_publish.csv`` (row "RanPAC").

1. **Phase 1, task 1 only** (``_cur_task == 0``): a PEFT module (``method.petl``; the
   ``paper`` preset picks Adapter-64 for CIFAR-100 / CUB and SSF for ImageNet-R / -A as the csv
   rows do) and a cosine head with learnable σ are trained with CE (SGD momentum 0.9, lr 0.01,
   batch 48, wd 5e-4, 20 epochs, cosine to 0). Afterwards the backbone and module are frozen.
2. **Projection** (``setup_RP``, once, after phase 1): ``W_rand ~ N(0, 1)^(D×M)``, M = 10000,
   unscaled, no bias, frozen. ``h(x) = ReLU(f(x) · W_rand)`` with ``f`` the adapted feature.
3. **Statistics, every task** (``replace_fc``), on the task's training images under the test
   transform: ``G += HᵀH`` (M×M) and ``Q += HᵀY`` (M×C, one-hot over *all* classes of the
   dataset). The reference keeps both in float32 (``torch.zeros``); ``method.gram_dtype`` offers
   float64.
4. **Ridge λ, re-chosen at every task** (``optimise_ridge_parameter``): candidates 10^k,
   k = −8..8; using only the current task's H and Y, in the order of the (shuffled) loader, fit on
   the first ``int(0.8·n)`` rows and take the λ with the smallest ``F.mse_loss`` on the rest (the
   first one on ties, ``np.argmin``).
5. **Readout** ``Wo = solve(G + λI, Q)ᵀ`` (``torch.linalg.solve``, as the reference; never an
   explicit inverse), logits ``h(x) · Woᵀ``: plain linear, no normalisation, σ = 1 (LAMDA-PILOT's
   port uses a cosine readout instead, which changes the argmax; not followed).

Where this implementation and the reference differ, and why:

* ``W_rand`` is drawn from the run's seeded generator (``ctx.generator("ranpac-projection")``);
  the reference draws it from the global RNG after phase 1, so its values depend on everything
  phase 1 consumed. The loader shuffle of step 4 likewise comes from a seeded generator per task.
* Statistics and the solve run on the run's device in ``gram_dtype``; the reference moves
  features to the CPU and solves there in float32 (the same arithmetic, another device).
* ``W_rand``, ``G``, ``Q`` and ``Wo`` are buffers, so they are in the checkpoint and in the cost
  report's stored state (the reference's ``W_rand`` is a plain attribute that its parameter
  count misses). At the paper's M = 10000, G alone is 10^8 numbers (400 MB in float32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.base import ContinualMethod, MethodOutput, Phase, Task
from methods.peft import PEFT_KINDS, build_peft, first_session_head, pad_logits
from methods.registry import register_method
from methods.vit import PromptedViT


# --- the pieces, at module level so that tests can check them on hand-made tensors ----------

def random_features(f: Tensor, w_rand: Optional[Tensor]) -> Tensor:
    """``ReLU(f · W_rand)``, or ``f`` itself when there is no projection (M = 0)."""
    return f if w_rand is None else F.relu(f @ w_rand.to(f.dtype))


def ridge_readout(G: Tensor, Q: Tensor, ridge: float) -> Tensor:
    """``Wo = solve(G + λI, Q)ᵀ``: (C, M) for G (M, M) and Q (M, C)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, Q).T


def choose_ridge(H: Tensor, Y: Tensor, exponents: List[int], fit_fraction: float = 0.8) -> float:
    """The reference's λ choice: fit on the first ``int(fit_fraction·n)`` rows of (H, Y), score
    each ``10^k`` by the mean squared error on the remaining rows, return the first minimiser."""
    n_fit = int(H.shape[0] * fit_fraction)
    Hf, Yf, Hv, Yv = H[:n_fit], Y[:n_fit], H[n_fit:], Y[n_fit:]
    G, Q = Hf.T @ Hf, Hf.T @ Yf
    ridges = [10.0 ** k for k in exponents]
    losses = [float(F.mse_loss(Hv @ ridge_readout(G, Q, r).T, Yv)) for r in ridges]
    return ridges[int(np.argmin(np.array(losses)))]


@register_method("ranpac")
class RanPAC(ContinualMethod):
    """First-session PEFT, frozen random ReLU projection, ridge readout from accumulated G and Q."""

    prompt_based = False  # a first-session / backbone-training method, not a prompt method

    @dataclass
    class Config:
        petl: str = "adapter"  # adapter | ssf | vpt_shallow | vpt_deep (csv column convnet_type)
        first_session: bool = True  # False: the ablation "no Phase 1" (frozen PTM features)
        bottleneck: int = 64  # ffn_num, hard-coded 64 (inc_net.py get_convnet)
        adapter_scale: float = 0.1
        adapter_dropout: float = 0.1
        vpt_tokens: int = 5  # VPT is hard-coded Deep with 5 tokens in the reference
        M: int = 10000  # projection width (csv column M); 0: no projection (ablation "no RP")
        ridge_exponents: List[int] = field(default_factory=lambda: list(range(-8, 9)))  # 10^-8 .. 10^8
        ridge_fit_fraction: float = 0.8
        gram_dtype: str = "float32"  # float32 as the reference (torch.zeros) | float64

        def validate(self) -> None:
            if self.petl not in PEFT_KINDS:
                raise ConfigError(f"method.petl must be one of {', '.join(PEFT_KINDS)}, got '{self.petl}'")
            if self.M < 0:
                raise ConfigError(f"method.M must be 0 (no projection) or positive, got {self.M}")
            if not self.ridge_exponents:
                raise ConfigError("method.ridge_exponents must list at least one exponent")
            if not 0.0 < self.ridge_fit_fraction < 1.0:
                raise ConfigError(f"method.ridge_fit_fraction must be in (0, 1), got {self.ridge_fit_fraction}")
            if self.gram_dtype not in ("float32", "float64"):
                raise ConfigError(f"method.gram_dtype must be float32 or float64, got '{self.gram_dtype}'")

    def __init__(self, backbone: PromptedViT, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        d = backbone.embed_dim
        width = cfg.M if cfg.M > 0 else d
        dtype = torch.float64 if cfg.gram_dtype == "float64" else torch.float32
        self.peft = build_peft(cfg.petl, backbone, cfg.bottleneck, cfg.adapter_scale, cfg.adapter_dropout, cfg.vpt_tokens)
        self.fs_head: Optional[nn.Module] = None  # allocated in begin_task(0)
        self.register_buffer("w_rand", torch.zeros(d, cfg.M) if cfg.M > 0 else None)
        self.register_buffer("projection_drawn", torch.zeros((), dtype=torch.bool))
        self.register_buffer("G", torch.zeros(width, width, dtype=dtype))
        self.register_buffer("Q", torch.zeros(width, num_classes, dtype=dtype))
        self.register_buffer("Wo", torch.zeros(num_classes, width))
        self.ridges: List[float] = []

    # -- life cycle -------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if task.index == 0 and self.fs_head is None:
            self.fs_head = first_session_head(task.class_end - task.class_start, self.backbone.embed_dim)
            self.fs_head.to(self.G.device)
        train = task.index == 0 and self.cfg.first_session
        for p in self.method_parameters():
            p.requires_grad_(train)

    def phases(self, task: Task) -> List[Phase]:
        if task.index == 0 and self.cfg.first_session:
            return [Phase("adapt", forward_kwargs={"adapt": True})]
        return []

    def param_groups(self) -> List[Dict[str, Any]]:
        # ``optim.SGD(self._network.parameters(), lr=body_lr)``: one lr for module and head
        return [{"params": [p for p in self.method_parameters() if p.requires_grad], "lr_mult": 1.0, "name": "petl+head"}]

    def feature(self, x: Tensor) -> Tensor:
        """The backbone feature the readout uses: adapted after phase 1, else the frozen one."""
        return self.peft.features(x) if self.cfg.first_session else self.backbone(x)

    def projected(self, x: Tensor) -> Tensor:
        """``ReLU(f(x)·W_rand)`` in float32 even under bf16 autocast: the reference runs fp32, and
        G and Q accumulate these features over every task."""
        f = self.feature(x)
        with torch.autocast(device_type=f.device.type, enabled=False):
            return random_features(f.float(), self.w_rand)

    def forward(self, x: Tensor, query: Optional[Tensor] = None, adapt: bool = False, **kwargs: Any) -> MethodOutput:
        if adapt:
            feat = self.peft.features(x)
            return MethodOutput(logits=pad_logits(self.fs_head(feat), 0, self.num_classes), features=feat)
        h = self.projected(x)
        return MethodOutput(logits=h.float() @ self.Wo.T, features=h)

    @torch.no_grad()
    def end_task(self, task: Task, ctx: Any) -> None:
        was = self.training
        self.eval()
        if self.w_rand is not None and not bool(self.projection_drawn):
            g = ctx.generator("ranpac-projection")
            self.w_rand.copy_(torch.randn(self.w_rand.shape, generator=g))
            self.projection_drawn.fill_(True)
        feats, labels = ctx.features(self.projected, transform="test")
        # the reference's loader for these features shuffles; the λ split follows that order
        perm = torch.randperm(len(labels), generator=ctx.generator("ranpac-order", task.index))
        H = feats[perm].to(self.G.device, self.G.dtype)
        Y = F.one_hot(labels[perm].to(self.G.device), self.num_classes).to(self.G.dtype)
        self.Q += H.T @ Y
        self.G += H.T @ H
        ridge = choose_ridge(H, Y, self.cfg.ridge_exponents, self.cfg.ridge_fit_fraction)
        self.ridges.append(ridge)
        self.Wo.copy_(ridge_readout(self.G, self.Q, ridge).to(self.Wo.dtype))
        ctx.log(f"ranpac: task {task.index + 1} ridge lambda {ridge:g}")
        self.train(was)

    # -- reporting, state and cost -------------------------------------------------------------
    def diagnostics(self) -> Dict[str, Any]:
        return {"ridge_per_task": list(self.ridges)}

    def get_extra_state(self) -> Dict[str, Any]:
        return {"ridges": list(self.ridges)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.ridges = list(state.get("ridges", []))

    def state_numbers(self) -> Dict[str, int]:
        out = {"gram_matrix": self.G.numel(), "class_feature_sums": self.Q.numel(), "ridge_readout": self.Wo.numel()}
        if self.w_rand is not None:
            out["random_projection"] = self.w_rand.numel()
        return out
