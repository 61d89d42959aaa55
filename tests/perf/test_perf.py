"""Perf suite (pytest-benchmark): ``pytest tests/perf --benchmark-only`` or ``make perf``.

Per registered method and training phase, a training step (``benchmarks.run.speed.TrainStep``: the
protocol's step, query pass included) and an inference batch (every pass, no cache) on

* the micro ViT on CPU, fp32 (methods sized by the ``quick`` preset), always;
* ViT-B/16 on CUDA, bf16 and fp32 (the ``paper`` preset's method config on CIFAR-100), when a GPU
  is present -- not collected otherwise (the summary lists what was left out and why).

Plus the query-cache benchmark: the second evaluation of a 2-pass method costs one backbone pass
per image (checked by counting the images each pass sees), and the optional ``torch.compile``
benchmark (``PROMPTCL_PERF_COMPILE=1``; inductor needs minutes to compile even the micro ViT on
a small CPU). Figures (images/s) are printed at the end; ``--benchmark-json FILE`` keeps them.

On CPU everything runs single-threaded and pytest-benchmark's timer is the process CPU time
(``tests/perf/conftest.py``), so the figures hold on a machine other processes load; pass
``--benchmark-timer time.perf_counter`` for wall-clock.

Environment knobs: ``PROMPTCL_PERF_BATCH`` (ViT-B/16 batch, default 64), ``PROMPTCL_PERF_ROUNDS``
(timed rounds, default 5 on CPU, 20 on CUDA), ``PROMPTCL_PERF_THREADS`` (CPU threads, default 1).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

from benchmarks.config import resolve_config
from benchmarks.tables.cost_table import build_method, make_tasks, random_backbone, resolve_method_config
from benchmarks.run.speed import InferBatch, PassCounter, TrainStep, compile_backbone, synchronize
from methods.backbones import create_backbone
from methods.registry import list_methods
from methods.vit import PromptedViT

from .conftest import FIGURES

CUDA = torch.cuda.is_available()
if not CUDA:
    torch.set_num_threads(int(os.environ.get("PROMPTCL_PERF_THREADS", "1")))
MICRO = "vit_micro_patch8_32"
VIT_B = "vit_base_patch16_224"
MICRO_BATCH = 8
GPU_BATCH = int(os.environ.get("PROMPTCL_PERF_BATCH", "64"))
# GPU-only benchmarks are not collected without CUDA (tests/perf/conftest.py deselects them and says so)
NEEDS_CUDA = pytest.mark.perf_cuda
TWO_PASS = ["l2p", "dualprompt", "coda_prompt"]


def rounds(device: str) -> int:
    return int(os.environ.get("PROMPTCL_PERF_ROUNDS", "20" if device == "cuda" else "5"))


# --- building methods ----------------------------------------------------------------------

def micro_method(name: str):
    """(method in its last task, tasks, run config) on a random micro ViT, quick-preset sizes."""
    cfg = resolve_config(name, "synthetic", "quick", {"backbone": {"name": MICRO, "pretrained": "none"}})
    backbone, _ = create_backbone(cfg.backbone)
    classes, n_tasks = 30, 5
    method = build_method(name, cfg, backbone, classes, n_tasks)
    tasks = make_tasks(classes, n_tasks)
    for t in tasks:
        method.begin_task(t)
    return method, tasks, cfg


_VIT_B: Dict[str, Any] = {}


def vit_b_method(name: str):
    """(method in its last task, tasks, run config) on a random ViT-B/16, paper-preset config."""
    if "vit" not in _VIT_B:
        _VIT_B["vit"] = random_backbone(VIT_B, seed=0)
    cfg, _ = resolve_method_config(name, "cifar100", "paper", {})
    method = build_method(name, cfg, PromptedViT(copy.deepcopy(_VIT_B["vit"])), 100, cfg.benchmark.num_tasks)
    tasks = make_tasks(100, cfg.benchmark.num_tasks)
    for t in tasks:
        method.begin_task(t)
    return method, tasks, cfg


def phase_cases() -> List[Tuple[str, str]]:
    """(method, phase) pairs with something to train, from the methods' own phase lists."""
    cases = []
    for name in list_methods():
        method, tasks, _ = micro_method(name)
        for ph in method.phases(tasks[-1]):
            groups = ph.param_groups if ph.param_groups is not None else method.param_groups()
            if any(p.requires_grad for g in groups for p in g["params"]):
                cases.append((name, ph.name))
    return cases


