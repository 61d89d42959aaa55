"""Numeric parity of a method against its authors' code: ``bench.py parity METHOD --ref PATH``.

With a local checkout of the authors' repository (``--ref``), both implementations are built side
by side in one process (ViT-B/16 with the *same* random weights, fp32, CPU) and compared, per
preset and benchmark that the reference has a configuration for. Checks, in the order they run:

``init``           statistics of the freshly built trainable tensors under a fixed seed, before any
                   weight is shared (two-sample Kolmogorov-Smirnov distance of the values, and the
                   relative difference of their std); copying weights would hide an init difference
``boundary/*``     the start of task 1 from identical task-0 tensors: which tensors the boundary
                   re-draws or copies (``boundary/changed``: fraction of changed elements), their
                   values afterwards, and whatever other state the adapter reports (masks, frozen
                   parts as requires_grad flags, class statistics, prototypes)
``logits/eval``    eval-mode logits of one batch (after the task-1 tensors are made identical again)
``logits/train``   train-mode logits of the training step
``loss/<term>``    each loss term of that step
``grad``           the gradient of every trainable tensor (a missing gradient counts as zeros)
``step``           the tensors after one optimiser step
``lr``             the lr of every epoch of the preset's schedule (first iteration of each epoch)
``loader``         training steps per epoch for a task of ``LOADER_IMAGES`` images (drop_last)
``transform/*``    the train (fixed RNG) and test transform of one image

Every row has the largest absolute difference, its tolerance (``atol + rtol * max|reference|``)
and a status: PASS (within tolerance), DEVIATION (outside it, and the adapter names the docs
paragraph that documents the difference as intended) or FAIL (any other difference, a tensor that
exists on one side only, a shape mismatch).

Adding a method to parity (docs/parity.md has the long form)
-----------------------------------------------------------
Write ``benchmarks/tools/parity_<name>.py`` (every ``benchmarks/tools/parity_*.py`` module is imported when
the harness looks adapters up) with one :class:`Adapter` subclass per method::

    @register_adapter
    class MyAdapter(Adapter):
        method = "my_method"                  # the registry name of our implementation
        repo = "owner/name"                   # the authors' repository
        deviations = {"transform/test": "docs/methods-x.md#test-time-resize"}  # check glob -> docs

        def cases(self) -> list[Case]:        # presets x benchmarks the reference has a config for
            return [Case("paper", "cifar100", "configs/cifar100_x.py")]

        def reference(self, case, ref_dir, vit, ours) -> Side:
            ...                               # build the authors' model from ref_dir (import their
                                              # modules at run time; nothing is copied)

``ours`` is our side (:class:`OurSide`, generic for every registered method). The reference side
subclasses :class:`Side` and answers the same questions: its tensors under *our* parameter names
(the adapter maps its names), ``set_tensors`` to load ours, ``start_task``, ``eval_logits``,
``train_step``, ``lrs``, ``steps_per_epoch``, ``transform`` and ``boundary_state``. Tests can
build a :class:`Side` from plain functions (tests/test_parity.py). Further hooks:
``Case.overrides`` / ``Case.deviations`` (a second case with a documented reference option set,
so that the rest is still compared exactly), ``Adapter.end_of_task`` (False when the reference
side does not model end-of-task statistics), ``OurSide.buffers`` (buffers reported at the
boundary), ``Side.pixels`` (undo a normalisation). A method may have several adapters, one per
reference repository; the one whose ``check_ref`` accepts ``--ref`` runs.

Exit status: 0 when no row FAILs, 1 when one does, 2 for a usage error (one sentence on stderr).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # one OpenMP thread unless told otherwise (must precede the torch import)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import fnmatch
import importlib
import json
import math
import pkgutil
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- results ---------------------------------------------------------------------------------

PASS, FAIL, DEVIATION = "PASS", "FAIL", "DEVIATION"

# (atol, rtol) per check family; fp32 on both sides, but different kernels (fused attention
# against explicit softmax(QK^T)V, different summation orders), so not bit-equal
TOLERANCES: Dict[str, Tuple[float, float]] = {
    "logits": (1e-5, 1e-4),
    "loss": (1e-6, 1e-4),
    "grad": (1e-8, 1e-3),
    "step": (1e-6, 1e-4),
    "lr": (1e-12, 1e-9),
    "loader": (0.0, 0.0),
    "transform": (3 / 255, 0.0),  # PIL (the references) against torchvision tensor resizing
    "boundary": (1e-6, 1e-4),
}
LOADER_IMAGES = 5003  # a prime-ish task size whose last batch is incomplete for every batch size used
TASK = 1  # the task the step is compared in (the second, so the boundary and old classes matter)


@dataclass
class Row:
    """One line of the parity table."""

    case: str
    check: str
    tensor: str
    max_abs: float
    tol: float
    status: str
    note: str = ""


def status_for(check: str, diff: float, tol: float, deviations: Dict[str, str], note: str = "") -> Tuple[str, str]:
    """PASS within tolerance; else DEVIATION with its docs link when documented, else FAIL."""
    if diff <= tol and not math.isnan(diff):
        return PASS, note
    for pattern, link in deviations.items():
        if fnmatch.fnmatch(check, pattern):
            return DEVIATION, (note + "; " if note else "") + link
    return FAIL, note


def compare_tensors(case: str, check: str, ours: Dict[str, Tensor], ref: Dict[str, Tensor],
                    deviations: Dict[str, str], family: Optional[str] = None,
                    missing_as_zero: bool = False, extra_tol: Optional[Dict[str, float]] = None) -> List[Row]:
    """One row per tensor name of either side: max |ours - ref| against ``atol + rtol·max|ref|``
    (+ ``extra_tol[name]``)."""
    atol, rtol = TOLERANCES[family or check.split("/")[0]]
    rows = []
    for name in sorted(set(ours) | set(ref)):
        a, b = ours.get(name), ref.get(name)
        if missing_as_zero and (a is None) != (b is None):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
        if a is None or b is None:
            side = "ours" if b is None else "the reference"
            rows.append(Row(case, check, name, float("nan"), 0.0, FAIL, f"only in {side}"))
            continue
        a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
        if a.shape != b.shape:
            rows.append(Row(case, check, name, float("nan"), 0.0, FAIL,
                            f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"))
            continue
        same = a == b  # equal values, infinities (masked logits) included
        d = torch.where(same, torch.zeros_like(a), (a - b).abs())
        diff = float(d.max()) if a.numel() else 0.0
        finite = b[torch.isfinite(b)]
        tol = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0) + (extra_tol or {}).get(name, 0.0)
        status, note = status_for(check, diff, tol, deviations)
        rows.append(Row(case, check, name, diff, tol, status, note))
    return rows


def ks_distance(a: Tensor, b: Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| (exact, by sorting)."""
    a, b = a.detach().double().flatten().sort().values, b.detach().double().flatten().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """Critical KS distance at level ``alpha`` (asymptotic: c(alpha)·sqrt((n+m)/(n·m)))."""
    c = math.sqrt(-0.5 * math.log(alpha / 2))
    return c * math.sqrt((n + m) / (n * m))


