"""SMoPE: one shared prompt as a sparse mixture of prefix experts (Le et al., ICLR 2026).

Faithful to the reference code's effective behaviour (GitHub ``Minhchuyentoancbn/SMoPE`` at
``27b982c``; facts in ../shared/reference/smope.md). Paths below are that repository's.

Architecture (``models/zoo.py`` ``OnePrompt``, ``models/vit.py`` ``Attention``):

* one prompt shared by all tasks: on each prompted layer (0-5) ``N_p`` experts, each with one key
  and one value per head, learned directly in post-projection per-head space, init U[0,1);
* proxy score per layer, head and sample: ``q̄ = mean_tokens(q)``, ``s̄_j = q̄·p^K_j`` (raw);
* sparse mode: per sample and head the top-K of ``s̄_j − ε_j``; the prompt logits are recomputed
  from the *raw* scores, ``s̄_j/√d_h``, broadcast over the N query rows, and one softmax runs over
  [prompt logits; qkᵀ/√d_h]; the output is attn @ [selected values; v]. Dense mode (first-task
  warm-up, or ``topk ≤ 0``): every expert. A single forward pass, no query pass. The dense
  ablation (``topk ≤ 0``) keeps the task-0 dense warm-up and has no router, prototype loss or
  usage counting, as the reference (its loss loops run over ``range(topk)``).

This is written with :class:`methods.vit.PrefixProvider`: zero prefix keys plus a logit bias
``s̄_j/√d_h`` of shape (B, H, 1, K) give exactly the broadcast prompt logits (q·0 = 0).

Adaptive noise (``OnePrompt.process_task_count`` / ``forward`` / ``update_prompt``): cumulative
usage counters F per (layer, head, expert), filled after each task by a "selecting experts" pass
over the training loader (eval mode, train-time augmentation, top-K of the raw scores); at the
start of each task t ≥ 1 experts with F ≥ threshold are flagged "used frequently" (sticky flags);
during training flagged experts lose ``ε·(max_j s̄_j − min_j s̄_j)`` in the selection only.

Losses (``OnePrompt.router_loss``): L = CE (current-task classes) + α_router·L_router +
α_proto·L_proto, see :func:`router_loss` and :func:`proto_loss`.

Protocol (``learners/prompt.py`` ``OnePrompt.learn_batch``, ``trainer.py``): task 0 starts with a
dense warm-up phase (half the epochs, fresh optimiser and schedule); prompts train at 5× the head's
lr (AdamW, wd 0); after each task the usage pass, then class statistics of prompted LN-CLS
features (train augmentation, eval mode) and, for t ≥ 1, classifier alignment on features sampled
from the class Gaussians (``Trainer._compute_mean`` / ``train_task_adaptive_prediction``).

Where the code and the paper (poster) disagree, the code is the default (docs/methods-smope.md):

* ``usage_threshold``: ``used`` = ΣF / #{F > 0} (code) | ``all`` = ΣF / N_p (paper);
* ``ban_unused``: the live reference model subtracts ``2·(max−min)`` from experts never selected
  (F = 0) whenever it runs outside training. Its reported numbers come from reloaded checkpoints
  whose counters are 0 (not saved), so evaluation there is plain top-K. ``internal`` (default):
  the ban applies in the passes the reference runs on the live model (usage pass, class
  statistics), not in evaluation; ``always``: also in evaluation; ``never``: nowhere (paper);
* usage counters and flags are buffers, so they are saved with the checkpoint (the reference
  keeps them as Python ints and loses them).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.alignment import AlignConfig, ClassStats, align_classifier
from methods.base import ContinualMethod, MethodOutput, Phase, Task
from methods.prompts import uniform_parameter
from methods.registry import register_method
from methods.vit import Prefix

THRESHOLDS = ("used", "all")
BAN_MODES = ("internal", "always", "never")
CA_METHODS = ("multi-centroid", "covariance")


# --- losses (module level so that tests can check them on hand-made tensors) -----------------

def router_loss(scores: Tensor, selected: Tensor, eps: float) -> Tensor:
    """SMoPE's router ("top-K sharpening") loss of one layer, summed over heads and experts.

    ``scores`` (B, H, E) raw proxy scores s̄; ``selected`` (B, H, K) the experts chosen (from the
    *noised* scores). Non-selected experts are raised by ``eps·(max−min)`` (max / min per sample
    and head, no gradient), then for each selected j: −log softmax(z)_j, mean over the batch,
    summed over heads and the K selected experts (``OnePrompt.router_loss``, first block).
    """
    s = scores.float()
    with torch.no_grad():
        spread = s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)
        not_sel = torch.ones_like(s).scatter(-1, selected, 0.0)
    z = s + eps * spread * not_sel
    picked = z.log_softmax(-1).gather(-1, selected)  # (B, H, K)
    return -picked.mean(0).sum()


def proto_loss(old_keys: Tensor, keys: Tensor, frequent: Tensor, k: int) -> Tensor:
    """SMoPE's prototype loss of one layer, summed over heads.

    ``old_keys`` / ``keys`` (H, E, d) snapshot and current prefix keys; ``frequent`` (H, E) flags.
    Each flagged expert's *old* key p is a prototype: K_p = top-k of p·(old keys), and the loss is
    Σ_{j∈K_p} −log softmax(p·(current keys))_j, averaged over the prototypes of the head
    (``OnePrompt.router_loss``, second block). A head without prototypes contributes 0 (the
    reference would produce NaN there, which its thresholds never allow).
    """
    old = old_keys.float().detach()
    cur = keys.float()
    targets = (old @ old.transpose(-1, -2)).topk(k, dim=-1).indices  # (H, E, k)
    logp = (old @ cur.transpose(-1, -2)).log_softmax(-1)  # (H, E, E): prototype e vs current keys
    per_proto = -logp.gather(-1, targets).sum(-1)  # (H, E)
    w = frequent.to(per_proto.dtype)
    return ((per_proto * w).sum(-1) / w.sum(-1).clamp(min=1.0)).sum()


# --- the per-forward router (a methods.vit.PrefixProvider) -------------------------------------

class ExpertRouter:
    """Proxy-score routing for one forward pass; records raw scores and selections per layer.

    ``coef`` (L, H, E) multiplies ``max−min`` and is subtracted from the raw scores before the
    top-K (training noise ``ε`` on flagged experts, or the ban coefficient on unused ones).
    """

    def __init__(self, keys: Tensor, values: Tensor, layers: List[int], topk: int,
                 coef: Optional[Tensor] = None) -> None:
        self.keys, self.values = keys, values  # (L, H, E, d)
        self.layers = list(layers)
        self._pos = {layer: i for i, layer in enumerate(self.layers)}
        self.topk = topk
        self.coef = coef
        self.scores: Dict[int, Tensor] = {}  # layer -> (B, H, E) raw s̄, with gradient
        self.selected: Dict[int, Tensor] = {}  # layer -> (B, H, K) expert ids

    @property
    def dense(self) -> bool:
        return self.topk <= 0

    def __call__(self, layer: int, q: Tensor) -> Prefix:
        i = self._pos[layer]
        keys, values = self.keys[i], self.values[i]  # (H, E, d)
        b, dh = q.shape[0], q.shape[-1]
        # scores in fp32 even under bf16 autocast (the reference runs fp32): bf16 rounding would
        # create ties in the top-K and coarsen the router loss
        with torch.autocast(device_type=q.device.type, enabled=False):
            qbar = q.float().mean(dim=2)  # (B, H, d): mean over all N tokens, [CLS] included
            s = torch.einsum("bhd,hed->bhe", qbar, keys.float())
        self.scores[layer] = s
        if self.dense:
            e = keys.shape[1]
            self.selected[layer] = torch.arange(e, device=s.device).expand(b, keys.shape[0], e)
            return Prefix(key=None, value=values.unsqueeze(0), bias=(s / math.sqrt(dh)).unsqueeze(2))
        with torch.no_grad():
            label = s
            if self.coef is not None:
                spread = s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)
                label = s - self.coef[i].to(s.dtype) * spread
            idx = label.topk(self.topk, dim=-1).indices  # (B, H, K)
        self.selected[layer] = idx
        # logits from the raw scores: the noise changes the choice, never the weights
        logit = s.gather(-1, idx) / math.sqrt(dh)
        sel_v = values.unsqueeze(0).expand(b, -1, -1, -1).gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, dh))
        return Prefix(key=None, value=sel_v, bias=logit.unsqueeze(2))

    def selection(self) -> Tensor:
        """(B, L, H, K) expert ids of every prompted layer."""
        return torch.stack([self.selected[layer] for layer in self.layers], dim=1)


# --- the method --------------------------------------------------------------------------------

@register_method("smope")
class SMoPE(ContinualMethod):
    """Sparse mixture of prefix experts with adaptive noise, router / prototype losses and CA."""

    @dataclass
    class Config:
        num_experts: int = 25  # N_p (the reference's prompt length a1 = 2·N_p = 50)
        topk: int = 5  # K; ≤ 0: dense everywhere
        layers: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
        prompt_lr_mult: float = 5.0  # prompt keys/values lr = 5 × head lr (HiDe "larger_prompt_lr")
        # adaptive noise
        noise: bool = True
        eps: float = 0.4  # ε: noise scale and the router-loss margin
        usage_threshold: str = "used"  # used: ΣF/#{F>0} (code) | all: ΣF/N_p (paper)
        ban_unused: str = "internal"  # internal (code, reported numbers) | always | never (paper)
        ban_coef: float = 2.0
        # losses
        router_loss: bool = True
        alpha_router: float = 1e-5
        proto_loss: bool = True
        alpha_proto: float = 1e-5
        # first-task dense warm-up (reference: int(0.5 × epochs) epochs, fresh optimiser)
        dense_warmup: bool = True
        warmup_epochs: int = 10
        # classifier alignment (the reference's adaptive_pred)
        adaptive_pred: bool = True
        ca_method: str = "multi-centroid"  # multi-centroid (diagonal) | covariance
        ca_centroids: int = 1
        ca_epochs: int = 50  # 60 for ImageNet-R 5-task
        ca_lr: float = 1e-4
        ca_weight_decay: float = 5e-4
        ca_batch_size_ratio: float = 1.0  # draws per class = train batch × ratio

        def validate(self) -> None:
            if self.num_experts < 1:
                raise ConfigError(f"method.num_experts must be at least 1, got {self.num_experts}")
            if self.topk > self.num_experts:
                raise ConfigError(f"method.topk={self.topk} exceeds method.num_experts={self.num_experts}")
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"method.layers must be distinct non-negative block indices, got {self.layers}")
            if self.usage_threshold not in THRESHOLDS:
                raise ConfigError(f"unknown method.usage_threshold '{self.usage_threshold}'; use {' or '.join(THRESHOLDS)}")
            if self.ban_unused not in BAN_MODES:
                raise ConfigError(f"unknown method.ban_unused '{self.ban_unused}'; use {', '.join(BAN_MODES)}")
            if self.ca_method not in CA_METHODS:
                raise ConfigError(f"unknown method.ca_method '{self.ca_method}'; use {' or '.join(CA_METHODS)}")
            if self.eps < 0 or self.warmup_epochs < 0 or self.ca_epochs < 0 or self.ca_batch_size_ratio <= 0:
                raise ConfigError("method.eps, warmup_epochs and ca_epochs must be non-negative and ca_batch_size_ratio positive")

    uses_query = False

    def __init__(self, backbone, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        if max(cfg.layers) >= backbone.depth:
            raise ConfigError(f"method.layers {cfg.layers} needs a backbone with more than {max(cfg.layers)} blocks; it has {backbone.depth}")
        self.layers = sorted(cfg.layers)
        n_l, h, e, dh = len(self.layers), backbone.num_heads, cfg.num_experts, backbone.head_dim
        self.selection_size = e
        self.keys = uniform_parameter(n_l, h, e, dh)  # p^K per (layer, head, expert), U[0,1)
        self.values = uniform_parameter(n_l, h, e, dh)  # p^V
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        self.register_buffer("usage", torch.zeros(n_l, h, e, dtype=torch.long))  # cumulative F
        self.register_buffer("frequent", torch.zeros(n_l, h, e, dtype=torch.bool))  # sticky flags
        # np.var (ddof 0) and skipping all-zero-variance centroids, as trainer.py _compute_mean /
        # train_task_adaptive_prediction do
        self.stats = ClassStats(cfg.ca_method, n_centroids=cfg.ca_centroids, unbiased=False, skip_zero_variance=True)
        # snapshot of the keys at the start of the task, the prototypes of L_proto. A buffer so
        # that a run resumed in the middle of a task restores it (the runner replays begin_task
        # before loading the state, and the reference does not save it at all)
        self.register_buffer("old_keys", torch.zeros(n_l, h, e, dh))
        self.alignment_log: List[Dict[str, Any]] = []

    # -- life cycle -----------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if task.index >= 1:  # OnePrompt.process_task_count
            with torch.no_grad():
                self.old_keys.copy_(self.keys)
            self.update_flags()

    @torch.no_grad()
    def update_flags(self) -> None:
        """Flag experts with F ≥ threshold per (layer, head); flags are never cleared."""
        f = self.usage.double()
        if self.cfg.usage_threshold == "used":
            thr = f.sum(-1, keepdim=True) / (f > 0).sum(-1, keepdim=True).clamp(min=1)
        else:
            thr = f.sum(-1, keepdim=True) / f.shape[-1]
        self.frequent |= f >= thr

    def phases(self, task: Task) -> List[Phase]:
        main = Phase("train")
        # the reference runs the dense warm-up in task 0 whatever K is (learn_batch), so the dense
        # ablation (topk <= 0) has it too: both phases are then dense
        if task.index == 0 and self.cfg.dense_warmup and self.cfg.warmup_epochs > 0:
            return [Phase("dense_warmup", train={"epochs": self.cfg.warmup_epochs}, forward_kwargs={"dense": True}), main]
        return [main]

    def param_groups(self) -> List[Dict[str, Any]]:
        return [
            {"params": [self.keys, self.values], "lr_mult": self.cfg.prompt_lr_mult, "name": "prompt"},
            {"params": list(self.head.parameters()), "lr_mult": 1.0, "name": "head"},
        ]

    # -- forward --------------------------------------------------------------------------
    def router(self, dense: bool = False, ban: Optional[bool] = None) -> ExpertRouter:
        """The prefix provider for one pass in the current mode (train: noise; eval: ban)."""
        coef = None
        if self.training:
            if self.cfg.noise and bool(self.frequent.any()):
                coef = self.cfg.eps * self.frequent.float()
        else:
            if ban is None:
                ban = self.cfg.ban_unused == "always"
            if ban:
                coef = self.cfg.ban_coef * (self.usage == 0).float()
        return ExpertRouter(self.keys, self.values, self.layers, -1 if dense else self.cfg.topk, coef)

    def forward(self, x: Tensor, query: Optional[Tensor] = None, dense: bool = False,
                ban: Optional[bool] = None, **kwargs: Any) -> MethodOutput:
        router = self.router(dense, ban)
        feat = self.backbone(x, prefix=router)
        logits = self.head(feat)
        aux = None
        if self.training:
            with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 losses, as the reference
                aux = self.aux_losses(router)
        return MethodOutput(logits=logits, aux_loss=aux, features=feat, diagnostics={"selection": router.selection()})

    def aux_losses(self, router: ExpertRouter) -> Optional[Tensor]:
        """α_router·L_router (sparse mode) + α_proto·L_proto (from task 1 on)."""
        cfg = self.cfg
        total: Optional[Tensor] = None
        if cfg.router_loss and cfg.alpha_router > 0 and not router.dense:
            l_router = sum(router_loss(router.scores[l], router.selected[l], cfg.eps) for l in self.layers)
            total = cfg.alpha_router * l_router
        task = self.current_task
        # the reference sums K terms (``for i in range(self.topk)``): none when K = 0, the dense
        # ablation, so no prototype loss there (for K < 0 its torch.topk would raise; the suite
        # treats every K <= 0 as the dense ablation)
        if cfg.proto_loss and cfg.alpha_proto > 0 and cfg.topk > 0 and task is not None and task.index > 0:
            k = min(cfg.topk, cfg.num_experts)
            lp = sum(proto_loss(self.old_keys[i], self.keys[i], self.frequent[i], k) for i in range(len(self.layers)))
            total = cfg.alpha_proto * lp if total is None else total + cfg.alpha_proto * lp
        return total

    # -- end of task ----------------------------------------------------------------------
    def internal_ban(self) -> bool:
        return self.cfg.ban_unused in ("internal", "always")

    @torch.no_grad()
    def count_usage(self, loader: Any, device: torch.device, autocast: Any = None) -> int:
        """The reference's "Selecting Experts" pass: add the top-K of the raw scores per sample,
        layer and head to F, batch by batch (the live ban of later batches sees earlier counts)."""
        was = self.training
        self.eval()
        n = 0
        e = self.cfg.num_experts
        try:
            for x, *_ in loader:
                router = self.router(ban=self.internal_ban())
                with autocast() if autocast is not None else contextlib.nullcontext():
                    self.backbone(x.to(device, non_blocking=True), prefix=router)
                for i, layer in enumerate(self.layers):
                    top = router.scores[layer].float().topk(self.cfg.topk, dim=-1).indices  # (B, H, K)
                    onehot = F.one_hot(top, e).sum(dim=(0, 2))  # (H, E)
                    self.usage[i] += onehot.to(self.usage.dtype)
                n += len(x)
        finally:
            self.train(was)
        return n

    def end_task(self, task: Task, ctx: Any) -> None:
        cfg = self.cfg
        tcfg = ctx.cfg.train
        if cfg.topk > 0:
            loader = ctx.train_loader("train", shuffle=True, batch_size=tcfg.batch_size)
            n = self.count_usage(loader, ctx.device, ctx.autocast)
            ctx.log(f"smope: counted expert usage on {n} training images")
        if not cfg.adaptive_pred:
            return
        self.eval()
        self.stats.seed = ctx.cfg.seed
        ban = self.internal_ban()
        feats, labels = ctx.features(lambda x: self.backbone(x, prefix=self.router(ban=ban)), transform="train")
        self.stats.add_all(feats, labels)
        if task.index >= 1:
            acfg = AlignConfig(
                epochs=cfg.ca_epochs, lr=cfg.ca_lr, optimizer="adamw", weight_decay=cfg.ca_weight_decay,
                schedule="smope", min_lr=1e-6, samples_per_class=max(1, int(tcfg.batch_size * cfg.ca_batch_size_ratio)),
                iterations="old_classes",
            )
            self.train()  # trainer.train_task_adaptive_prediction; only the head is involved
            info = align_classifier(self.head, list(self.head.parameters()), self.stats, task.num_seen, task.num_old,
                                    acfg, ctx.generator("smope-align"), ctx.device, mask_seen=True)
            self.eval()
            self.alignment_log.append({"task": task.index, **info})
            ctx.log(f"smope: classifier alignment, {info['iterations']} iterations, last loss {info['last_loss']:.4f}")

    # -- reporting ------------------------------------------------------------------------
    def diagnostics(self) -> Dict[str, Any]:
        return {
            "layers": self.layers,
            "usage_counts": self.usage.tolist(),  # [layer][head][expert], cumulative F
            "usage_per_layer": self.usage.sum(1).tolist(),  # [layer][expert], summed over heads
            "frequent": self.frequent.tolist(),  # [layer][head][expert] "used frequently" flags
            "frequent_per_layer": self.frequent.sum(dim=(1, 2)).tolist(),
            "alignment": self.alignment_log,
        }

    def state_numbers(self) -> Dict[str, int]:
        return {"usage_counters": self.usage.numel(), "usage_flags": self.frequent.numel(),
                "class_statistics": self.stats.numbers(), "old_key_snapshot": self.old_keys.numel()}

    def get_extra_state(self) -> Dict[str, Any]:
        return {"alignment": list(self.alignment_log)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.alignment_log = list(state.get("alignment", []))
