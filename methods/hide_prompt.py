"""HiDe-Prompt (Wang et al., NeurIPS'23): task-identity inference + task prompts + task-adaptive head.

Reference: thu-ml/HiDe-Prompt @ 0ed4333 (``trainers/tii_trainer.py``,
``engines/hide_tii_engine.py``, ``trainers/hideprompt_trainer.py``,
``engines/hide_promtp_wtp_and_tap_engine.py``, ``peft/prompt/hide_prompt.py``,
``vits/hide_prompt_vision_transformer.py``, ``configs/*_hideprompt_5e.py``,
``training_scripts/train_{cifar100,imr,cub}_vit.sh``). The reference runs two separate
training runs (stage 1 writes one TII checkpoint per task, stage 2 reads them); here both stages
run inside one ``bench.py run``, interleaved per task:

* **Phase "tii"** (stage 1): the TII network -- ``MlpMapping`` (LayerNorm(x + W2·GELU(W1·x)),
  hidden width 2D) followed by a linear head over all classes -- trained on the frozen,
  un-prompted [CLS] of the (augmented) training images with the current-task logit mask. Adam,
  constant lr 5e-4·B/256 (CUB 1e-2), 20 epochs, clip 1.0.
* **Phase "prompt"** (stage 2): one prefix E-prompt per task on blocks 0-4 (length L = L key
  + L value tokens, the JH-LEE convention; no keys, no G-prompt), the ground-truth prompt t
  forced (``use_prompt_mask`` with ``train=True``), the prompt ensemble
  p̃_t = (1-α)·p_t + α·mean(p_0..p_{t-1}) with the mean detached (``prompt_momentum``), prompt
  t copied from t-1 at task start (``shared_prompt_pool``), head lr ×0.1 with
  ``larger_prompt_lr``. Loss CE(current-task mask) + reg·L_CR (:func:`contrastive_regulariser`).
  The reference also runs the stage-1 network on every training batch and throws its prediction
  away; this phase skips that pass (``needs_query=False``).
* ``end_task``: (1) class statistics of the frozen features (eval transform) and, for t>0, TII
  alignment of MLP+head on sampled features; (2) the ensemble written permanently into p_t;
  (3) statistics of the instructed features (prompt t, eval transform, eval mode) and, for t>0,
  TAP alignment of the head.
* Inference: TII argmax over the seen classes -> task per sample -> that task's prompt -> the
  TAP head. ``diagnostics['task_pred']`` feeds the protocol's TII accuracy matrix.

Which stage-1 model does stage 2 use? ``engines/hide_promtp_wtp_and_tap_engine.py::
train_and_evaluate`` loads ``<trained_original_model>/checkpoint/task{t+1}_checkpoint.pth`` at
the start of task t, i.e. the TII network *of task t* (saved by
``engines/hide_tii_engine.py::train_and_evaluate`` after its alignment), and uses it for the
evaluation after task t (``trainers/hideprompt_trainer.py`` does the same per task in ``--eval``).
Stage 1 never reads anything from stage 2, so training the TII network of task t (and aligning
it) before evaluating task t gives exactly the reference's pairing.

Reference behaviours kept (and where the code differs from the paper, see
docs/methods-hide-prompt.md): 10 k-means centroids with per-dimension *population* variance
(``np.var``) instead of the paper's mean+covariance (``stats_mode: covariance`` is the paper's);
zero-variance (singleton) centroids are skipped when sampling; the TII head is an MLP; training
uses the ground-truth prompt; L_CR has no L2 normalisation; alignment weight decay is 0 (the
``--weight-decay``/``--weight_decay`` shadowing, baselines.md §4.3); stage-1 ``ca_lr`` is
scaled by B/256, stage-2 ``ca_lr`` is not; draws per class per centroid = the per-device batch
(TII) and 5× it (TAP), with (#classes of earlier tasks) iterations per alignment epoch.

Reference behaviours exposed as options, off by default:

* ``reshape_quirk``: ``EPrompt.forward`` gathers prompts as (layers, 2, B, L, H, d_h) and
  *reshapes* them to (layers, B, 2, L, H, d_h) (JH-LEE-KR/dualprompt-pytorch#8, inherited). With
  one prompt for the whole batch (training) the first half of the batch gets the key tokens as
  both key and value prefix and the second half the value tokens; with per-sample TII prompts a
  sample gets other samples' prompts, so its prediction depends on its test batch, which the
  suite's per-sample protocol forbids (DESIGN.md §4). Same switch and default as methods/dualprompt.py.
* ``device_batch``: the scripts launch 8 processes × 24 images (``--nproc_per_node=8``); L_CR
  (and the reshape quirk) act on each process's 24 images. ``device_batch: 24`` with
  ``train.batch_size: 192`` reproduces that in one process (DDP's averaged gradients equal the
  mean of the per-chunk losses).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.alignment import AlignConfig, ClassStats, align_classifier
from methods.base import ContinualMethod, MethodOutput, Phase, Task
from methods.registry import register_method
from methods.vit import PrefixSpec, prefix_from_kv

DEFAULT_POOL = 10  # the reference's --size: one prompt per task of its 10-task benchmarks


class MlpMapping(nn.Module):
    """The TII network's feature mapping (``vits/hide_prompt_vision_transformer.py::MlpMapping``).

    ``hidden`` lists width multipliers; the reference's ``--original_model_mlp_structure 2`` is
    LayerNorm(x + Linear(2D→D)(GELU(Linear(D→2D)(x)))). As in the reference, the last linear has
    no activation, and the middle linear of a deeper mapping is followed by a LayerNorm instead
    of GELU. (Dropout is 0 in every reference config and is omitted.)
    """

    def __init__(self, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MlpMapping needs at least one hidden width (use nn.Identity for none)")
        widths = [dim] + [dim * h for h in hidden] + [dim]
        n = len(hidden)
        blocks = []
        for i in range(n + 1):
            lin = nn.Linear(widths[i], widths[i + 1])
            if i == n:
                blocks.append(nn.Sequential(lin))
            elif i == n // 2 and i != 0:
                blocks.append(nn.Sequential(lin, nn.LayerNorm(widths[i + 1])))
            else:
                blocks.append(nn.Sequential(lin, nn.GELU()))
        self.net = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.net(x) + x)


def contrastive_regulariser(features: Tensor, centroids: Optional[Tensor], temperature: float = 0.8,
                            chunk: Optional[int] = None) -> Tensor:
    """HiDe's contrastive regulariser L_CR (``orth_loss`` in the stage-2 engine).

    M = [centroids; features] (stored instructed-feature centroids of every earlier class, then
    the batch's instructed [CLS]), S = M Mᵀ / τ with no L2 normalisation, and the cross-entropy
    of S's rows against their own index, averaged over *all* rows (centroid rows included). With
    no centroids (task 0) it is the batch alone. ``chunk`` computes it per chunk of the batch and
    averages (one loss per device in the reference's data-parallel run). Computed in fp32
    outside autocast: S holds squared feature norms / 0.8, far outside bf16's precision.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float()
        c = f.new_zeros(0, f.shape[1]) if centroids is None or centroids.numel() == 0 else centroids.to(f)
        losses = []
        for part in (f.split(chunk) if chunk else (f,)):
            m = torch.cat([c, part])
            sim = m @ m.T / temperature
            losses.append(F.cross_entropy(sim, torch.arange(len(m), device=m.device)))
        return torch.stack(losses).mean()


def reshape_quirk_layout(prompts: Tensor, chunk: Optional[int] = None) -> Tensor:
    """What the reference feeds each sample, given the per-sample prompts (B, layers, 2, L, D).

    ``peft/prompt/hide_prompt.py::EPrompt.forward`` indexes its (layers, 2, pool, L, H, d_h)
    parameter to (layers, 2, B, L, H, d_h) and reshapes -- without permuting -- to
    (layers, B, 2, L, H, d_h). Per chunk of ``chunk`` samples (one device's batch).
    """
    out = []
    for part in (prompts.split(chunk) if chunk else (prompts,)):
        b, n = part.shape[:2]
        raw = part.permute(1, 2, 0, 3, 4)  # (layers, 2, b, L, D), as the reference gathers it
        out.append(raw.reshape(n, b, 2, *part.shape[3:]).permute(1, 0, 2, 3, 4))
    return torch.cat(out)


def _init_linear(module: nn.Module) -> None:
    # timm's init_weights_vit_timm, which the reference's VisionTransformer applies to its head
    # and MlpMapping: trunc_normal(std .02) weights, zero biases.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


@register_method("hide_prompt")
class HiDePrompt(ContinualMethod):
    """HiDe-Prompt: TII network + one prefix prompt per task + task-adaptive (TAP) head."""

    @dataclass
    class Config:
        # stage 2: task prompts (WTP)
        prompt_length: int = 5  # L key + L value tokens per prompted block (CIFAR 5, ImageNet-R / CUB 20)
        prompt_layers: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
        pool_size: Optional[int] = None  # None: one prompt per task of the scenario (reference --size 10)
        prompt_init: str = "uniform"  # uniform: U(-1,1) (reference) | zero
        shared_prompt_pool: bool = True  # copy prompt t-1 into prompt t at task start
        prompt_momentum: float = 0.01  # α of the prompt ensemble (0.1 in the CIFAR SSL scripts)
        reg: float = 0.1  # weight of L_CR (CIFAR 0.1, ImageNet-R 0.5, CUB 0.01)
        cr_temperature: float = 0.8
        larger_prompt_lr: bool = True  # head lr ×0.1 (CIFAR / ImageNet-R scripts; not CUB)
        reshape_quirk: bool = False  # reproduce EPrompt's key/value reshape (module doc)
        device_batch: Optional[int] = None  # per-device batch of the reference launch (module doc)
        # class statistics (both sets)
        stats_mode: str = "multi-centroid"  # multi-centroid (code default) | covariance (paper) | variance (code option)
        n_centroids: int = 10
        stats_unbiased: bool = False  # False: np.var's population variance, as the reference
        skip_zero_variance: bool = True  # skip singleton centroids when sampling, as the reference
        # TAP alignment of the head (stage 2, t > 0)
        tap_align: bool = True  # the reference's --not_train_ca switches it off
        tap_epochs: int = 30
        tap_lr: float = 0.005  # not batch-scaled (only stage 1 scales ca_lr)
        tap_samples_per_class: Optional[int] = None  # per centroid; None: 5 × per-device batch
        # stage 1: the TII network
        tii_epochs: int = 20
        tii_lr: float = 5e-4  # scaled like train.lr (× batch / lr_scale_batch); CUB 1e-2
        tii_optimizer: str = "adam"
        tii_schedule: str = "constant"
        tii_clip_grad: Optional[float] = 1.0
        tii_mlp_structure: List[int] = field(default_factory=lambda: [2])  # [] : linear TII head only
        tii_align: bool = True
        tii_align_epochs: int = 30
        tii_align_lr: float = 0.005  # scaled like train.lr (stage 1 scales ca_lr)
        tii_samples_per_class: Optional[int] = None  # per centroid; None: the per-device batch

        def validate(self) -> None:
            if self.prompt_length < 1:
                raise ConfigError(f"method.prompt_length must be at least 1, got {self.prompt_length}")
            if not self.prompt_layers or len(set(self.prompt_layers)) != len(self.prompt_layers) or min(self.prompt_layers) < 0:
                raise ConfigError(f"method.prompt_layers must be distinct block indices, got {self.prompt_layers}")
            if self.prompt_init not in ("uniform", "zero"):
                raise ConfigError(f"unknown method.prompt_init '{self.prompt_init}'; use uniform or zero")
            if self.stats_mode not in ("multi-centroid", "covariance", "variance"):
                raise ConfigError(f"unknown method.stats_mode '{self.stats_mode}'; use multi-centroid, covariance or variance")
            if not 0.0 <= self.prompt_momentum <= 1.0:
                raise ConfigError(f"method.prompt_momentum must lie in [0, 1], got {self.prompt_momentum}")
            if self.reg < 0 or self.cr_temperature <= 0:
                raise ConfigError("method.reg must be ≥ 0 and method.cr_temperature > 0")
            for name in ("pool_size", "device_batch", "tap_samples_per_class", "tii_samples_per_class"):
                v = getattr(self, name)
                if v is not None and v < 1:
                    raise ConfigError(f"method.{name} must be at least 1 (or null), got {v}")
            if self.n_centroids < 1 or min(self.tii_mlp_structure, default=1) < 1:
                raise ConfigError("method.n_centroids and the method.tii_mlp_structure widths must be at least 1")
            for name in ("tap_epochs", "tii_epochs", "tii_align_epochs"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"method.{name} must be ≥ 0, got {getattr(self, name)}")

    uses_query = True

    def __init__(self, backbone, num_classes: int, cfg: Any, num_tasks: Optional[int] = None) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        if max(cfg.prompt_layers) >= backbone.depth:
            raise ConfigError(f"method.prompt_layers {cfg.prompt_layers} exceed the backbone's {backbone.depth} blocks")
        if cfg.pool_size is not None and num_tasks is not None and cfg.pool_size < num_tasks:
            # checked here too (not only in begin_task) so that the run fails before any file is written
            raise ConfigError(f"method.pool_size={cfg.pool_size} is smaller than the {num_tasks} tasks; "
                              "HiDe-Prompt needs one prompt per task")
        d = backbone.embed_dim
        self.tii_mlp: nn.Module = MlpMapping(d, cfg.tii_mlp_structure) if cfg.tii_mlp_structure else nn.Identity()
        self.tii_head = nn.Linear(d, num_classes)
        self.head = nn.Linear(d, num_classes)  # the TAP head
        _init_linear(self.tii_mlp)
        _init_linear(self.tii_head)
        _init_linear(self.head)
        self.prompts = nn.ParameterList()
        self._grow_pool(cfg.pool_size or num_tasks or DEFAULT_POOL)
        stats = dict(mode=cfg.stats_mode, n_centroids=cfg.n_centroids, unbiased=cfg.stats_unbiased,
                     skip_zero_variance=cfg.skip_zero_variance)
        self.tii_stats = ClassStats(**stats)  # frozen (uninstructed) features, stage 1
        self.tap_stats = ClassStats(**stats)  # instructed features, stage 2
        self.align_log: List[Dict[str, Any]] = []
        self._centroid_cache: Optional[tuple] = None

    # -- prompts ------------------------------------------------------------------------------
    def _grow_pool(self, size: int) -> None:
        cfg = self.cfg
        dev = self.head.weight.device
        while len(self.prompts) < size:
            p = torch.zeros(len(cfg.prompt_layers), 2, cfg.prompt_length, self.backbone.embed_dim, device=dev)
            if cfg.prompt_init == "uniform":
                nn.init.uniform_(p, -1.0, 1.0)
            self.prompts.append(nn.Parameter(p, requires_grad=False))
        self.selection_size = len(self.prompts)

    def train_prompt(self, t: int) -> Tensor:
        """Prompt t as used in training: the ensemble (1-α)·p_t + α·mean(p_<t).detach() for t>0."""
        p = self.prompts[t]
        a = self.cfg.prompt_momentum
        if t == 0 or a <= 0:
            return p
        earlier = torch.stack([self.prompts[i] for i in range(t)]).mean(0).detach()
        return (1 - a) * p + a * earlier

    @torch.no_grad()
    def consolidate_prompt(self, t: int) -> None:
        """Write the ensemble into p_t permanently (end of task t > 0)."""
        if t > 0 and self.cfg.prompt_momentum > 0:
            self.prompts[t].copy_(self.train_prompt(t))

    def prompt_prefix(self, prompts: Tensor) -> PrefixSpec:
        """Per-layer prefixes from prompts (B or 1, layers, 2, L, D) (NoRGa overrides it with gated ones)."""
        h = self.backbone.num_heads
        return {layer: prefix_from_kv(prompts[:, i, 0], prompts[:, i, 1], h) for i, layer in enumerate(self.cfg.prompt_layers)}

    def prompted_features(self, x: Tensor, prompts: Tensor) -> Tensor:
        """Instructed [CLS] of ``x`` with ``prompts`` (B, layers, 2, L, D), or one prompt for all (1, ...)."""
        if self.cfg.reshape_quirk:
            prompts = reshape_quirk_layout(prompts.expand(x.shape[0], *prompts.shape[1:]), self.cfg.device_batch)
        return self.backbone(x, prefix=self.prompt_prefix(prompts))

    # -- TII ------------------------------------------------------------------------------------
    def tii_logits(self, q: Tensor) -> Tensor:
        """Stage-1 network: class logits of the frozen query features."""
        return self.tii_head(self.tii_mlp(q))

    def predict_task(self, q: Tensor) -> Tensor:
        """Task index per sample: TII argmax over the seen classes, mapped class -> task."""
        task = self.current_task
        logits = self.tii_logits(q)
        if task is None:  # no task started (e.g. a cost-counting pass): every sample uses prompt 0
            return torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return task.task_of_class(logits[:, : task.num_seen].argmax(1))

    # -- life cycle -----------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if task.num_tasks > len(self.prompts):
            if self.cfg.pool_size is not None:
                raise ConfigError(f"method.pool_size={self.cfg.pool_size} is smaller than the {task.num_tasks} tasks; "
                                  "HiDe-Prompt needs one prompt per task")
            self._grow_pool(task.num_tasks)
        t = task.index
        if t > 0 and self.cfg.shared_prompt_pool:
            with torch.no_grad():
                self.prompts[t].copy_(self.prompts[t - 1])
        for i, p in enumerate(self.prompts):
            p.requires_grad_(i == t)

    def tii_parameters(self) -> List[nn.Parameter]:
        return list(self.tii_mlp.parameters()) + list(self.tii_head.parameters())

    def phases(self, task: Task) -> List[Phase]:
        cfg = self.cfg
        tii = Phase(
            "tii",
            train={"epochs": cfg.tii_epochs, "lr": cfg.tii_lr, "optimizer": cfg.tii_optimizer, "schedule": cfg.tii_schedule,
                   "clip_grad": cfg.tii_clip_grad, "weight_decay": 0.0, "warmup_epochs": 0},
            forward_kwargs={"stage": "tii"},
            param_groups=[{"params": self.tii_parameters(), "lr_mult": 1.0, "name": "tii"}],
            needs_images=False,
            needs_query=True,
        )
        prompt = Phase("prompt", forward_kwargs={"stage": "prompt"}, param_groups=self.param_groups(), needs_query=False)
        return [tii, prompt]

    def param_groups(self) -> List[Dict[str, Any]]:
        t = self.current_task.index if self.current_task is not None else 0
        head_mult = 0.1 if self.cfg.larger_prompt_lr else 1.0
        return [{"params": [self.prompts[t]], "lr_mult": 1.0, "name": "prompt"},
                {"params": list(self.head.parameters()), "lr_mult": head_mult, "name": "head"}]

    def forward(self, x: Tensor, query: Optional[Tensor] = None, stage: Optional[str] = None, **kwargs: Any) -> MethodOutput:
        if stage == "tii":
            q = self.get_query(x, query)
            return MethodOutput(logits=self.tii_logits(q), features=q)
        if stage == "prompt" or (stage is None and self.training and self.current_task is not None):
            t = self.current_task.index
            feat = self.prompted_features(x, self.train_prompt(t)[None])
            aux = None
            if self.cfg.reg > 0:
                aux = self.cfg.reg * contrastive_regulariser(feat, self._old_centroids(feat.device), self.cfg.cr_temperature,
                                                             self.cfg.device_batch)
            sel = torch.full((x.shape[0], 1), t, dtype=torch.long, device=x.device)
            return MethodOutput(logits=self.head(feat), aux_loss=aux, features=feat, diagnostics={"selection": sel})
        if stage is not None:
            raise ValueError(f"unknown HiDe-Prompt stage '{stage}'; use tii or prompt")
        task_pred = self.predict_task(self.get_query(x, query))
        pool = torch.stack(list(self.prompts))
        if not self.cfg.reshape_quirk and bool((task_pred == task_pred[0]).all()):
            prompts = pool[task_pred[:1]]  # one prompt for the batch: no per-sample copy
        else:
            prompts = pool[task_pred]
        feat = self.prompted_features(x, prompts)
        return MethodOutput(logits=self.head(feat), features=feat,
                            diagnostics={"task_pred": task_pred, "selection": task_pred[:, None]})

    def _old_centroids(self, device: torch.device) -> Optional[Tensor]:
        """All stored instructed-feature centroids (the classes of earlier tasks), on ``device``."""
        key = (tuple(self.tap_stats.classes), device)
        if self._centroid_cache is None or self._centroid_cache[0] != key:
            c = self.tap_stats.centroids().to(device) if self.tap_stats.classes else None
            self._centroid_cache = (key, c)
        return self._centroid_cache[1]

    # -- end of task: statistics and alignment ------------------------------------------------
    def _align_cfg(self, epochs: int, lr: float, samples: int) -> AlignConfig:
        # SGD momentum 0.9, CosineAnnealingLR per epoch; weight decay 0: the per-group
        # weight_decay (args.weight_decay, shadowed to 0.0) overrides the constructor's 5e-4.
        return AlignConfig(epochs=epochs, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="cosine",
                           samples_per_class=samples, batch_size=None, iterations="old_classes")

    def align_tii(self, task: Task, lr: float, samples_per_class: int, generator: torch.Generator,
                  device: torch.device) -> Dict[str, Any]:
        """Stage-1 alignment: retrain TII MLP + head on draws from ``tii_stats`` (seen-class mask)."""
        cfg = self._align_cfg(self.cfg.tii_align_epochs, lr, samples_per_class)
        return align_classifier(self.tii_logits, self.tii_parameters(), self.tii_stats, task.num_seen, task.num_old,
                                cfg, generator, device)

    def align_tap(self, task: Task, samples_per_class: int, generator: torch.Generator,
                  device: torch.device) -> Dict[str, Any]:
        """Stage-2 (TAP) alignment: retrain the head on draws from ``tap_stats`` (seen-class mask)."""
        cfg = self._align_cfg(self.cfg.tap_epochs, self.cfg.tap_lr, samples_per_class)
        return align_classifier(self.head, list(self.head.parameters()), self.tap_stats, task.num_seen, task.num_old,
                                cfg, generator, device)

    def end_task(self, task: Task, ctx: Any) -> None:
        cfg, t = self.cfg, task.index
        tcfg = ctx.cfg.train
        device_batch = cfg.device_batch or tcfg.batch_size
        lr_scale = tcfg.batch_size / tcfg.lr_scale_batch if tcfg.lr_scale_batch else 1.0
        log: Dict[str, Any] = {"task": t}
        was_training = self.training
        self.eval()
        # stage 1: statistics of the frozen features (eval transform), then TII alignment
        self.tii_stats.seed = self.tap_stats.seed = int(ctx.cfg.seed)
        feats, labels = ctx.query_features(self, transform="test")
        self.tii_stats.add_all(feats, labels)
        if t > 0 and cfg.tii_align and cfg.tii_align_epochs > 0:
            log["tii_align"] = self.align_tii(task, cfg.tii_align_lr * lr_scale, cfg.tii_samples_per_class or device_batch,
                                              ctx.generator("tii-align"), ctx.device)
        # stage 2: ensemble into p_t, statistics of the instructed features, TAP alignment
        self.consolidate_prompt(t)
        prompt = self.prompts[t].detach()[None]
        feats, labels = ctx.features(lambda x: self.prompted_features(x, prompt), transform="test")
        self.tap_stats.add_all(feats, labels)
        self._centroid_cache = None
        if t > 0 and cfg.tap_align and cfg.tap_epochs > 0:
            log["tap_align"] = self.align_tap(task, cfg.tap_samples_per_class or 5 * device_batch,
                                              ctx.generator("tap-align"), ctx.device)
        self.align_log.append(log)
        self.train(was_training)

    # -- reporting and cost hooks -------------------------------------------------------------
    def diagnostics(self) -> Dict[str, Any]:
        return {"alignment": self.align_log}

    def get_extra_state(self) -> Dict[str, Any]:
        return {"align_log": list(self.align_log)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.align_log = list(state.get("align_log", []))

    def used_parameters(self) -> Optional[int]:
        """Prompts of tasks 0..t (the ensemble reads the earlier ones) plus both heads and the MLP;
        the prompts of future tasks are allocated but unused."""
        seen = len(self.prompts) if self.current_task is None else min(self.current_task.index + 1, len(self.prompts))
        rest = sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("backbone.", "prompts.")))
        return rest + seen * self.prompts[0].numel()

    def state_numbers(self) -> Dict[str, int]:
        return {"tii_class_stats": self.tii_stats.numbers(), "tap_class_stats": self.tap_stats.numbers()}
