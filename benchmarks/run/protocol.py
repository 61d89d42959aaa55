"""The per-task train / evaluate loop, one for every method.

For each task t: ``method.begin_task`` -> for each phase of ``method.phases``: a fresh optimiser
and schedule, then the epochs -> ``method.end_task`` -> evaluation of every seen task,
class-incrementally (argmax over all seen classes, no task id, per sample) -> ``acc_matrix[t]``
-> checkpoint.

Decisions that every method shares live here, once:

* logit masking during training (``train.train_mask``: ``current`` -- the reference codes'
  default -- ``seen`` or ``none``) and evaluation (``train.eval_mask``);
* optimiser (Adam / AdamW / SGD), lr batch scaling, schedules, gradient clipping;
* the query-feature cache: the query pass runs the frozen, un-prompted backbone, so the query of
  an evaluation image never changes. It is computed once per image and reused in all T
  evaluations (and for training images when the train transform is deterministic);
* seeding: every epoch reseeds from (seed, task, phase, epoch), so a run resumed from a
  checkpoint at an epoch boundary continues exactly as the uninterrupted run; a run resumed in
  the middle of an epoch re-draws the batches already trained on (same sampler, same worker
  streams) and then restores the RNG states saved with the checkpoint (``start_batch``,
  ``rng_state``);
* stop requests (SIGINT / SIGTERM, ``RunContext.should_stop``) are honoured after the current
  optimiser step, through ``RunContext.on_stop`` (the runner saves a checkpoint there);
* data parallelism (``RunContext.dist``, see ``benchmarks/run/distributed.py``): each rank trains on
  its slice of the same global batches with gradients summed over ranks, and evaluates a shard
  of each test set;
* precision: fp32 by default, as every reference; bf16 autocast only on request
  (``precision: bf16``, or ``auto`` = bf16 on CUDA), see docs/speed.md for its measured effect.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from benchmarks.config import ConfigError, TrainConfig, apply_mapping
from benchmarks.run.distributed import SINGLE, DistContext, agree, all_reduce_grads, gather_objects, shard_bounds
from benchmarks.data.scenarios import Scenario, TaskDataset
from methods.base import ContinualMethod, MethodOutput, Phase, Task


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def loader_options(tcfg: TrainConfig, device: Optional[torch.device]) -> Dict[str, Any]:
    """DataLoader keyword arguments for ``train.num_workers`` workers on ``device``.

    * ``pin_memory`` on CUDA only: page-locked host batches make ``.to(device, non_blocking=True)``
      an asynchronous copy that overlaps the previous step;
    * ``persistent_workers`` off: the protocol builds a new, freshly seeded loader for every epoch
      and every evaluated task (that is what makes runs and resumes reproducible), and a worker
      outlives only the iterations of its own loader object, so keeping workers alive would only
      hold processes. Starting them costs well under a second per loader (docs/speed.md), against
      minutes per epoch of a ViT-B/16 run;
    * ``prefetch_factor`` stays torch's default (2 batches per worker): with 8 workers, 16
      224-px batches of 128 images (1.2 GB of pinned float32) are already in flight.
    """
    return {
        "num_workers": int(tcfg.num_workers),
        "pin_memory": device is not None and device.type == "cuda",
        "persistent_workers": False,
    }


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states, for a checkpoint."""
    import random

    st: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only where the device count matches)."""
    import random

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    cuda = st.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype, or None for fp32 (the default; bf16 and auto are explicit opt-ins)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise ConfigError(f"unknown precision '{precision}'; use auto, fp32 or bf16")


def logit_mask(task: Task, num_classes: int, mode: str, device: torch.device) -> Optional[Tensor]:
    """Boolean (C,) mask of the logits allowed in the loss / argmax, or None for all classes."""
    if mode == "none":
        return None
    m = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if mode == "current":
        m[task.class_start : task.class_end] = True
    elif mode == "seen":
        m[: task.class_end] = True
    else:
        raise ConfigError(f"unknown mask mode '{mode}'; use current, seen or none")
    return m


# --- optimiser and schedules ---------------------------------------------------------------

def scaled_lr(tcfg: TrainConfig) -> float:
    """Base lr after the batch-size scaling rule of the JH-LEE / HiDe codes (lr·B/256)."""
    if tcfg.lr_scale_batch:
        return tcfg.lr * tcfg.batch_size / tcfg.lr_scale_batch
    return tcfg.lr


def build_optimizer(groups: List[Dict[str, Any]], tcfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimiser over ``groups``; each group's lr = scaled base lr × its ``lr_mult``."""
    base = scaled_lr(tcfg)
    pg = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            pg.append({"params": params, "lr": base * g.get("lr_mult", 1.0), "name": g.get("name", "group"),
                       "weight_decay": g.get("weight_decay", tcfg.weight_decay)})
    if not pg:
        raise RuntimeError("the method has no trainable parameters in this phase")
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(pg, betas=tcfg.betas)
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(pg, betas=tcfg.betas)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(pg, momentum=tcfg.momentum)
    raise ConfigError(f"unknown optimizer '{tcfg.optimizer}'; use adam, adamw or sgd")


