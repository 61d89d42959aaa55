"""Data parallelism for one run: ``torchrun --nproc_per_node=N bench.py run ...``.

What changes with N processes (ranks), and why it gives the single-process result:

* **Batches.** Every rank draws the *same* global batches as a single process would (the same
  seeded ``RandomSampler`` / ``BatchSampler``, consumed in the same order) and keeps its own
  contiguous slice of each global batch (:class:`ShardedBatchSampler`), so the global batch stays
  the preset's ``train.batch_size`` whatever N is (per-rank batch = batch / N; a batch size that N
  does not divide is a :class:`~benchmarks.config.ConfigError`).
* **Gradients.** Each rank scales its loss by ``n_rank / n_global`` and the gradients of the
  trainable parameters are summed over ranks after ``backward`` (:func:`all_reduce_grads`), which
  is the gradient of the mean loss over the global batch, exactly as in one process, also for the
  last, uneven batch. We all-reduce by hand instead of wrapping the method in
  ``DistributedDataParallel`` because methods have custom forwards (``query=`` and phase
  ``forward_kwargs``, ``MethodOutput`` dataclasses, auxiliary losses), select a different subset of
  prompts per batch (DDP would need ``find_unused_parameters``), and change ``requires_grad``
  between tasks, which DDP does not allow after construction. A parameter that received no
  gradient on any rank keeps ``grad=None`` so the optimiser skips it, as in one process.
* **Loss check and stop requests** are agreed every step with one small all-reduce, so a NaN on one
  rank or a SIGTERM delivered to one rank stops every rank at the same step.
* **Evaluation** is sharded: rank r scores a contiguous block of each test set, and the counts and
  selection histograms are gathered (:func:`gather_objects`).
* **end_task** runs on every rank over the full task data (the method code does not need to know
  about ranks, and end_task often trains, e.g. classifier alignment, so rank 0 alone would not be
  faster); afterwards rank 0's method state is broadcast (:func:`broadcast_state`) so the ranks
  stay bit-identical even where GPU kernels are not deterministic.
* **Files** are written by rank 0 only.

On CUDA the process group uses NCCL and each rank uses ``cuda:LOCAL_RANK``; on CPU it uses Gloo.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of a data-parallel run (``world_size`` 1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup(device: str = "auto") -> DistContext:
    """Join the process group announced by torchrun's environment (no-op for one process).

    ``device`` is the run's ``--device``: CUDA runs use NCCL and ``cuda:LOCAL_RANK``; CPU runs Gloo.
    Returns the rank context; safe to call twice.
    """
    world = env_world_size()
    if world <= 1:
        return SINGLE
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local)


def current() -> DistContext:
    """The rank context of the initialised process group, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ctx: DistContext) -> str:
    """``--device`` for this rank: ``cuda`` / ``auto`` become ``cuda:LOCAL_RANK`` under torchrun."""
    if not ctx.enabled or not torch.cuda.is_available():
        return device
    if device in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    return device


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, weight caches), then the others."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if ctx.enabled and ctx.is_main:
            dist.barrier()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


# --- batches -------------------------------------------------------------------------------

def shard_bounds(n: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, end) of rank's contiguous share of n items; the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(Sampler[List[int]]):
    """Rank ``rank``'s slice of every global batch of a seeded sampler.

    A rank whose slice of the (last, short) global batch is empty gets the batch's first index as a
    placeholder and must give it zero weight (``shard_bounds`` tells which); that keeps the number
    of steps, and so the collectives, equal on every rank.
    """

    def __init__(self, batch_sampler: BatchSampler, rank: int, world: int) -> None:
        self.batch_sampler = batch_sampler
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batch_sampler:
            a, b = shard_bounds(len(batch), self.world, self.rank)
            yield batch[a:b] if b > a else batch[:1]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def global_batch_sampler(dataset_len: int, batch_size: int, shuffle: bool, generator: torch.Generator,
                         drop_last: bool) -> BatchSampler:
    """The batch sampler a ``DataLoader(shuffle=..., generator=...)`` would build internally."""
    sampler = RandomSampler(range(dataset_len), generator=generator) if shuffle else SequentialSampler(range(dataset_len))
    return BatchSampler(sampler, batch_size, drop_last)


# --- collectives ---------------------------------------------------------------------------

def agree(ctx: DistContext, values: Sequence[float], device: torch.device) -> List[float]:
    """Sum of ``values`` over ranks (one all-reduce); identity for one process."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on some rank."""
    return agree(ctx, [1.0 if flag else 0.0], device)[0] > 0


def all_reduce_grads(ctx: DistContext, params: Sequence[Tensor], contributes: bool = True) -> None:
    """Sum the gradients of ``params`` over ranks (losses are pre-scaled by n_rank / n_global).

    ``contributes`` False: this rank only holds a placeholder sample this step. A parameter whose
    gradient is None on every contributing rank stays None (the optimiser then skips it).
    """
    if not ctx.enabled or not params:
        return
    device = params[0].device
    has = torch.tensor([1.0 if (contributes and p.grad is not None) else 0.0 for p in params], device=device)
    dist.all_reduce(has)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for ids in by_dtype.values():
        flat = torch.cat([
            (params[i].grad.detach().reshape(-1) if contributes and params[i].grad is not None
             else torch.zeros(params[i].numel(), dtype=params[i].dtype, device=device))
            for i in ids
        ])
        dist.all_reduce(flat)
        offset = 0
        for i in ids:
            p, n = params[i], params[i].numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if has[i] > 0 else None
            offset += n


def gather_objects(ctx: DistContext, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not ctx.enabled:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_state(ctx: DistContext, state: Dict[str, Any]) -> None:
    """Overwrite every rank's tensors in ``state`` with rank 0's, in place.

    ``state`` is ``method.checkpoint_state()``: its tensors share storage with the method's
    parameters and buffers, so this synchronises the method without moving the frozen backbone.
    """
    if not ctx.enabled:
        return
    with torch.no_grad():
        for v in state.values():
            if isinstance(v, Tensor):
                dist.broadcast(v, src=0)
