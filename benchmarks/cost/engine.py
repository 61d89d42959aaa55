"""Cost of a method: parameters, stored state, forward passes and MACs per image.

Everything here is counted on the method object itself, so a new method is covered as soon as it
registers. Definitions (docs/cost.md has the long version):

* ``backbone_params``: the frozen ViT, counted once. Methods with a query pass run the *same*
  frozen weights a second time without prompts (``query_pass``); that adds compute, not
  parameters, and is never counted as a second backbone.
* ``added_params`` (= ``allocated_params``): every parameter the method owns (prompts, keys,
  attention vectors, heads, auxiliary networks), allocated or not yet used.
* ``used_params``: what the current task's forward uses (``ContinualMethod.used_parameters``;
  CODA-Prompt allocates every task's components up front).
* ``trainable_params``: what the current task's training phases update -- parameters handed to
  the optimiser with ``requires_grad`` (``ContinualMethod.trainable_parameters`` overrides).
* ``state_numbers`` / ``state_bytes``: stored non-parameter state (buffers, class statistics,
  usage counters) by the method's own accounting (``ContinualMethod.state_numbers``); bytes use
  each tensor's dtype (class statistics are float64, 8 bytes).
* MACs per image (one multiply-add = 1; GFLOPs = 2 × GMACs) of every forward pass the method
  needs, counted by fvcore (:mod:`benchmarks.cost.flops`): inference with ``query=None`` so that the
  query pass is included, training per phase with its backward (input gradients through the
  frozen backbone, weight gradients only for trainable weights).
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from benchmarks.cost.flops import OpCount, count_ops, single_thread
from methods.base import ContinualMethod, Task

GIGA = 1e9

# The SMoPE poster's efficiency table (smope.md §6.2) counts these query passes in *training*:
# DualPrompt, HiDe-Prompt and SMoPE as one pass, L2P (Deep L2P++), CODA-Prompt, VQ-Prompt as two. Used only
# for the paper-convention train column; every other figure is counted from the method itself.
POSTER_TRAIN_QUERY_PASSES: Dict[str, int] = {"l2p": 1, "dualprompt": 0, "coda_prompt": 1, "hide_prompt": 0, "smope": 0,
                                             "vq_prompt": 1}
# The poster's own numbers (GFLOPs train, test), for comparison in the report.
POSTER_GFLOPS: Dict[str, Tuple[float, float]] = {
    "l2p": (67.44, 67.44),  # the poster's row is Deep L2P++ (prefix-tuning)
    "dualprompt": (33.72, 67.44),
    "coda_prompt": (67.44, 67.44),
    "hide_prompt": (33.72, 67.45),
    "smope": (33.72, 33.72),
    "vq_prompt": (67.44, 67.44),
}


# --- parameters and state ------------------------------------------------------------------

def _numel(params: Iterable[nn.Parameter]) -> int:
    seen: Dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def trainable_parameter_count(method: ContinualMethod, task: Optional[Task] = None) -> int:
    """Parameters the phases of ``task`` (default: the current task) hand to the optimiser with
    ``requires_grad``, unless the method's own ``trainable_parameters()`` says fewer."""
    own = method.trainable_parameters()
    if own is not None:
        return int(own)
    task = task if task is not None else method.current_task
    if task is None:
        return _numel(p for p in method.parameters() if p.requires_grad)
    params: List[nn.Parameter] = []
    for phase in method.phases(task):
        groups = phase.param_groups if phase.param_groups is not None else method.param_groups()
        for g in groups:
            params += [p for p in g["params"] if p.requires_grad]
    return _numel(params)