def schedule_factor(tcfg: TrainConfig, it: int, steps_per_epoch: int, base_lr: float) -> float:
    """lr multiplier at iteration ``it`` (0-based) for the configured schedule.

    * ``constant``;
    * ``cosine``: per-iteration cosine from lr to ``min_lr`` after ``warmup_epochs`` of linear warm-up;
    * ``coda_cosine``: per epoch e (0-based) of K, lr·cos(99π·max(e−1, 0) / (200·(K−1)))
      (CODA-Prompt, SMoPE-CUB, VQ-Prompt-CUB). The reference ``CosineSchedule`` sets the base lr in
      its constructor and resets ``last_epoch`` to −1, and ``learners/default.py`` calls
      ``scheduler.step()`` at the start of every epoch after the first: epochs 0 and 1 both run at
      the base lr, epoch e ≥ 1 at the cosine's entry e − 1 (GT-RIPL/CODA-Prompt ``utils/schedulers.py``);
    * ``coswm``: SMoPE's ``CosineSchedulerIter``: ``min_lr`` for ``freeze_iters`` iterations,
      then a cosine to ``min_lr`` over ``iter_step·epochs − freeze_iters`` iterations, where
      ``iter_step`` is the config's assumed iterations per epoch (the real count if unset); past
      its end the lr stays at ``min_lr``. The reference scheduler sets the base lr when it is built
      and steps after each update, so update 0 runs at the base lr and update i ≥ 1 at the
      schedule's entry i − 1 (SMoPE ``utils/schedulers.py`` ``_LRSchedulerIter.__init__``);
    * ``step``: × ``gamma`` at each epoch in ``milestones``;
    * ``cosine_epoch``: torch's ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` stepped once per
      epoch: epoch e runs at min_lr + (lr − min_lr)·(1 + cos(π·e/epochs))/2 (RanPAC, RevisitingCIL /
      APER, CVPR24-Ease; issue 22).
    * ``timm_cosine``: timm's per-epoch ``CosineLRScheduler`` (t_initial = epochs, lr_min =
      ``min_lr``) stepped with ``step(epoch)`` after each epoch: epoch e ≥ 1 runs at the cosine's
      value for e − 1 (NoRGa / HiDe-Prompt ImageNet-R).
    """
    epoch = it // max(1, steps_per_epoch)
    s = tcfg.schedule
    if s == "coda_cosine" and tcfg.schedule_epochs:  # the first epochs of a K-epoch schedule (OVOR)
        tcfg = dataclasses.replace(tcfg, epochs=tcfg.schedule_epochs, schedule_epochs=None)
    if s == "constant":
        return 1.0
    if s == "step":
        return tcfg.gamma ** sum(1 for m in tcfg.milestones if epoch >= m)
    if s == "coda_cosine":
        k = tcfg.epochs
        return math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (k - 1))) if k > 1 else 1.0
    floor = tcfg.min_lr / base_lr if base_lr > 0 else 0.0
    if s == "cosine":
        warm = tcfg.warmup_epochs * steps_per_epoch
        total = tcfg.epochs * steps_per_epoch
        if it < warm:
            return (it + 1) / warm
        p = min(1.0, (it - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if s == "cosine_epoch":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, tcfg.epochs)))
    if s == "coswm":
        if it == 0:
            return 1.0
        it -= 1
        per = tcfg.iter_step or steps_per_epoch
        total = per * tcfg.epochs
        if it < tcfg.freeze_iters:
            return floor
        warm = tcfg.warmup_epochs * per
        if it < tcfg.freeze_iters + warm:
            return floor + (1 - floor) * (it - tcfg.freeze_iters + 1) / warm
        p = min(1.0, (it - tcfg.freeze_iters - warm) / max(1, total - tcfg.freeze_iters - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if s == "timm_cosine":
        # timm CosineLRScheduler(t_initial=epochs, lr_min=min_lr) stepped as step(epoch) after each
        # epoch (JH-LEE / HiDe / NoRGa engines): constant within an epoch, epoch e >= 1 at t = e - 1
        t = max(epoch - 1, 0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / tcfg.epochs))
    raise ConfigError(f"unknown schedule '{s}'; use constant, cosine, cosine_epoch, coda_cosine, coswm, step or timm_cosine")


def build_scheduler(opt: torch.optim.Optimizer, tcfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule_factor(tcfg, 0, steps_per_epoch, 1.0)  # validate the name early
    lambdas = [
        (lambda it, base=g["lr"]: schedule_factor(tcfg, it, steps_per_epoch, base)) for g in opt.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


# --- data loading and the query cache ------------------------------------------------------

def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, tcfg: TrainConfig,
                drop_last: bool = False, device: Optional[torch.device] = None,
                shard: Optional[Tuple[int, int]] = None) -> DataLoader:
    """A seeded loader; ``shard=(rank, world)`` yields rank's slice of the same global batches."""

    g = torch.Generator().manual_seed(seed)
    if shard is not None and shard[1] > 1:
        from benchmarks.run.distributed import ShardedBatchSampler, global_batch_sampler

        # generator=g as well: the loader draws its worker base seed from it before the sampler
        # draws the permutation, exactly as the unsharded loader below does.
        batches = global_batch_sampler(len(dataset), batch_size, shuffle, g, drop_last and len(dataset) >= batch_size)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(batches, *shard), generator=g,
                          **loader_options(tcfg, device))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        drop_last=drop_last and len(dataset) >= batch_size,
        **loader_options(tcfg, device),  # workers, pinned memory on CUDA 
    )