def init_stats(t: Tensor) -> str:
    t = t.detach().double().flatten()
    if not t.numel():
        return "empty"
    return f"mean {float(t.mean()):.3g} std {float(t.std()) if t.numel() > 1 else 0.0:.3g} range [{float(t.min()):.3g}, {float(t.max()):.3g}]"


def compare_init(case: str, ours: Dict[str, Tensor], ref: Dict[str, Tensor], deviations: Dict[str, str],
                 check: str = "init") -> List[Row]:
    """Same distribution? Per tensor: KS distance against its 0.1 % critical value (constant
    tensors must be equal), and the std within 10 % (a KS test alone is weak for small tensors)."""
    rows = []
    for name in sorted(set(ours) | set(ref)):
        a, b = ours.get(name), ref.get(name)
        if a is None or b is None:
            side = "ours" if b is None else "the reference"
            rows.append(Row(case, check, name, float("nan"), 0.0, FAIL, f"only in {side}"))
            continue
        if a.shape != b.shape and a.dim() > 1:  # re-drawn elements (1-D) may differ in number
            rows.append(Row(case, check, name, float("nan"), 0.0, FAIL,
                            f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"))
            continue
        note = f"ours {init_stats(a)}; ref {init_stats(b)}"
        da, db = a.detach().double().flatten(), b.detach().double().flatten()
        if da.numel() < 2 or db.numel() < 2 or float(db.std()) == 0.0 or float(da.std()) == 0.0:
            if da.shape != db.shape:
                rows.append(Row(case, check, name, float("nan"), 0.0, FAIL,
                                f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"))
                continue
            diff = float((da - db).abs().max()) if da.numel() else 0.0  # constants: equal values
            tol = 1e-12
        else:
            ks = ks_distance(da, db)
            crit = ks_critical(da.numel(), db.numel())
            std_rel = abs(float(da.std()) / float(db.std()) - 1.0)
            # the std within 10 % plus four standard errors of a sample std (~1/sqrt(2n)), which
            # matters only for small tensors (100 head biases: 38 %)
            std_tol = 0.1 + 4 / math.sqrt(2 * min(da.numel(), db.numel()))
            # one number for the table: the KS distance in units of its critical value, or the std
            # ratio in units of its tolerance, whichever is worse (<= 1 passes)
            diff, tol = max(ks / crit, std_rel / std_tol), 1.0
            note = f"KS {ks:.3g} (crit {crit:.3g}), std ratio {1 + std_rel:.3g}; " + note
        status, note = status_for(check, diff, tol, deviations, note)
        rows.append(Row(case, check, name, diff, tol, status, note))
    return rows


# --- the two sides ---------------------------------------------------------------------------

@dataclass
class Step:
    """What one training step shows: train-mode logits, each loss term, gradients and tensors after."""

    logits: Tensor
    losses: Dict[str, Tensor]
    grads: Dict[str, Tensor]
    after: Dict[str, Tensor]


class Side:
    """One implementation, answering the harness's questions under *our* tensor names.

    Subclasses implement every method; tests build small ones. ``init`` holds the freshly built
    trainable tensors (recorded at construction, before any weight is shared)."""

    init: Dict[str, Tensor]
    image_size: int = 224  # input size of the compared batch (ViT-B/16: 224)
    # tensors the task boundary *trains* (e.g. OVOR's head in the outlier epochs): compared by
    # value after the boundary (``boundary/trained``), never filed as re-drawn (by distribution)
    boundary_trained: Tuple[str, ...] = ()

    def tensors(self) -> Dict[str, Tensor]:
        """Current values of the method's own tensors (prompts, keys, heads, ...), by our names."""
        raise NotImplementedError

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        """Load ``values`` (our names) into this side's tensors; a name it lacks is ignored."""
        raise NotImplementedError

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Whatever the code does at the start of task ``t`` (after task ``t-1``; ``prev`` is a
        batch of task ``t-1`` for end-of-task statistics)."""
        raise NotImplementedError

    def boundary_state(self) -> Dict[str, Tensor]:
        """Other state the task boundary leaves (masks, requires_grad flags, statistics ...)."""
        return {}

    def eval_logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        raise NotImplementedError

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        """lr at the first iteration of every epoch, per trainable tensor (our names)."""
        raise NotImplementedError

    def steps_per_epoch(self, images: int) -> int:
        raise NotImplementedError

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        """The (train or test) transform of ``image`` (H, W, 3 uint8) with the RNG seeded by ``seed``."""
        raise NotImplementedError

    def pixels(self, t: Tensor) -> Tensor:
        """Undo this side's input normalisation (identity when it has none)."""
        return t


def method_tensors(m: nn.Module) -> Dict[str, Tensor]:
    """The method's own parameters (not the backbone's)."""
    return {n: p for n, p in m.named_parameters() if not n.startswith("backbone.")}


def our_lrs(groups: List[Dict[str, Any]], tcfg: Any, steps_per_epoch: int, named: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Our optimiser and scheduler over ``groups``: the lr of every tensor of ``named`` per epoch."""
    from benchmarks.run.protocol import build_optimizer, build_scheduler

    opt = build_optimizer(groups, tcfg)
    sched = build_scheduler(opt, tcfg, steps_per_epoch)
    per: Dict[int, List[float]] = {}
    for _ in range(tcfg.epochs):
        for g in opt.param_groups:
            for p in g["params"]:
                per.setdefault(id(p), []).append(g["lr"])
        for _ in range(steps_per_epoch):
            opt.step()  # no gradients: a no-op that keeps the scheduler's step-order check quiet
            sched.step()
    return {n: torch.tensor(per[id(p)], dtype=torch.float64) for n, p in named.items() if id(p) in per}


def captured_forward(method: nn.Module, step: Callable[[], Any], seed: Optional[int] = None) -> Any:
    """Run ``step`` (a ``TrainStep``; from RNG state ``seed`` if given) and return the last output
    of ``method``'s forward in it."""
    seen: List[Any] = []
    hook = method.register_forward_hook(lambda mod, args, out: seen.append(out))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        step()
    finally:
        hook.remove()
    return seen[-1]


class OurSide(Side):
    """Our implementation of ``name`` with a resolved preset, on ``vit`` (shared, frozen).
    ``buffers``: names of the method's buffers that ``boundary_state`` reports (the adapter sets
    them where the reference side reports the same state)."""

    buffers: List[str] = []

    def __init__(self, name: str, cfg: Any, vit: nn.Module, seed: int = 0) -> None:
        from benchmarks.tables.cost_table import benchmark_classes, build_method, make_tasks
        from methods.vit import PromptedViT

        self.cfg = cfg
        self.num_classes = benchmark_classes(cfg)
        self.tasks = make_tasks(self.num_classes, cfg.benchmark.num_tasks)
        backbone = PromptedViT(vit)
        self.image_size = int(cfg.benchmark.image_size or backbone.vit.patch_embed.img_size[0])
        self.method = build_method(name, cfg, backbone, self.num_classes, cfg.benchmark.num_tasks, seed=seed)
        self.init = {n: p.detach().clone() for n, p in method_tensors(self.method).items()}

    def tensors(self) -> Dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in method_tensors(self.method).items()}

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        own = method_tensors(self.method)
        with torch.no_grad():
            for n, v in values.items():
                if n in own and own[n].shape == v.shape:
                    own[n].copy_(v)

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t > 0 and prev is not None:
            self.method.end_task(self.tasks[t - 1], BatchContext(self, prev))
        self.method.begin_task(self.tasks[t])

    def boundary_state(self) -> Dict[str, Tensor]:
        phase = self.method.phases(self.tasks[TASK])[-1]
        groups = phase.param_groups if phase.param_groups is not None else self.method.param_groups()
        optimised = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        out = {f"trained:{n}": torch.tensor(float(id(p) in optimised)) for n, p in method_tensors(self.method).items()}
        own = dict(self.method.named_buffers())
        out.update({f"buffer:{n}": own[n].detach().clone().double() for n in self.buffers})
        return out

    def eval_logits(self, x: Tensor) -> Tensor:
        from benchmarks.run.speed import InferBatch

        return InferBatch(self.method, x)()

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        from benchmarks.run.speed import TrainStep

        step = TrainStep(self.method, self.tasks[TASK], x, y, self.cfg.train)
        out = captured_forward(self.method, step)
        logits = out.logits if step.mask is None else out.logits.masked_fill(~step.mask, float("-inf"))
        losses = {"ce": F.cross_entropy(logits.float(), y).detach()}
        if out.aux_loss is not None:
            losses["aux"] = out.aux_loss.detach()
        named = method_tensors(self.method)
        grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        return Step(out.logits.detach(), losses, grads, self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        from benchmarks.run.protocol import phase_config

        phase = self.method.phases(self.tasks[TASK])[-1]
        groups = phase.param_groups if phase.param_groups is not None else self.method.param_groups()
        return our_lrs(groups, phase_config(self.cfg.train, phase), steps_per_epoch, method_tensors(self.method))

    def steps_per_epoch(self, images: int) -> int:
        from benchmarks.run.protocol import phase_config

        tcfg = phase_config(self.cfg.train, self.method.phases(self.tasks[TASK])[-1])
        drop = tcfg.drop_last and images >= tcfg.batch_size
        return images // tcfg.batch_size if drop else math.ceil(images / tcfg.batch_size)

    def pixels(self, t: Tensor) -> Tensor:
        from benchmarks.data.datasets import _NORMS

        norm = _NORMS.get(self.cfg.benchmark.normalize)
        if norm is None:
            return t
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in norm)
        return t * std + mean

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        from benchmarks.data.datasets import build_transform

        native = max(image.shape[:2])
        tf = build_transform(self.cfg.benchmark, self.image_size, native, train)
        torch.manual_seed(seed)
        return tf(torch.from_numpy(image).permute(2, 0, 1).contiguous())


class BatchContext:
    """The part of :class:`benchmarks.run.protocol.TaskContext` an ``end_task`` uses, over one batch."""

    def __init__(self, side: OurSide, batch: Tuple[Tensor, Tensor]) -> None:
        self.side, self.batch, self.cfg = side, batch, side.cfg
        self.device = batch[0].device

    def autocast(self):
        return torch.autocast(device_type="cpu", enabled=False)

    def log(self, msg: str) -> None:
        pass

    def generator(self, *parts: object) -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def train_loader(self, *a: Any, **k: Any):
        return [(self.batch[0], self.batch[1], torch.arange(len(self.batch[1])))]

    def query_features(self, method: Any, transform: str = "test") -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            return method.backbone.query(self.batch[0]), self.batch[1]

    def features(self, fn: Callable[[Tensor], Tensor], transform: str = "train") -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            return fn(self.batch[0]), self.batch[1]


# --- adapters --------------------------------------------------------------------------------

@dataclass
class Case:
    """One preset × benchmark the reference has a configuration for."""

    preset: str
    benchmark: str
    ref_config: str  # the reference's config / script it corresponds to (shown in the table)
    overrides: Dict[str, Any] = field(default_factory=dict)  # our --set overrides (e.g. a variant)
    options: Dict[str, Any] = field(default_factory=dict)  # adapter-specific (reference arguments)
    deviations: Dict[str, str] = field(default_factory=dict)  # documented differences of this case only

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(flatten(self.overrides).items()))
        return f"{self.preset}/{self.benchmark}" + (f"[{extra}]" if extra else "")


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Adapter:
    """How to build one method's reference side; see the module docstring."""

    method: str = ""
    repo: str = ""
    deviations: Dict[str, str] = {}  # check glob -> docs paragraph documenting the difference
    # whether the boundary includes end-of-task work on a batch of the previous task (class
    # statistics, usage counts, alignment); False where the reference side does not model it
    end_of_task: bool = True

    def cases(self) -> List[Case]:
        raise NotImplementedError

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        from benchmarks.tables.cost_table import resolve_method_config

        cfg, _ = resolve_method_config(self.method, case.benchmark, case.preset, case.overrides)
        return OurSide(self.method, cfg, vit, seed)

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        raise NotImplementedError

    def check_ref(self, ref_dir: str) -> Optional[str]:
        """None when ``ref_dir`` looks like a checkout of :attr:`repo`, else why not (one sentence)."""
        return None


ADAPTERS: Dict[str, List[Adapter]] = {}  # a method may have several references (e.g. l2p: l2p-pytorch, CODA)


def register_adapter(cls: type) -> type:
    ADAPTERS.setdefault(cls.method, []).append(cls())
    return cls


def pick_adapter(method: str, ref_dir: str) -> Adapter:
    """The adapter of ``method`` whose repository ``ref_dir`` is a checkout of (ParityError if none)."""
    adapters = load_adapters()
    if method not in adapters:
        raise ParityError(f"no parity adapter for '{method}'; available: {', '.join(sorted(adapters))}")
    repos = " or ".join(a.repo for a in adapters[method])
    if not os.path.isdir(ref_dir):
        raise ParityError(f"--ref {ref_dir} is not a directory; pass a local checkout of {repos}")
    whys = []
    for adapter in adapters[method]:
        why = adapter.check_ref(ref_dir)
        if why is None:
            return adapter
        whys.append(why)
    raise ParityError(whys[0] if len(whys) == 1 else f"--ref {ref_dir} is not a checkout of {repos}")


def load_adapters() -> Dict[str, List[Adapter]]:
    """Import every ``benchmarks/tools/parity_*.py`` module (each registers its adapters)."""
    from benchmarks import tools

    for mod in pkgutil.iter_modules(tools.__path__):
        if mod.name.startswith("parity_"):
            importlib.import_module(f"benchmarks.tools.{mod.name}")
    return ADAPTERS


# --- running the checks ----------------------------------------------------------------------

def probe_image(benchmark: str, seed: int = 0) -> np.ndarray:
    """One fixed image of the benchmark's native size (CIFAR 32 px; others 375 x 500): a smooth
    random field plus noise, so both resizing and cropping show up."""
    g = torch.Generator().manual_seed(seed)
    h, w = (32, 32) if benchmark in ("cifar100", "cifar10") else (375, 500)
    low = torch.rand(1, 3, 8, 8, generator=g)
    smooth = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = (smooth * 200 + torch.rand(3, h, w, generator=g) * 55).clamp(0, 255)
    return img.permute(1, 2, 0).to(torch.uint8).numpy()


def batch_for(num_classes: int, num_tasks: int, task: int, batch: int, seed: int = 0,
              size: int = 224) -> Tuple[Tensor, Tensor]:
    """A batch of random images with labels of ``task`` (equal class splits)."""
    g = torch.Generator().manual_seed(seed + 101 * task)
    per = num_classes // num_tasks
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(task * per, (task + 1) * per, (batch,), generator=g)
    return x, y


def run_sides(case: str, ours: Side, ref: Side, num_classes: int, num_tasks: int, benchmark: str,
              deviations: Dict[str, str], batch: int = 2, seed: int = 0,
              log: Callable[[str], None] = lambda s: None, end_of_task: bool = True) -> List[Row]:
    """Every check on two built sides (the part of :func:`run_case` the tests drive directly)."""
    rows: List[Row] = []
    log("init")
    rows += compare_init(case, ours.init, ref.init, deviations)
    # identical task-0 tensors, then the boundary into task TASK
    ref.set_tensors(ours.tensors())
    prev = batch_for(num_classes, num_tasks, TASK - 1, batch, seed, ours.image_size) if end_of_task else None
    for t in range(TASK + 1):
        log(f"start task {t}")
        before_o, before_r = ours.tensors(), ref.tensors()
        ours.start_task(t, prev if t else None)
        ref.start_task(t, prev if t else None)
    after_o, after_r = ours.tensors(), ref.tensors()
    changed = lambda b, a: {n: (a[n] != b[n]).double().mean() for n in a if n in b and a[n].shape == b[n].shape}  # noqa: E731
    ch_o, ch_r = changed(before_o, after_o), changed(before_r, after_r)
    rows += compare_tensors(case, "boundary/changed", ch_o, ch_r, deviations, "boundary")
    trained = {n for n in ref.boundary_trained if n in after_o and n in after_r}
    redrawn = {n for n in ch_o if n in ch_r and float(ch_o[n]) > 0 and float(ch_r[n]) > 0
               and not torch.equal(after_o[n], after_r[n])} - trained
    # elements both sides re-draw at the boundary: their distributions (as init); every other
    # element: its value
    fresh_o, fresh_r, kept_o, kept_r = {}, {}, {}, {}
    for n in after_o:
        if n in trained:
            continue
        if n not in after_r:
            kept_o[n] = after_o[n]
        elif n in redrawn:
            mo, mr = after_o[n] != before_o[n], after_r[n] != before_r[n]
            fresh_o[n], fresh_r[n] = after_o[n][mo], after_r[n][mr]
            if torch.equal(mo, mr):
                kept_o[n], kept_r[n] = after_o[n][~mo], after_r[n][~mr]
        else:
            kept_o[n], kept_r[n] = after_o[n], after_r[n]
    kept_r.update({n: v for n, v in after_r.items() if n not in after_o})
    rows += compare_init(case, fresh_o, fresh_r, deviations, check="boundary/redrawn")
    rows += compare_tensors(case, "boundary/values", kept_o, kept_r, deviations, "boundary")
    # trained at the boundary: by value, allowing 1 % of the reference's largest change (several
    # epochs of fp32 training with other kernels; a wrong lr, loss or data moves it by far more)
    moved = {n: 0.01 * float((after_r[n] - before_r[n]).abs().max()) for n in trained}
    rows += compare_tensors(case, "boundary/trained", {n: after_o[n] for n in trained},
                            {n: after_r[n] for n in trained}, deviations, "boundary", extra_tol=moved)
    st_o, st_r = ours.boundary_state(), ref.boundary_state()
    # which tensors the optimiser trains, for the tensors the reference side can say it of (CODA's
    # and HiDe's optimisers hold every task's slots in one tensor or list, and the forward detaches
    # or ignores the others): what really gets a gradient is the grad check's business
    st_o = {k: v for k, v in st_o.items() if not k.startswith("trained:") or k in st_r}
    rows += compare_tensors(case, "boundary/state", st_o, st_r, deviations, "boundary")
    ref.set_tensors(ours.tensors())
    x, y = batch_for(num_classes, num_tasks, TASK, batch, seed, ours.image_size)
    log("eval logits")
    with torch.no_grad():
        rows += compare_tensors(case, "logits/eval", {"logits": ours.eval_logits(x)}, {"logits": ref.eval_logits(x)},
                                deviations)
    ref_before_step = ref.tensors()
    log("train step (ours)")
    so = ours.train_step(x, y)
    log("train step (reference)")
    sr = ref.train_step(x, y)
    rows += compare_tensors(case, "logits/train", {"logits": so.logits}, {"logits": sr.logits}, deviations)
    for term in sorted(set(so.losses) | set(sr.losses)):  # a term one side does not add counts as 0
        rows += compare_tensors(case, f"loss/{term}", {term: so.losses[term]} if term in so.losses else {},
                                {term: sr.losses[term]} if term in sr.losses else {}, deviations, missing_as_zero=True)
    rows += compare_tensors(case, "grad", so.grads, sr.grads, deviations, missing_as_zero=True)
    # Adam's first update is about lr·g/(|g|+eps): where a gradient is near eps, a tiny gradient
    # difference moves the update a lot, so the step also allows 1 % of the reference's update
    # (a wrong lr, optimiser or gradient moves it by far more)
    before = ref_before_step
    upd = {n: 0.01 * float((v - before[n]).abs().max()) for n, v in sr.after.items() if n in before and v.shape == before[n].shape}
    rows += compare_tensors(case, "step", so.after, {n: v for n, v in sr.after.items() if n in so.after}, deviations,
                            extra_tol=upd)
    log("schedule, loader, transforms")
    # lr of every tensor our optimiser trains; tensors only the reference's optimiser holds (and
    # its forward detaches) are left to the grad check
    lr_o, lr_r = ours.lrs(3), ref.lrs(3)
    rows += compare_tensors(case, "lr", lr_o, {n: v for n, v in lr_r.items() if n in lr_o}, deviations)
    rows += compare_tensors(case, "loader", {"steps_per_epoch": torch.tensor(float(ours.steps_per_epoch(LOADER_IMAGES)))},
                            {"steps_per_epoch": torch.tensor(float(ref.steps_per_epoch(LOADER_IMAGES)))}, deviations)
    img = probe_image(benchmark, seed)
    for train in (True, False):
        name = "transform/train" if train else "transform/test"
        # both outputs back to pixel units with our normalisation (a reference normalising
        # differently then shows as a difference), so that the tolerance is in pixels
        rows += compare_tensors(case, name, {"image": ours.pixels(ours.transform(img, train, seed + 7))},
                                {"image": ours.pixels(ref.transform(img, train, seed + 7))}, deviations)
    return rows


def run_case(adapter: Adapter, case: Case, ref_dir: str, vit: nn.Module, batch: int = 2, seed: int = 0,
             log: Callable[[str], None] = lambda s: None) -> List[Row]:
    """Every check of one case; ``vit`` is the random ViT-B/16 both sides get (frozen, shared)."""
    log(f"{case.label}: building ours")
    ours = adapter.ours(case, vit, seed)
    log(f"{case.label}: building the reference")
    torch.manual_seed(seed)
    ref = adapter.reference(case, ref_dir, vit, ours, seed)
    assert isinstance(ours, OurSide)
    return run_sides(case.label, ours, ref, ours.num_classes, ours.cfg.benchmark.num_tasks, case.benchmark,
                     {**adapter.deviations, **case.deviations}, batch, seed, log=lambda s: log(f"{case.label}: {s}"),
                     end_of_task=adapter.end_of_task)


# --- output ----------------------------------------------------------------------------------

def fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3g}"


def markdown_table(rows: List[Row], tensors: bool = False, links: bool = False) -> str:
    """The parity table. Unless ``tensors``: PASS rows of one case and check are folded into one
    (worst difference, tensor count), and so are FAIL / DEVIATION rows of one check that differ
    identically (same difference and note, e.g. one lr schedule for every tensor)."""
    lines = ["| case | check | tensor | max abs diff | tolerance | status | note |", "|---|---|---|---|---|---|---|"]
    shown: List[Tuple[Row, int]] = []
    for r in rows:
        last = shown[-1][0] if shown else None
        same_fail = last is not None and r.status != PASS and last.status == r.status and last.note == r.note \
            and (last.max_abs == r.max_abs or (math.isnan(last.max_abs) and math.isnan(r.max_abs)))
        if not tensors and last is not None and last.case == r.case and last.check == r.check and same_fail:
            shown[-1] = (last, shown[-1][1] + 1)  # identical failures of many tensors: one row
        elif not tensors and r.status == PASS and last is not None and last.status == PASS \
                and last.case == r.case and last.check == r.check:
            prev, n = shown[-1]
            worst = r if (r.max_abs / r.tol if r.tol else r.max_abs) > (prev.max_abs / prev.tol if prev.tol else prev.max_abs) else prev
            shown[-1] = (worst, n + 1)
        else:
            shown.append((r, 1))
    for r, n in shown:
        name = r.tensor if n == 1 else f"{n} tensors ({'worst' if r.status == PASS else 'first'}: {r.tensor})"
        status = f"**{r.status}**" if r.status != PASS else r.status
        note = r.note
        if links:  # docs/x.md#y -> a link relative to docs/ (where the tables are kept)
            note = re.sub(r"docs/(\S+?\.md(?:#\S+)?)", r"[docs/\1](\1)", note)
        lines.append(f"| {r.case} | {r.check} | {name} | {fmt(r.max_abs)} | {fmt(r.tol)} | {status} | {note} |")
    return "\n".join(lines)


def record_markdown(record: Dict[str, Any]) -> str:
    """A ``--json`` record as a docs section: what ran, against which commit, then the table."""
    rows = [Row(**r) for r in record["rows"]]
    c = record["summary"]
    head = [f"`{record['command']}`" if record.get("command") else "",
            f"Reference: `{record['repo']}` @ `{record.get('commit') or 'unknown'}`; run {record['date']}, "
            f"torch {record['torch']}, batch {record['batch']}, seed {record['seed']}, {record['seconds']} s.",
            _suite_line(record.get("suite")),
            f"**{c[PASS]} PASS, {c[DEVIATION]} DEVIATION, {c[FAIL]} FAIL**", ""]
    return "\n\n".join(h for h in head if h) + "\n\n" + markdown_table(rows, links=True)


def _suite_line(suite: Optional[Dict[str, Any]]) -> str:
    """Which commit of this project ran (``runner.git_commit`` at the start of the run)."""
    if not suite or not suite.get("commit"):
        return ""
    return f"Suite: commit `{suite['commit']}`{' (with uncommitted changes)' if suite.get('dirty') else ''}."


def summary(rows: List[Row]) -> Dict[str, int]:
    out = {PASS: 0, DEVIATION: 0, FAIL: 0}
    for r in rows:
        out[r.status] += 1
    return out


class ParityError(Exception):
    """A user-facing error of the parity command (one sentence; exit status 2)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py parity", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("method", help="method to compare (an adapter name: l2p, dualprompt, coda_prompt, ...)")
    ap.add_argument("--ref", required=True, metavar="PATH", help="local checkout of the authors' repository")
    ap.add_argument("--case", action="append", default=None, metavar="PRESET/BENCHMARK",
                    help="only these cases (label prefix, repeatable); default: every case of the adapter")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override our side's config in every case (bench.py run's --set syntax)")
    ap.add_argument("--ref-commit", help="the checkout's commit, recorded in --json (default: git rev-parse HEAD)")
    ap.add_argument("--batch", type=int, default=2, help="images in the compared batch (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="write the rows and run details as JSON")
    ap.add_argument("--tensors", action="store_true", help="one table row per tensor (default: PASS rows folded)")


def run(a: argparse.Namespace) -> int:
    try:
        adapter = pick_adapter(a.method, a.ref)
        from benchmarks.config import ConfigError, deep_merge, parse_set

        try:
            extra = parse_set(a.set)
        except ConfigError as e:
            raise ParityError(str(e)) from None
        cases = [c for c in adapter.cases() if not a.case or any(c.label.startswith(p) for p in a.case)]
        from benchmarks.tables.cost_table import resolve_method_config

        for c in cases:
            c.overrides = deep_merge(c.overrides, extra)
            try:  # every case's config resolves before anything is built
                resolve_method_config(adapter.method, c.benchmark, c.preset, c.overrides)
            except ConfigError as e:
                raise ParityError(str(e)) from None
        if not cases:
            raise ParityError(f"no case of {a.method} matches {a.case}; cases: {', '.join(c.label for c in adapter.cases())}")
    except ParityError as e:
        print(f"error: {str(e).rstrip('.')}.", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    from benchmarks.run.runner import git_commit

    suite = git_commit()  # before anything runs: the code the numbers come from
    log = lambda s: print(f"  [{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    rows: List[Row] = []
    sys.path.insert(0, os.path.abspath(a.ref))
    t0 = time.time()
    from benchmarks.tables.cost_table import random_backbone

    # our ViT once, before any reference is imported (a JH-LEE-KR code base re-registers timm's
    # vit_base_patch16_224 with its own builder)
    vit = random_backbone("vit_base_patch16_224", seed=a.seed)
    for case in cases:
        rows += run_case(adapter, case, a.ref, vit, a.batch, a.seed, log)
    print(markdown_table(rows, a.tensors))
    counts = summary(rows)
    print(f"\n{counts[PASS]} PASS, {counts[DEVIATION]} DEVIATION, {counts[FAIL]} FAIL")
    if a.json:
        command = "bench.py parity " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["parity"] else sys.argv[1:])
        record = {"method": a.method, "repo": adapter.repo, "command": command, "ref": os.path.abspath(a.ref), "commit": a.ref_commit or ref_commit(a.ref), "suite": suite,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": a.batch, "seed": a.seed,
                  "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
                  "cases": [c.label for c in cases], "summary": counts,
                  "rows": [asdict(r) for r in rows]}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0 if counts[FAIL] == 0 else 1


def ref_commit(ref_dir: str) -> Optional[str]:
    """The checkout's commit: ``git rev-parse HEAD`` when it is a work tree, else a ``COMMIT`` file."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", ref_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    path = os.path.join(ref_dir, "COMMIT")
    return open(path).read().strip() if os.path.exists(path) else None


if __name__ == "__main__":
    # run the imported module's main: adapters register into benchmarks.tools.parity, not into __main__
    from benchmarks.tools.parity import main as _main

    sys.exit(_main())
