"""EASE (Zhou et al., CVPR 2024): Expandable Subspace Ensemble -- one adapter per task on the
frozen ViT, prototypes in every adapter's subspace, and a semantic-guided complement for the old
classes' prototypes in newer subspaces.

Faithful to the effective behaviour of the authors' code, GitHub ``sun-hailong/CVPR24-Ease`` at
``6d67508`` (paths below are that repository's): ``models/ease.py`` (``_train``, ``replace_fc``,
``solve_sim_reset``, ``after_task``), ``backbone/vit_ease.py`` (``forward_train``,
``forward_test``, ``forward_proto``, ``add_adapter_to_list``), ``backbone/linears.py``
(``EaseCosineLinear.forward_reweight``), ``utils/inc_net.py`` (``EaseNet``), ``exps/ease_*.json``.

1. **Task t trains a fresh adapter** (the shared :class:`methods.peft.AdapterPEFT`: AdaptFormer,
   bottleneck 64, ×0.1, dropout 0.1, zero-initialised up projection; not initialised from the
   previous one) and a fresh ``proxy_fc`` cosine head with learnable σ over the task's classes,
   with CE on the task's local labels (SGD momentum 0.9, cosine schedule). Afterwards the adapter
   is frozen and kept; the proxy head is discarded (here: replaced at the next task).
2. **Prototypes** (``replace_fc``): for every subspace k = 0..t (plus the PTM subspace when
   ``use_init_ptm``), each new class's prototype is the mean of the raw (unnormalised) final
   [CLS] of its training images under the test transform, passed through adapter k.
3. **Complement** (``solve_sim_reset``, all configs set ``recalc_sim``): for every old task i < t
   and every later subspace s ∈ {i+1..t}: R = the classes of tasks s..t;
   ``sim = softmax_j(cos(P_c^(i), P_j^(i)))`` over j ∈ R (temperature 1), and
   ``P_c^(s) = Σ_j sim_cj · P_j^(s)`` for the classes c of task i. Recomputed every task.
4. **Prediction** (``forward_reweight``, σ = 1): for a class c of task τ(c), with t the 0-based
   current task, ``logit_c = cos(f_τ(c), P_c,τ(c)) + (α/t)·Σ_{j≠τ(c)} cos(f_j, P_c,j)
   [+ β·cos(f_PTM, P_c,PTM)]``. One ViT pass per adapter (plus the PTM pass), so inference cost
   grows linearly with the number of tasks.

``diagnostics["task_pred"]`` is the task of the predicted class (which subspace's diagonal term
won), so the suite reports EASE's task-identity accuracy.

Where this implementation and the reference differ, and why:

* The reference keeps old adapters in a plain Python list (not in ``state_dict`` or its
  parameter count); here they are an ``nn.ModuleList`` so checkpoints and the cost report include
  them.
* ``use_diagonal``, ``use_exemplars``, ``recalc_sim=False`` and ``moni_adam`` (ablations and the
  Omnibenchmark-only mode) are not provided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.base import ContinualMethod, MethodOutput, Phase, Task
from methods.peft import AdapterPEFT, first_session_head, pad_logits
from methods.registry import register_method
from methods.vit import PromptedViT


# --- the pieces, at module level so that tests can check them on hand-made tensors ----------

def complement_prototypes(P: Tensor, offsets: List[int], t: int, dim: int, ptm: bool = False) -> Tensor:
    """``solve_sim_reset`` on the prototype matrix P (C, S·dim), in place and returned.

    ``offsets``: first class of every task plus the end; ``t``: the current task index; subspace
    k's block is ``k`` (``k+1`` with a PTM block first)."""
    shift = 1 if ptm else 0
    blk = lambda k: slice((k + shift) * dim, (k + shift + 1) * dim)  # noqa: E731
    for i in range(t):
        own = slice(offsets[i], offsets[i + 1])
        for s in range(i + 1, t + 1):
            rest = slice(offsets[s], offsets[t + 1])  # classes of tasks s..t
            A_hat, A, B = P[own, blk(i)], P[rest, blk(i)], P[rest, blk(s)]
            sim = torch.softmax(F.normalize(A_hat, dim=1) @ F.normalize(A, dim=1).T, dim=1)
            P[own, blk(s)] = sim @ B
    return P


def reweight_logits(feats: Tensor, protos: Tensor, class_task: Tensor, t: int, alpha: float, beta: float,
                    ptm: bool = False) -> Tensor:
    """``forward_reweight``: feats (B, S, D) and protos (C, S, D) over the S subspaces in use
    (PTM first when ``ptm``); class_task (C,) the task of each class. Returns (B, C)."""
    cos = torch.einsum("bsd,csd->bcs", F.normalize(feats, dim=-1), F.normalize(protos, dim=-1))
    S = feats.shape[1]
    shift = 1 if ptm else 0
    sub = torch.arange(S, device=feats.device) - shift  # the adapter index of each subspace
    diag = sub[None, :] == class_task[:, None].to(feats.device)  # (C, S)
    off = alpha / t if t > 0 else 0.0
    w = torch.where(diag, torch.ones_like(diag, dtype=cos.dtype), torch.full_like(diag, off, dtype=cos.dtype))
    if ptm:
        w[:, 0] = beta
    return (cos * w[None]).sum(-1)