class QueryCache:
    """Query features per (split, task, sample index), filled lazily, exact by construction."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.store: Dict[Tuple[str, int], Tensor] = {}
        self.filled: Dict[Tuple[str, int], Tensor] = {}
        self.hits = 0
        self.misses = 0

    def complete(self, key: Tuple[str, int], size: int) -> bool:
        """True when every one of the ``size`` samples of ``key`` has its query stored."""
        filled = self.filled.get(key)
        return self.enabled and filled is not None and len(filled) == size and bool(filled.all())

    def get(self, key: Tuple[str, int], size: int, idx: Tensor, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        if not self.enabled:
            self.misses += len(idx)
            return compute(x)
        filled = self.filled.get(key)
        if filled is not None and bool(filled[idx].all()):
            self.hits += len(idx)
            return self.store[key][idx].to(x.device)
        q = compute(x)
        if key not in self.store:
            self.store[key] = torch.zeros(size, q.shape[-1], dtype=q.dtype)
            self.filled[key] = torch.zeros(size, dtype=torch.bool)
        self.store[key][idx] = q.detach().cpu()
        self.filled[key][idx] = True
        self.misses += len(idx)
        return q


class LabelsOnly(Dataset):
    """``(empty tensor, label, index)`` of a TaskDataset: a phase that needs only the cached query
    features (``Phase.needs_images`` False) iterates it instead of loading and transforming images."""

    def __init__(self, dataset: TaskDataset) -> None:
        self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.zeros(0), int(self.labels[i]), i


# --- the run context -----------------------------------------------------------------------

@dataclass
class RunContext:
    """What one run needs besides the method: config, device, scenario, cache, logging."""

    cfg: Any  # RunConfig
    scenario: Scenario
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    cache: QueryCache
    log: Callable[[str], None] = print
    progress: bool = False
    train_deterministic: bool = False  # the train transform has no randomness
    on_epoch_end: Optional[Callable[..., None]] = None  # checkpoint hook (store / resume)
    # per-epoch metrics hook (log line, metrics.jsonl, TensorBoard): task, phase, epoch, epochs,
    # loss (mean over the epoch's steps), last_loss, steps, lr, seconds (of this epoch)
    on_epoch_metrics: Optional[Callable[..., None]] = None
    # Stop requests (signals): polled after every optimiser step; on_stop saves and raises.
    should_stop: Optional[Callable[[], bool]] = None
    on_stop: Optional[Callable[..., None]] = None
    dist: DistContext = SINGLE  # data-parallel rank / world size (benchmarks/run/distributed.py)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def query(self, method: ContinualMethod, x: Tensor, idx: Tensor, key: Tuple[str, int], size: int, cacheable: bool) -> Tensor:
        def compute(inp: Tensor) -> Tensor:
            with self.autocast():
                return method.backbone.query(inp).float()

        if not cacheable:
            return compute(x)
        return self.cache.get(key, size, idx.cpu(), x, compute)


class TaskContext:
    """Handed to ``method.end_task``: loaders and feature helpers for the finished task."""

    def __init__(self, run: RunContext, task: Task) -> None:
        self.run = run
        self.task = task
        self.cfg = run.cfg
        self.device = run.device

    def autocast(self):
        return self.run.autocast()

    def log(self, msg: str) -> None:
        self.run.log(msg)

    def generator(self, *parts: object) -> torch.Generator:
        """A torch.Generator seeded from (run seed, task, *parts)."""
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.task.index, *parts))

    def train_dataset(self, transform: str = "train", tasks: Optional[Sequence[int]] = None) -> Dataset:
        """Training data of this task (or of ``tasks``), with the train or the test transform."""
        sc = self.run.scenario
        ids = [self.task.index] if tasks is None else list(tasks)
        sets = [sc.train_sets[i] if transform == "train" else sc.train_sets[i].with_transform(sc.test_transform) for i in ids]
        return sets[0] if len(sets) == 1 else ConcatDataset(sets)

    def train_loader(self, transform: str = "train", shuffle: bool = False, batch_size: Optional[int] = None,
                     tasks: Optional[Sequence[int]] = None) -> DataLoader:
        ds = self.train_dataset(transform, tasks)
        bs = batch_size or self.cfg.train.eval_batch_size
        return make_loader(ds, bs, shuffle, derive_seed(self.cfg.seed, self.task.index, "ctx", transform), self.cfg.train,
                           device=self.device)

    @torch.no_grad()
    def query_features(self, method: ContinualMethod, transform: str = "test") -> Tuple[Tensor, Tensor]:
        """Frozen query features and labels of this task's training images (cached when exact)."""
        loader = self.train_loader(transform)
        cacheable = transform == "test" or self.run.train_deterministic
        feats, labels = [], []
        key = (f"train-{transform}", self.task.index)
        for x, y, idx in loader:
            x = x.to(self.device, non_blocking=True)
            feats.append(self.run.query(method, x, idx, key, len(loader.dataset), cacheable).float().cpu())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def features(self, fn: Callable[[Tensor], Tensor], transform: str = "train") -> Tuple[Tensor, Tensor]:
        """``fn(x)`` over this task's training images (e.g. prompted features for statistics)."""
        feats, labels = [], []
        for x, y, _ in self.train_loader(transform):
            with self.autocast():
                feats.append(fn(x.to(self.device, non_blocking=True)).float().cpu())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)