def _tensors(obj: Any) -> Iterable[Tensor]:
    """Tensors inside nested dicts / lists (extra state such as ClassStats)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _class_stats_modules(method: ContinualMethod) -> List[Tuple[str, nn.Module]]:
    from methods.alignment import ClassStats

    return [(n, m) for n, m in method.named_modules() if isinstance(m, ClassStats) and not n.startswith("backbone.")]


def projected_class_stats_numbers(stats: nn.Module, num_classes: int, dim: int) -> int:
    """Numbers a :class:`~methods.alignment.ClassStats` will hold for ``num_classes`` classes of
    ``dim``-dimensional features: K centroids × (mean + variance), or mean + full covariance."""
    per_class = dim + dim * dim if stats.mode == "covariance" else 2 * stats.n_centroids * dim
    return num_classes * per_class


@dataclass
class StateCount:
    """Stored non-parameter state: numbers by kind, total numbers and bytes."""

    by_kind: Dict[str, int]
    numbers: int
    bytes: int
    projected: bool = False  # class statistics computed from the config, not measured


def state_count(method: ContinualMethod, project_task: Optional[Task] = None) -> StateCount:
    """The method's stored state (its ``state_numbers()`` accounting) in numbers and bytes.

    With ``project_task``, class statistics that are still empty (nothing was trained, e.g. in the
    ``bench.py cost`` table) are projected to their size after that task from the configuration:
    ``task.num_seen`` classes of ``embed_dim``-dimensional float64 statistics.
    """
    kinds = {k: int(v) for k, v in (method.state_numbers() or {}).items()}
    buffers = [b for n, b in method.named_buffers() if not n.startswith("backbone.")]
    buffer_numbers = sum(b.numel() for b in buffers)
    nbytes = sum(b.numel() * b.element_size() for b in buffers)
    stats = _class_stats_modules(method)
    stat_numbers = 0
    for _, m in stats:
        ts = list(_tensors(m.get_extra_state()))
        stat_numbers += sum(t.numel() for t in ts)
        nbytes += sum(t.numel() * t.element_size() for t in ts)
    # numbers the method reports beyond its buffers and statistics: assume float32
    other = sum(kinds.values()) - buffer_numbers - stat_numbers
    if other > 0:
        nbytes += 4 * other
    projected = False
    if project_task is not None:
        dim = method.backbone.embed_dim
        empty = [(n, m) for n, m in stats if m.numbers() == 0]
        if empty:
            projected = True
            # the method's own (still zero) statistics entries give way to the projection
            kinds = {k: v for k, v in kinds.items() if not (v == 0 and "stat" in k)}
            for name, m in empty:
                n = projected_class_stats_numbers(m, project_task.num_seen, dim)
                kinds[f"class_statistics ({name})" if len(empty) > 1 else "class_statistics"] = n
                nbytes += 8 * n
    return StateCount(kinds, sum(kinds.values()), int(nbytes), projected)


def parameter_counts(method: ContinualMethod) -> Dict[str, int]:
    """Backbone (frozen), added (= allocated), used and trainable parameters now, and stored state."""
    backbone = _numel(method.backbone.parameters())
    added = _numel(method.method_parameters())
    used = method.used_parameters()
    state = state_count(method)
    return {
        "backbone_params": backbone,
        "added_params": added,
        "allocated_params": added,
        "used_params": int(used) if used is not None else added,
        "trainable_params": trainable_parameter_count(method),
        "state_numbers": state.numbers,
        "state_bytes": state.bytes,
    }


# --- MACs per image --------------------------------------------------------------------------

@dataclass
class QueryPass:
    """The un-prompted query pass of one backbone: its count per image and its features."""

    count: OpCount  # per image
    features: Tensor


def query_pass(backbone: nn.Module, x: Tensor, shape_only: bool = True) -> QueryPass:
    """Count one query pass (fvcore) and keep its output, so that methods can reuse it."""
    store: Dict[str, Tensor] = {}

    def fn(z: Tensor) -> Tensor:
        store["q"] = backbone.query(z)
        return store["q"]

    with torch.no_grad():
        count = count_ops(fn, x, owner=backbone, shape_only=shape_only)
    return QueryPass(count.scaled(1.0 / x.shape[0]), store["q"].detach().clone())


class _PassProbe:
    """While active: ``backbone.query`` returns the stored query features and is counted, and every
    image embedding (one per backbone pass) is counted.

    The query pass always runs the same un-prompted graph, so it is counted once
    (:func:`query_pass`) and added per call; the rest of the method's forward is traced for real.
    """

    def __init__(self, backbone: nn.Module, q: QueryPass) -> None:
        self.backbone, self.q = backbone, q
        self.query_calls = 0
        self.embeds = 0

    def _query(self, x: Tensor) -> Tensor:
        self.query_calls += 1
        return self.q.features.to(x.device)[: x.shape[0]].expand(x.shape[0], -1)

    def _embed(self, *args: Any) -> None:
        self.embeds += 1

    def __enter__(self) -> "_PassProbe":
        self.backbone.query = self._query  # instance attribute shadows the method
        self._h = self.backbone.vit.patch_embed.register_forward_hook(self._embed)
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.backbone.query
        self._h.remove()

    @property
    def passes(self) -> int:
        return self.embeds + self.query_calls


@dataclass
class PassCost:
    """MACs per image of one call of the method (inference, or one training phase)."""

    forward: Counter  # by operator, all passes (query pass included)
    backward: Counter
    paper_ops: float  # module-hook convention operations (query pass included)
    passes: int
    query_calls: int
    phase: str = "eval"

    @property
    def forward_macs(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def backward_macs(self) -> float:
        return float(sum(self.backward.values()))


def _trace(method: ContinualMethod, x: Tensor, q: QueryPass, train: bool, kwargs: Dict[str, Any], phase: str,
           shape_only: bool) -> PassCost:
    was = method.training
    method.train(train)
    ctx = torch.enable_grad() if train else torch.no_grad()
    try:
        with _PassProbe(method.backbone, q) as probe, ctx:
            oc = count_ops(lambda z: method(z, query=None, **kwargs), x, owner=method, shape_only=shape_only)
    finally:
        method.train(was)
    b = x.shape[0]
    calls = probe.query_calls
    # one query call covers the batch: per image it costs one query pass
    fwd = Counter({k: v / b for k, v in oc.forward.items()})
    for k, v in q.count.forward.items():
        fwd[k] += calls * v
    bwd = Counter({k: v / b for k, v in oc.backward.items()})
    paper = oc.paper / b + calls * q.count.paper
    return PassCost(fwd, bwd, paper, probe.passes, calls, phase)


def _with_batch_fallback(fn, method: ContinualMethod, x: Tensor, q: QueryPass, *args: Any) -> PassCost:
    """Trace at batch 1; a method whose forward needs a larger batch (squeeze() etc.) gets 2."""
    try:
        return fn(method, x[:1], QueryPass(q.count, q.features[:1]), *args)
    except Exception:
        x2 = torch.cat([x[:1], x[:1]])
        return fn(method, x2, QueryPass(q.count, torch.cat([q.features[:1]] * 2)), *args)


def inference_cost(method: ContinualMethod, x: Tensor, q: QueryPass, shape_only: bool = True) -> PassCost:
    """MACs per image of the method's evaluation forward (every pass, query included)."""
    return _with_batch_fallback(_trace, method, x, q, False, {}, "eval", shape_only)


