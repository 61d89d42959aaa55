"""Speed helpers: ``torch.compile`` of the backbone, data-loader options, and the timed units of
the perf suite (a training step exactly as the protocol runs it, an inference batch).

What makes a run fast, and where it lives (docs/speed.md has the measurements):

* fp32 by default, as the reference codes; bf16 autocast on request (``--precision bf16``, or
  ``auto`` = bf16 on CUDA; ``benchmarks/run/protocol.py`` ``resolve_precision``); ``env.precision`` records it;
* frozen backbone weights have ``requires_grad=False`` (``methods/vit.py``), so backward computes
  only input gradients through them, never weight gradients;
* fused attention (``F.scaled_dot_product_attention``) in every pass, prefixes included;
* the query-feature cache (``protocol.QueryCache``): one frozen query pass per test image for the
  whole run instead of one per evaluation;
* loaders with worker processes and pinned memory on CUDA (:func:`benchmarks.run.protocol.loader_options`);
* optional ``torch.compile`` of the backbone passes (``--compile``, :func:`compile_backbone`).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from benchmarks.config import ConfigError, TrainConfig
from methods.base import ContinualMethod, Phase, Task

# --- torch.compile ---------------------------------------------------------------------------

COMPILED_ATTR = "_promptcl_compiled"


def compile_backbone(backbone: Any, dynamic: bool = False, mode: Optional[str] = None, backend: str = "inductor") -> Any:
    """Compile the two passes of a :class:`~methods.vit.PromptedViT` in place and return it.

    Compiled: ``backbone.forward_features`` (the prompted pass, which every method reaches through
    ``backbone(x, ...)`` or ``backbone.forward_features``) and the wrapped timm model's
    ``forward_features`` (the un-prompted query pass, ``backbone.query``). Both are instance
    attributes that shadow the methods, so parameters, ``state_dict`` and checkpoints are
    untouched and the prefix injection is traced as ordinary Python: a prefix dict or a
    :class:`~methods.vit.PrefixProvider` (SMoPE's routing) becomes part of the graph, guarded on
    the prefix layers and tensor shapes. ``dynamic=False`` specialises on shapes, so each distinct
    batch size (training, last partial batch, evaluation) compiles once. Idempotent. ``backend``:
    torch.compile's (``eager`` traces without generating code; the gpu-check's CPU test uses it).
    """
    if getattr(backbone, COMPILED_ATTR, False):
        return backbone
    if not hasattr(torch, "compile"):
        raise ConfigError(f"--compile needs torch.compile (PyTorch >= 2.0); this is torch {torch.__version__}")
    backbone.forward_features = torch.compile(backbone.forward_features, dynamic=dynamic, mode=mode, backend=backend)
    backbone.vit.forward_features = torch.compile(backbone.vit.forward_features, dynamic=dynamic, mode=mode, backend=backend)
    setattr(backbone, COMPILED_ATTR, True)
    return backbone


def is_compiled(backbone: Any) -> bool:
    return bool(getattr(backbone, COMPILED_ATTR, False))


def apply_run_options(method: ContinualMethod, cfg: Any) -> None:
    """Apply the run's speed options to a built method: ``cfg.compile`` compiles its backbone."""
    if getattr(cfg, "compile", False):
        compile_backbone(method.backbone)


# --- data loading ----------------------------------------------------------------------------


# --- timed units -----------------------------------------------------------------------------