PHASES = phase_cases()


def run_benchmark(benchmark, fn, images: int, device: str, record: Dict[str, Any]) -> float:
    """Time ``fn`` with pytest-benchmark and record its images/s (median)."""

    def timed():
        out = fn()
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(timed, rounds=rounds(device), iterations=1, warmup_rounds=1)
    img_s = images / benchmark.stats.stats.median
    benchmark.extra_info.update({**record, "images_per_second": img_s})
    FIGURES.append({**record, "img_s": img_s})
    return img_s


def batch(method, task, n: int, device: str):
    g = torch.Generator().manual_seed(0)
    s = method.backbone.img_size
    x = torch.rand(n, 3, s, s, generator=g).to(device)
    y = torch.randint(task.class_start, task.class_end, (n,), generator=g).to(device)
    return x, y


def phase_named(method, task, name: str):
    return next(p for p in method.phases(task) if p.name == name)


# --- micro ViT, CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("name,phase", PHASES, ids=[f"{m}-{p}" for m, p in PHASES])
def test_train_step_micro_cpu(benchmark, name, phase):
    torch.manual_seed(0)
    method, tasks, cfg = micro_method(name)
    x, y = batch(method, tasks[-1], MICRO_BATCH, "cpu")
    step = TrainStep(method, tasks[-1], x, y, cfg.train, phase=phase_named(method, tasks[-1], phase))
    run_benchmark(benchmark, step, MICRO_BATCH, "cpu", dict(bench="train", method=f"{name}/{phase}", backbone=MICRO,
                                                            device="cpu", precision="fp32", batch=MICRO_BATCH))


@pytest.mark.parametrize("name", list_methods())
def test_inference_batch_micro_cpu(benchmark, name):
    method, tasks, _ = micro_method(name)
    x, _ = batch(method, tasks[-1], MICRO_BATCH, "cpu")
    run_benchmark(benchmark, InferBatch(method, x), MICRO_BATCH, "cpu",
                  dict(bench="infer", method=name, backbone=MICRO, device="cpu", precision="fp32", batch=MICRO_BATCH,
                       note="all passes, no cache"))


# --- ViT-B/16, CUDA ------------------------------------------------------------------------

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


@NEEDS_CUDA
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name,phase", PHASES, ids=[f"{m}-{p}" for m, p in PHASES])
def test_train_step_vit_b16_cuda(benchmark, name, phase, precision):
    torch.manual_seed(0)
    method, tasks, cfg = vit_b_method(name)
    method.cuda()
    x, y = batch(method, tasks[-1], GPU_BATCH, "cuda")
    step = TrainStep(method, tasks[-1], x, y, cfg.train, phase=phase_named(method, tasks[-1], phase),
                     amp_dtype=PRECISIONS[precision])
    run_benchmark(benchmark, step, GPU_BATCH, "cuda", dict(bench="train", method=f"{name}/{phase}", backbone=VIT_B,
                                                           device=torch.cuda.get_device_name(), precision=precision,
                                                           batch=GPU_BATCH))


@NEEDS_CUDA
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", list_methods())
def test_inference_batch_vit_b16_cuda(benchmark, name, precision):
    method, tasks, _ = vit_b_method(name)
    method.cuda()
    x, _ = batch(method, tasks[-1], GPU_BATCH, "cuda")
    run_benchmark(benchmark, InferBatch(method, x, amp_dtype=PRECISIONS[precision]), GPU_BATCH, "cuda",
                  dict(bench="infer", method=name, backbone=VIT_B, device=torch.cuda.get_device_name(),
                       precision=precision, batch=GPU_BATCH, note="all passes, no cache"))


# --- the query cache in evaluation ---------------------------------------------------------