def training_costs(method: ContinualMethod, x: Tensor, q: QueryPass, task: Optional[Task] = None,
                   shape_only: bool = True) -> List[PassCost]:
    """MACs per training image of each phase of ``task`` (default: the current task)."""
    task = task if task is not None else method.current_task
    out: List[PassCost] = []
    for phase in (method.phases(task) if task is not None else []):
        out.append(_with_batch_fallback(_trace, method, x, q, True, dict(phase.forward_kwargs), phase.name, shape_only))
    return out


def flop_summary(method: ContinualMethod, x: Tensor, q: QueryPass, name: Optional[str] = None,
                 shape_only: bool = True) -> Dict[str, Any]:
    """The MAC / FLOP figures of the cost table for ``method`` in its current task (traced with
    shape-only matrix kernels unless ``shape_only`` is False; the counts are the same)."""
    name = name or method.name
    inf = inference_cost(method, x, q, shape_only)
    phases = training_costs(method, x, q, shape_only=shape_only)
    main = max(phases, key=lambda c: c.forward_macs + c.backward_macs) if phases else None
    plain = q.count.forward_total
    out: Dict[str, Any] = {
        "query_pass": inf.query_calls > 0,
        "inference_passes": inf.passes,
        "train_passes": main.passes if main else 0,
        "inference_gmacs": inf.forward_macs / GIGA,
        "inference_gflops": 2 * inf.forward_macs / GIGA,
        "attention_gmacs": inf.forward.get("attention", 0.0) / GIGA,
        "extra_gmacs": (inf.forward_macs - inf.passes * plain) / GIGA,
        "train_gmacs": (main.forward_macs + main.backward_macs) / GIGA if main else 0.0,
        "train_gflops": 2 * (main.forward_macs + main.backward_macs) / GIGA if main else 0.0,
        "train_fwd_gmacs": main.forward_macs / GIGA if main else 0.0,
        "train_bwd_gmacs": main.backward_macs / GIGA if main else 0.0,
        "train_phase": main.phase if main else None,
        "paper_convention_gflops_inference": 2 * inf.paper_ops / GIGA,
        "paper_convention_gflops_train": None,
    }
    if main is not None:
        per_query = q.count.paper
        own = main.paper_ops - main.query_calls * per_query
        n_query = POSTER_TRAIN_QUERY_PASSES.get(name, main.query_calls)
        out["paper_convention_gflops_train"] = 2 * (own + n_query * per_query) / GIGA
    out["train_phases"] = [
        {"phase": c.phase, "passes": c.passes, "fwd_gmacs": c.forward_macs / GIGA, "bwd_gmacs": c.backward_macs / GIGA}
        for c in phases
    ]
    return out


def probe_input(backbone: nn.Module, batch: int = 1, seed: int = 0) -> Tensor:
    """A seeded random image batch at the backbone's input size, on its device."""
    g = torch.Generator().manual_seed(seed)
    p = next(backbone.parameters())
    return torch.rand(batch, 3, backbone.img_size, backbone.img_size, generator=g).to(p.device, p.dtype)


# --- result.json ---------------------------------------------------------------------------

def run_cost(method: ContinualMethod, scenario: Any) -> Dict[str, Any]:
    """The cost block of result.json: the figures of the cost table for the run's own backbone,
    counted on a copy of the trained method in its final task (the method is left untouched)."""
    out: Dict[str, Any] = dict(parameter_counts(method))
    state = state_count(method)
    out["state_by_kind"] = state.by_kind
    out["query_pass"] = bool(method.uses_query)
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), single_thread():
            probe = copy.deepcopy(method)
            x = probe_input(probe.backbone)
            q = query_pass(probe.backbone, x)
            out.update(flop_summary(probe, x, q))
        del probe
    except Exception as e:  # a cost that cannot be traced must not lose the run's result
        out["flops_error"] = f"{type(e).__name__}: {e}"
    out["units"] = "params and state in numbers; gmacs: 1e9 multiply-adds per image; gflops = 2 x gmacs"
    return out