class TrainStep:
    """One optimiser step of ``method`` on the batch ``(x, y)``, as ``protocol.train_phase`` runs it.

    Query pass (no gradient) when the phase uses it -- training images are augmented, so the
    query cache does not apply --, the prompted forward under autocast, the masked loss plus the
    method's auxiliary loss, ``zero_grad(set_to_none=True)``, backward, gradient clipping when the
    config asks for it, and the optimiser step over the phase's parameter groups. Calling the
    object runs one step and returns the loss.
    """

    def __init__(self, method: ContinualMethod, task: Task, x: Tensor, y: Tensor, tcfg: TrainConfig,
                 phase: Optional[Phase] = None, amp_dtype: Optional[torch.dtype] = None) -> None:
        from benchmarks.run.protocol import build_optimizer, logit_mask, phase_config

        self.method, self.x, self.y = method, x, y
        self.phase = phase if phase is not None else method.phases(task)[-1]
        self.tcfg = phase_config(tcfg, self.phase)
        groups = self.phase.param_groups if self.phase.param_groups is not None else method.param_groups()
        self.opt = build_optimizer(groups, self.tcfg)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        mode = self.tcfg.train_mask
        if method.joint and mode == "current":
            mode = "seen"
        self.mask = logit_mask(task, method.num_classes, mode, x.device)
        self.use_query = method.uses_query if self.phase.needs_query is None else self.phase.needs_query
        self.amp_dtype = amp_dtype

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(device_type=self.x.device.type, enabled=False)
        return torch.autocast(device_type=self.x.device.type, dtype=self.amp_dtype)

    def __call__(self) -> float:
        m = self.method
        m.train()
        query = None
        if self.use_query:
            with self.autocast():
                query = m.backbone.query(self.x).float()
        with self.autocast():
            out = m(self.x, query=query, **self.phase.forward_kwargs)
        loss = m.training_loss(out, self.y, self.mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.clip_grad)
        self.opt.step()
        return float(loss.detach())


class InferBatch:
    """One evaluation forward of ``method`` on ``x`` (eval mode, no gradient), with every pass the
    method needs (its query pass included unless ``query`` is given, as a cache hit would be)."""

    def __init__(self, method: ContinualMethod, x: Tensor, amp_dtype: Optional[torch.dtype] = None,
                 query: Optional[Tensor] = None) -> None:
        self.method, self.x, self.amp_dtype, self.query = method, x, amp_dtype, query

    @torch.no_grad()
    def __call__(self) -> Tensor:
        self.method.eval()
        ctx = (torch.autocast(device_type=self.x.device.type, enabled=False) if self.amp_dtype is None
               else torch.autocast(device_type=self.x.device.type, dtype=self.amp_dtype))
        with ctx:
            return self.method(self.x, query=self.query).logits


class PassCounter:
    """Counts the images that go through a :class:`~methods.vit.PromptedViT`'s query pass and its
    prompted pass, by wrapping both as instance attributes (used by the perf suite and the tests to
    show what the query cache saves)."""

    def __init__(self, backbone: Any) -> None:
        self.query = self.prompted = 0
        q, f = backbone.query, backbone.forward_features

        def query(x: Tensor) -> Tensor:
            self.query += len(x)
            return q(x)

        def forward_features(x: Tensor, *a: Any, **k: Any) -> Any:
            self.prompted += len(x)
            return f(x, *a, **k)

        backbone.query, backbone.forward_features = query, forward_features


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: torch.device = torch.device("cpu"),
                     log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of each function, measured in turns (a, b, b, a, a, b, ...) ``repeats``
    times after ``warmup`` untimed turns, so that a change of machine load hits every function
    alike. Returns ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock seconds and the process's
    CPU seconds (``time.process_time``). On a shared CPU the CPU time of a single-threaded run is
    the figure that does not depend on how long other processes held the cores; on CUDA only the
    wall-clock means anything. Compare medians (:func:`statistics.median`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    out: Dict[str, Dict[str, List[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # neither always goes first
        for k in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            synchronize(device)
            out[k]["wall"].append(time.perf_counter() - w0)
            out[k]["cpu"].append(time.process_time() - c0)
            if log is not None:
                log(f"{k}: {out[k]['wall'][-1]:.3f}s wall, {out[k]['cpu'][-1]:.3f}s cpu")
    return out


def median_rate(seconds: List[float], images: int) -> float:
    """Images per second from per-call seconds (median)."""
    return images / statistics.median(seconds)