def evaluation_setup(name: str, backbone: str, device: str):
    from benchmarks.run.protocol import QueryCache, RunContext, resolve_precision
    from benchmarks.run.runner import prepare

    over: Dict[str, Any] = {"backbone": {"name": backbone, "pretrained": "none"}, "device": device, "quiet": True,
                            "train": {"num_workers": 0}}
    # 10 synthetic classes in 5 tasks, 40 test images each (400 per evaluation of all tasks); the
    # micro ViT at 32 px, ViT-B/16 at 224 px
    over["benchmark"] = {"num_classes": 10, "num_tasks": 5, "train_per_class": 4, "test_per_class": 40}
    cfg = resolve_config(name, "synthetic", "quick", over)
    p = prepare(cfg)
    run = RunContext(cfg, p.scenario, p.device, resolve_precision(cfg.precision, p.device), QueryCache(True))
    for t in p.scenario.tasks:
        p.method.begin_task(t)
    return p, run


EVAL_SECONDS: Dict[Tuple[str, str], float] = {}  # (method, device) -> median s of the uncached evaluation


@pytest.mark.parametrize("cache", ["uncached", "cached"])  # uncached first: the cached row reports the ratio
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("name", TWO_PASS)
def test_evaluation_with_query_cache(benchmark, name, device, cache):
    """The evaluation after the last task, after an earlier evaluation filled the cache: with the
    cache every image costs one (prompted) pass, without it two (query + prompted). The cached
    row's note gives its time relative to the uncached one (about 0.5 plus the loader's share)."""
    from benchmarks.run.protocol import QueryCache, evaluate

    p, run = evaluation_setup(name, MICRO if device == "cpu" else VIT_B, device)
    task = p.scenario.tasks[-1]
    n = sum(len(ds) for ds in p.scenario.test_sets)
    evaluate(p.method, run, task)  # fills the cache (the earlier evaluations of a run)
    if cache == "uncached":
        run.cache = QueryCache(enabled=False)
    count = PassCounter(p.method.backbone)
    run_benchmark(benchmark, lambda: evaluate(p.method, run, task), n, device,
                  dict(bench="eval", method=name, backbone=p.backbone_info.name, device=device,
                       precision="bf16" if run.amp_dtype is not None else "fp32", batch=p.cfg.train.eval_batch_size,
                       note=""))
    calls = rounds(device) + 1  # timed rounds + the warm-up round
    passes = (count.query + count.prompted) / (n * calls)
    note = f"{passes:.2f} backbone passes per image ({cache})"
    median = benchmark.stats.stats.median
    if cache == "uncached":
        EVAL_SECONDS[(name, device)] = median
    elif (name, device) in EVAL_SECONDS:
        rel = median / EVAL_SECONDS[(name, device)]
        note += f", {rel:.2f}x the uncached time"
        benchmark.extra_info["time_vs_uncached"] = rel
    FIGURES[-1]["note"] = note
    benchmark.extra_info["passes_per_image"] = passes
    assert passes == (1.0 if cache == "cached" else 2.0)


# --- torch.compile (opt-in) ----------------------------------------------------------------

# collected only with PROMPTCL_PERF_COMPILE=1: inductor needs minutes to compile even the micro ViT on CPU
COMPILE = pytest.mark.perf_compile


@COMPILE
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_inference_compiled_vs_eager(benchmark, mode):
    device = "cuda" if CUDA else "cpu"
    name = "l2p"
    method, tasks, _ = vit_b_method(name) if CUDA else micro_method(name)
    method.to(device)
    n = GPU_BATCH if CUDA else MICRO_BATCH
    x, _ = batch(method, tasks[-1], n, device)
    amp = torch.bfloat16 if CUDA else None
    eager = InferBatch(method, x, amp_dtype=amp)()
    if mode == "compiled":
        compile_backbone(method.backbone)
        out = InferBatch(method, x, amp_dtype=amp)()  # compiles
        tol = 5e-2 if CUDA else 1e-4
        assert torch.allclose(out.float(), eager.float(), atol=tol, rtol=tol)
    run_benchmark(benchmark, InferBatch(method, x, amp_dtype=amp), n, device,
                  dict(bench="infer", method=name, backbone=VIT_B if CUDA else MICRO, device=device,
                       precision="bf16" if amp else "fp32", batch=n, note=mode))