# --- training ------------------------------------------------------------------------------

def phase_config(base: TrainConfig, phase: Phase) -> TrainConfig:
    import copy

    tcfg = copy.deepcopy(base)
    apply_mapping(tcfg, phase.train, f"phase '{phase.name}' train")
    return tcfg


def train_phase(method: ContinualMethod, run: RunContext, task: Task, phase: Phase, phase_idx: int,
                start_epoch: int = 0, opt_state: Optional[Dict[str, Any]] = None, start_batch: int = 0,
                rng_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train one phase; returns {'epochs', 'steps', 'seconds', 'last_loss'}.

    Resuming: ``start_epoch`` / ``start_batch`` is the position to continue from, ``opt_state``
    holds the ``optimizer`` and ``scheduler`` state dicts saved there and ``rng_state`` the RNG
    states (:func:`rng_state`) saved after the last step done (needed when ``start_batch`` > 0).
    """
    cfg = run.cfg
    tcfg = phase_config(cfg.train, phase)
    dctx = run.dist
    if dctx.enabled and tcfg.batch_size % dctx.world_size:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} cannot be split evenly over {dctx.world_size} processes; "
                          f"the global batch stays the preset's, so choose a process count that divides it")
    sc = run.scenario
    if method.joint:
        dataset: Dataset = ConcatDataset(sc.train_sets[: task.index + 1])
        mask_mode = "seen" if tcfg.train_mask == "current" else tcfg.train_mask
    else:
        dataset = sc.train_sets[task.index]
        mask_mode = tcfg.train_mask
    mask = logit_mask(task, method.num_classes, mask_mode, run.device)
    if tcfg.epochs <= 0:
        return {"epochs": 0, "steps": 0, "seconds": 0.0, "last_loss": None}
    bs = min(tcfg.batch_size, len(dataset))
    drop = tcfg.drop_last and len(dataset) >= tcfg.batch_size
    steps_per_epoch = len(dataset) // bs if drop else math.ceil(len(dataset) / bs)
    groups = phase.param_groups if phase.param_groups is not None else method.param_groups()
    opt = build_optimizer(groups, tcfg)
    sched = build_scheduler(opt, tcfg, steps_per_epoch)
    if opt_state is not None:
        opt.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
    cacheable = run.train_deterministic and not method.joint
    use_query = method.uses_query if phase.needs_query is None else phase.needs_query
    t0 = time.time()
    steps, last = 0, float("nan")
    bar = None
    if run.progress:
        from tqdm import tqdm

        bar = tqdm(total=(tcfg.epochs - start_epoch) * steps_per_epoch, leave=False, dynamic_ncols=True,
                   desc=f"{method.name} task {task.index + 1}/{task.num_tasks} {phase.name}")
    method.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    shard = (dctx.rank, dctx.world_size) if dctx.enabled else None
    for epoch in range(start_epoch, tcfg.epochs):
        seed = derive_seed(cfg.seed, task.index, phase_idx, epoch)
        seed_everything(seed)
        # A features-only phase (Phase.needs_images False, e.g. HiDe's TII network) whose training
        # queries are all cached reads no image: same sampler and seed, so the same batches.
        features_only = (not phase.needs_images and use_query and cacheable
                         and run.cache.complete(("train", task.index), len(dataset)))
        source: Dataset = LabelsOnly(dataset) if features_only else dataset
        loader = make_loader(source, bs, True, seed, tcfg, drop_last=drop, device=run.device, shard=shard)
        batches = iter(loader)
        first = start_batch if epoch == start_epoch else 0
        epoch_t0, epoch_sum, epoch_steps = time.time(), 0.0, 0
        if first:
            # Mid-epoch resume: draw (and discard) the batches already trained on, so the sampler
            # and the loader workers' RNG streams are where they were, then restore the RNG states.
            for _ in range(first):
                next(batches)
            if rng_state is not None:
                set_rng_state(rng_state)
        for b, (x, y, idx) in enumerate(batches, start=first):
            n_local = n_global = len(y)
            if dctx.enabled:
                n_global = bs if drop else min(bs, len(dataset) - b * bs)
                lo, hi = shard_bounds(n_global, dctx.world_size, dctx.rank)
                n_local = hi - lo  # 0: a placeholder sample, no forward / backward on this rank
            loss = None
            if n_local:
                x = x.to(run.device, non_blocking=True)
                y = y.to(run.device, non_blocking=True)
                query = None
                if use_query:
                    query = run.query(method, x, idx, ("train", task.index), len(dataset), cacheable)
                with run.autocast():
                    out = method(x, query=query, **phase.forward_kwargs)
                loss = method.training_loss(out, y, mask)
                if dctx.enabled:
                    loss = loss * (n_local / n_global)  # summed over ranks: the global batch mean
            stop = bool(run.should_stop()) if run.should_stop is not None else False
            if dctx.enabled:  # one all-reduce: the global loss (for the check) and any stop request
                total, stops = agree(dctx, [float(loss.detach()) if loss is not None else 0.0, float(stop)], run.device)
                value, stop = total, stops > 0
            else:
                value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{method.name}: the loss became {value} in task {task.index + 1}, phase '{phase.name}', epoch {epoch + 1}"
                )
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            if dctx.enabled:
                all_reduce_grads(dctx, params, contributes=loss is not None)
            if tcfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad)
            lr_used = float(opt.param_groups[0]["lr"])  # the lr of this step (logged per epoch)
            opt.step()
            sched.step()
            steps += 1
            last = value
            epoch_sum, epoch_steps = epoch_sum + value, epoch_steps + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{tcfg.epochs}", loss=f"{last:.3f}")
            if stop and run.on_stop is not None:
                run.on_stop(task=task, phase_idx=phase_idx, epoch=epoch, batch=b + 1, steps_per_epoch=steps_per_epoch,
                            epochs=tcfg.epochs, optimizer=opt, scheduler=sched)
        if run.on_epoch_metrics is not None and epoch_steps:
            run.on_epoch_metrics(task=task, phase=phase.name, epoch=epoch, epochs=tcfg.epochs,
                                 loss=epoch_sum / epoch_steps, last_loss=last, steps=epoch_steps,
                                 lr=lr_used, seconds=time.time() - epoch_t0)
        if run.on_epoch_end is not None:
            run.on_epoch_end(task=task, phase_idx=phase_idx, epoch=epoch, epochs=tcfg.epochs,
                             optimizer=opt, scheduler=sched)
    if bar is not None:
        bar.close()
    return {"epochs": tcfg.epochs - start_epoch, "steps": steps, "seconds": time.time() - t0, "last_loss": last}


# --- evaluation ----------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Evaluation of every seen task after training task t."""

    acc: List[float]  # percent, per task j ≤ t
    correct: List[int]
    total: List[int]
    task_acc: List[Optional[float]]  # task-identity accuracy (if the method predicts tasks)
    selection: Dict[int, Tensor] = field(default_factory=dict)  # per task j: usage histogram


@torch.no_grad()
def evaluate(method: ContinualMethod, run: RunContext, task: Task, batch_size: Optional[int] = None) -> EvalResult:
    """Class-incremental evaluation of tasks 0..t: argmax over the seen classes, per sample."""
    cfg = run.cfg
    sc = run.scenario
    method.eval()
    mask = logit_mask(task, method.num_classes, "seen" if cfg.train.eval_mask == "seen" else "none", run.device)
    res = EvalResult([], [], [], [])
    dctx = run.dist
    for j in range(task.index + 1):
        ds = sc.test_sets[j]
        part: Dataset = ds
        if dctx.enabled:  # each rank scores a contiguous block; items keep their index in ds (cache key)
            lo, hi = shard_bounds(len(ds), dctx.world_size, dctx.rank)
            part = Subset(ds, range(lo, hi))
        loader = make_loader(part, batch_size or cfg.train.eval_batch_size, False, 0, cfg.train, device=run.device)
        correct = total = task_correct = 0
        has_task = False
        hist: Optional[Tensor] = None
        for x, y, idx in loader:
            x = x.to(run.device, non_blocking=True)
            y = y.to(run.device, non_blocking=True)
            query = run.query(method, x, idx, ("eval", j), len(ds), True) if method.uses_query else None
            with run.autocast():
                out: MethodOutput = method(x, query=query)
            logits = out.logits.float()
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            d = out.diagnostics
            if "task_pred" in d:
                has_task = True
                task_correct += int((d["task_pred"].to(y.device) == j).sum())
            if "selection" in d and method.selection_size:
                sel = d["selection"].long().cpu()
                sel = sel.reshape(sel.shape[0], -1, sel.shape[-1]) if sel.dim() > 2 else sel[:, None, :]
                mid = sel.shape[1]
                offs = torch.arange(mid)[None, :, None] * method.selection_size
                h = torch.bincount((sel + offs).flatten(), minlength=mid * method.selection_size).reshape(mid, -1)
                if d["selection"].dim() > 2:
                    h = h.reshape(*d["selection"].shape[1:-1], method.selection_size)
                else:
                    h = h[0]
                hist = h if hist is None else hist + h
        if dctx.enabled:
            parts = gather_objects(dctx, (correct, total, task_correct, has_task, hist))
            correct, total, task_correct = (sum(p[k] for p in parts) for k in range(3))
            has_task = any(p[3] for p in parts)
            hists = [p[4] for p in parts if p[4] is not None]
            hist = sum(hists[1:], hists[0]) if hists else None
        res.acc.append(100.0 * correct / total)
        res.correct.append(correct)
        res.total.append(total)
        res.task_acc.append(100.0 * task_correct / total if has_task else None)
        if hist is not None:
            res.selection[j] = hist
    return res
