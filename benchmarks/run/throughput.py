"""Measured speed of a method: training-step and inference images/s, and peak memory.

A training step is what the protocol runs (``benchmarks/run/protocol.py``): the method's forward with
``query=None`` (so a 2-pass method pays its query pass, as with augmented training images), the
masked loss plus the method's auxiliary loss, backward and an optimiser step over the phase's
parameter groups. Inference is the evaluation forward with every pass (no query cache). Each
figure is the median over ``repeats`` timed runs of ``steps`` calls, after ``warmup`` calls.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU (reset per method); on CPU the process's
peak resident set size (``resource.getrusage``), which can only grow, so on CPU it is an upper
bound that includes everything measured before in the same process.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from benchmarks.config import TrainConfig
from benchmarks.run.protocol import build_optimizer, logit_mask
from methods.base import ContinualMethod, Phase, Task


@dataclass
class Throughput:
    train_img_s: Optional[float]
    infer_img_s: float
    peak_mem_mb: float
    batch_size: int
    precision: str
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(fn: Callable[[], Any], images: int, device: torch.device, warmup: int, repeats: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        rates.append(images * steps / (time.perf_counter() - t0))
    return float(statistics.median(rates))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: ContinualMethod, task: Task, device: torch.device, batch_size: int = 8,
            amp_dtype: Optional[torch.dtype] = None, phase: Optional[Phase] = None,
            warmup: int = 2, repeats: int = 5, steps: int = 3, seed: int = 0) -> Throughput:
    """Training-step and inference throughput of ``method`` in ``task`` (begin_task already called)."""
    method.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(seed)
    size = method.backbone.img_size
    x = torch.rand(batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(task.class_start, task.class_end, (batch_size,), generator=g).to(device)

    def autocast():
        if amp_dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    train_rate: Optional[float] = None
    phases = method.phases(task)
    if phase is None and phases:
        phase = phases[-1]
    if phase is not None:
        groups = phase.param_groups if phase.param_groups is not None else method.param_groups()
        if any(p.requires_grad for g_ in groups for p in g_["params"]):
            opt = build_optimizer(groups, TrainConfig())
            mask = logit_mask(task, method.num_classes, "current", device)

            def step() -> None:
                with autocast():
                    out = method(x, query=None, **phase.forward_kwargs)
                loss = method.training_loss(out, y, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            method.train()
            train_rate = _median_rate(step, batch_size, device, warmup, repeats, steps)
    method.eval()

    @torch.no_grad()
    def infer() -> None:
        with autocast():
            method(x, query=None)

    infer_rate = _median_rate(infer, batch_size, device, warmup, repeats, steps)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    return Throughput(train_rate, infer_rate, peak_memory_mb(device), batch_size, precision, str(device))


def run_images(method: ContinualMethod, tasks: list, train_cfg: TrainConfig, train_per_task: list,
               test_per_task: list) -> Dict[str, float]:
    """Images a full run of ``method`` processes: training images × epochs of every phase of
    every task (cumulative data for joint training), and evaluation images (every seen task after
    each task). ``begin_task`` is called for every task in order."""
    from benchmarks.run.protocol import phase_config

    train = 0.0
    evals = 0.0
    for t, task in enumerate(tasks):
        method.begin_task(task)
        n_train = sum(train_per_task[: t + 1]) if method.joint else train_per_task[t]
        for ph in method.phases(task):
            train += phase_config(train_cfg, ph).epochs * n_train
        evals += sum(test_per_task[: t + 1])
    return {"train_images": train, "eval_images": evals}