@register_method("ease")
class EASE(ContinualMethod):
    """Adapter per task, prototypes per subspace with semantic-guided complement, reweighted cosine."""

    prompt_based = False  # a first-session / backbone-training method, not a prompt method

    @dataclass
    class Config:
        bottleneck: int = 64  # ffn_num (VTAB: 16)
        adapter_scale: float = 0.1
        adapter_dropout: float = 0.1
        alpha: float = 0.1  # off-diagonal subspace weight (CUB in21k: 0.05)
        beta: float = 0.0  # PTM subspace weight (only with use_init_ptm)
        use_init_ptm: bool = False  # the frozen PTM as an extra subspace (CUB in1k config)

        def validate(self) -> None:
            if self.bottleneck < 1:
                raise ConfigError(f"method.bottleneck must be at least 1, got {self.bottleneck}")
            if self.alpha < 0 or self.beta < 0:
                raise ConfigError("method.alpha and method.beta must not be negative")
            if not 0.0 <= self.adapter_dropout < 1.0:
                raise ConfigError(f"method.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")

    def __init__(self, backbone: PromptedViT, num_classes: int, cfg: Any, num_tasks: int = 10) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        self.num_tasks = num_tasks
        self.adapters = nn.ModuleList()  # one per task, allocated in begin_task
        self.proxy: Optional[nn.Module] = None  # the current task's proxy_fc
        width = (num_tasks + int(cfg.use_init_ptm)) * backbone.embed_dim
        self.register_buffer("prototypes", torch.zeros(num_classes, width))

    @property
    def uses_query(self) -> bool:  # type: ignore[override]
        return self.cfg.use_init_ptm  # the PTM subspace is the query pass

    # -- life cycle -------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        cfg, dev = self.cfg, self.prototypes.device
        while len(self.adapters) <= task.index:  # a fresh adapter, not a copy of the last one
            self.adapters.append(AdapterPEFT(self.backbone, cfg.bottleneck, cfg.adapter_scale, cfg.adapter_dropout).to(dev))
        self.proxy = first_session_head(task.class_end - task.class_start, self.backbone.embed_dim).to(dev)
        for i, a in enumerate(self.adapters):
            a.requires_grad_(i == task.index)

    def phases(self, task: Task) -> List[Phase]:
        return [Phase("train", forward_kwargs={"adapt": True}, needs_query=False)]

    def param_groups(self) -> List[Dict[str, Any]]:
        params = list(self.adapters[self.current_task.index].parameters()) + list(self.proxy.parameters())
        return [{"params": params, "lr_mult": 1.0, "name": "adapter+proxy"}]

    def subspace_features(self, x: Tensor, upto: int, query: Optional[Tensor] = None) -> Tensor:
        """(B, S, D): [PTM,] adapter 0..upto features, one ViT pass each."""
        feats = [self.get_query(x, query)] if self.cfg.use_init_ptm else []
        feats += [self.adapters[k].features(x) for k in range(upto + 1)]
        return torch.stack(feats, dim=1)

    def forward(self, x: Tensor, query: Optional[Tensor] = None, adapt: bool = False, **kwargs: Any) -> MethodOutput:
        task = self.current_task
        if adapt:  # forward_train: only the current adapter, the proxy head over the task's classes
            feat = self.adapters[task.index].features(x)
            return MethodOutput(logits=pad_logits(self.proxy(feat), task.class_start, self.num_classes), features=feat)
        t, d = task.index, self.backbone.embed_dim
        feats = self.subspace_features(x, t, query).float()  # fp32 cosines under bf16 autocast
        S = feats.shape[1]
        seen = task.num_seen
        protos = self.prototypes[:seen, : S * d].reshape(seen, S, d).float()
        class_task = task.task_of_class(torch.arange(seen, device=x.device))
        with torch.autocast(device_type=feats.device.type, enabled=False):
            logits = reweight_logits(feats, protos, class_task, t, self.cfg.alpha, self.cfg.beta, self.cfg.use_init_ptm)
        logits = F.pad(logits, (0, self.num_classes - seen))
        task_pred = task.task_of_class(logits[:, :seen].argmax(1))
        return MethodOutput(logits=logits, features=feats.flatten(1), diagnostics={"task_pred": task_pred})

    @torch.no_grad()
    def end_task(self, task: Task, ctx: Any) -> None:
        was = self.training
        self.eval()
        self.adapters[task.index].requires_grad_(False)
        d = self.backbone.embed_dim
        feats, labels = ctx.features(lambda x: self.subspace_features(x, task.index).flatten(1), transform="test")
        S = feats.shape[1] // d
        for c in labels.unique().tolist():
            self.prototypes[c, : S * d] = feats[labels == c].float().mean(0).to(self.prototypes.device)
        complement_prototypes(self.prototypes, task.class_offsets, task.index, d, self.cfg.use_init_ptm)
        self.train(was)

    def state_numbers(self) -> Dict[str, int]:
        return {"class_prototypes": self.prototypes.numel()}
