"""``bench.py gpu-check``: speed, memory and precision of every method at full scale, in minutes.

One command for a short GPU window (no network, no data set files, only PyTorch, timm, torchvision
and the packages they pull in -- never fvcore, iopath or submitit): every method and baseline on
ViT-B/16 with seeded random weights (``pretrained: none``; speed and memory do not depend on weight
values), random images of the right shape, the ``paper`` preset's method configs and batch sizes,
in the last task of the benchmark's split (every task begun, so growing methods are at their
largest). Stages, each given a share of ``--budget`` seconds:

1. **eager**: per method, per training phase, the training step (:class:`benchmarks.run.speed.TrainStep`,
   what the protocol runs per batch) and the evaluation forward with every pass
   (:class:`benchmarks.run.speed.InferBatch`), in fp32 and bf16 autocast: images/s (= batch / median
   seconds per step), CUDA peak memory, FLOPs per step counted by
   ``torch.utils.flop_counter.FlopCounterMode`` on the first call (fused attention included; the
   CPU attention kernel through :func:`benchmarks.cost.flops.flop_counter_sdpa_mapping`), achieved
   TFLOP/s and its ratio to the device's bf16 peak; bf16 against fp32 logits of the same batch
   (max and mean absolute difference, prediction agreement);
2. **loader**: the paper train transform on synthetic JPEG files through the protocol's
   ``make_loader`` (workers, pinned memory), images/s;
3. **references** (``--ref-root``): the authors' code timed against ours on the same device by the
   :mod:`benchmarks.tools.refcompare` harness, one subprocess per reference;
4. **compile**: the same steps with the backbone compiled as ``--compile`` compiles it
   (:func:`benchmarks.run.speed.compile_backbone`), compile seconds reported apart (first call minus
   a steady call), bf16 first, methods before baselines; it takes what is left of the budget and
   skips (and names) the methods whose estimated compile no longer fits.

The number of timed steps of each item is scaled to its share of the budget (at most
``--max-steps``); the JSON and the Markdown table are rewritten after every stage, so a run cut
short still leaves its results. A failing item is recorded with its error and the check goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# --- the device's peak -------------------------------------------------------------------------

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, matched in
# order against torch.cuda.get_device_name() (more specific names first).
PEAK_BF16_TFLOPS: List[Tuple[str, float]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("H800 PCIe", 756.0), ("H800", 989.4), ("H20", 148.0), ("GH200", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A10G", 70.0), ("A10", 125.0), ("A40", 149.7),
    ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.2), ("RTX A6000", 154.8), ("RTX 5090", 209.5), ("RTX 4090", 165.2),
    ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("RTX 3080", 59.5),
    ("MI300X", 1307.4), ("MI250X", 383.0),
]
DEFAULT_BUDGET_S = 420.0
CUDA_BACKBONE = "vit_base_patch16_224"
CPU_BACKBONE = "vit_micro_patch8_32"
# torch, torchvision and timm (with its pyyaml) are all gpu-check needs; checked first, by name
REQUIRED_MODULES = (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("yaml", "pyyaml"),
                    ("numpy", "numpy"))
# the references the refcompare harness adapts: its method key, our method, the repository
REFERENCES = [("l2p", "l2p", "JH-LEE-KR/l2p-pytorch"), ("dualprompt", "dualprompt", "JH-LEE-KR/dualprompt-pytorch"),
              ("coda", "coda_prompt", "GT-RIPL/CODA-Prompt"), ("smope", "smope", "Minhchuyentoancbn/SMoPE"),
              ("hide", "hide_prompt", "thu-ml/HiDe-Prompt")]


def table_peak_tflops(name: str) -> Optional[float]:
    """The bf16 dense peak of a known device name, or None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int, seconds: float = 0.5) -> float:
    """bf16 TFLOP/s of an ``n × n × n`` matrix product on ``device`` (best of repeated calls)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
    b = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
    a @ b
    synchronize(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best / 1e12


def device_info(device: torch.device, matmul_n: int) -> Dict[str, Any]:
    import timm

    info: Dict[str, Any] = {"type": device.type, "torch": torch.__version__, "timm": timm.__version__,
                            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    else:
        from benchmarks.run.runner import hardware_string

        info.update(name=hardware_string(device), threads=torch.get_num_threads(),
                    cpu_bf16=_cpu_flags(("avx512_bf16", "amx_bf16")))
    measured = matmul_tflops(device, matmul_n)
    table = table_peak_tflops(info["name"]) if device.type == "cuda" else None
    info["peak"] = {"table_bf16_tflops": table, "matmul_bf16_tflops": measured, "matmul_n": matmul_n,
                    "used_tflops": table if table else measured,
                    "source": "table of known devices (dense bf16)" if table else f"measured: one {matmul_n}³ bf16 matmul"}
    return info


def _cpu_flags(names: Sequence[str]) -> List[str]:
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [n for n in names if n in flags]


# --- budget ------------------------------------------------------------------------------------

class Budget:
    """Seconds left of the whole check, and shares of them for stages and items."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


# --- one timed item ------------------------------------------------------------------------------

def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; an upper bound


def count_flops(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """Run ``fn`` once under ``FlopCounterMode`` and return its output and FLOPs (2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.cost.flops import flop_counter_sdpa_mapping

    with FlopCounterMode(display=False, custom_mapping=flop_counter_sdpa_mapping()) as fc:
        out = fn()
    return out, float(fc.get_total_flops())


def timed(fn: Callable[[], Any], batch: int, device: torch.device, seconds: float, max_steps: int,
          flops: bool) -> Tuple[Dict[str, Any], Any]:
    """Time ``fn`` (one batch of ``batch`` images per call).

    The first call is timed apart (allocation, compilation; with ``flops`` it is also the one
    counted), a second call estimates the step time, then ``steps`` calls (as many as fit in
    ``seconds``, 1 to ``max_steps``) are timed one by one, each ended by a device synchronisation.
    ``img_s`` = ``batch`` / median of ``step_s``. Returns the record and the last call's output.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    out, n_flops = count_flops(fn) if flops else (fn(), None)
    synchronize(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    estimate = time.perf_counter() - t0
    steps = max(1, min(max_steps, int(seconds / max(estimate, 1e-6))))
    wall: List[float] = []
    cpu: List[float] = []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        synchronize(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(wall)
    rec: Dict[str, Any] = {"batch": batch, "first_call_s": first, "steps": steps, "step_s": wall, "median_s": med,
                           "img_s": batch / med, "peak_mem_mib": peak_memory_mib(device),
                           "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (upper bound)"}
    if device.type == "cpu":
        rec["cpu_step_s"] = cpu
        rec["img_s_cpu_time"] = batch / max(statistics.median(cpu), 1e-9)
    if n_flops is not None:
        rec["flops_per_step"] = n_flops
    return rec, out


def add_utilisation(rec: Dict[str, Any], flops_per_step: Optional[float], peak_tflops: float) -> None:
    """achieved TFLOP/s = FLOPs per image × img/s; utilisation = that ÷ the bf16 peak."""
    if not flops_per_step:
        return
    rec["flops_per_image"] = flops_per_step / rec["batch"]
    rec["tflops"] = rec["flops_per_image"] * rec["img_s"] / 1e12
    rec["utilisation"] = rec["tflops"] / peak_tflops


def logit_difference(ref: torch.Tensor, other: torch.Tensor) -> Dict[str, Any]:
    """bf16 against fp32 logits: max / mean absolute difference over the finite entries, the fp32
    logits' standard deviation (the scale), and the share of images with the same argmax."""
    a, b = ref.detach().float().cpu(), other.detach().float().cpu()
    finite = torch.isfinite(a) & torch.isfinite(b)
    d = (a - b).abs()[finite]
    return {"max_abs": float(d.max()) if d.numel() else None, "mean_abs": float(d.mean()) if d.numel() else None,
            "fp32_logit_std": float(a[finite].std()) if d.numel() > 1 else None,
            "agreement": float((a.argmax(1) == b.argmax(1)).float().mean()), "images": int(a.shape[0]),
            "non_finite": int((~finite).sum())}


# --- methods -----------------------------------------------------------------------------------

class Setup:
    """What the stages share: device, backbone, the methods' configs and the random ViT."""

    def __init__(self, args: argparse.Namespace, device: torch.device, methods: List[str]) -> None:
        from benchmarks.tables.cost_table import benchmark_classes, random_backbone, resolve_method_config
        from methods.backbones import MICRO_CONFIGS, split_name

        self.args, self.device, self.methods = args, device, methods
        self.backbone = args.backbone or (CUDA_BACKBONE if device.type == "cuda" else CPU_BACKBONE)
        micro = split_name(self.backbone)[0] in MICRO_CONFIGS
        # the method configs sized for the backbone: paper on ViT-B/16, quick on the micro ViT
        self.preset = "quick" if micro else "paper"
        self.cfgs = {}
        for m in methods:
            over = {"backbone": {"name": self.backbone, "pretrained": "none"}}
            self.cfgs[m], _ = resolve_method_config(m, args.benchmark, self.preset, over)
        paper = {m: resolve_method_config(m, args.benchmark, "paper", {})[0] for m in methods}
        self.paper_cfgs = paper  # the loader stage's transform and workers are the paper preset's
        # batch sizes: the paper preset's (--batch-size overrides both)
        self.train_batch = {m: args.batch_size or paper[m].train.batch_size for m in methods}
        self.infer_batch = {m: args.batch_size or paper[m].train.eval_batch_size for m in methods}
        self.num_classes = benchmark_classes(self.cfgs[methods[0]]) if methods else 0
        self.vit = random_backbone(self.backbone, seed=0).to(device)
        # a fine-tuning baseline's steps change the shared ViT: every method starts from these weights
        self.vit_state = {k: v.clone() for k, v in self.vit.state_dict().items()}

    def build(self, name: str):
        """The method in the last task (every task begun), on the device, and that task."""
        from benchmarks.tables.cost_table import build_method, make_tasks
        from methods.vit import PromptedViT

        cfg = self.cfgs[name]
        self.vit.load_state_dict(self.vit_state)
        m = build_method(name, cfg, PromptedViT(self.vit), self.num_classes, cfg.benchmark.num_tasks)
        tasks = make_tasks(self.num_classes, cfg.benchmark.num_tasks)
        m.to(self.device)  # as a run: the method is on its device when its tasks begin
        for t in tasks:
            m.begin_task(t)
        return m.to(self.device), tasks[-1]

    def batch(self, name: str, train: bool, img_size: int, task) -> Tuple[torch.Tensor, torch.Tensor]:
        n = self.train_batch[name] if train else self.infer_batch[name]
        g = torch.Generator().manual_seed(1 if train else 2)
        x = torch.rand(n, 3, img_size, img_size, generator=g)
        y = torch.randint(task.class_start, task.class_end, (n,), generator=g)
        return x.to(self.device), y.to(self.device)


def amp_of(precision: str) -> Optional[torch.dtype]:
    return torch.bfloat16 if precision == "bf16" else None


def trainable_phases(method, task) -> List[Any]:
    out = []
    for ph in method.phases(task):
        groups = ph.param_groups if ph.param_groups is not None else method.param_groups()
        if any(p.requires_grad for g in groups for p in g["params"]):
            out.append(ph)
    return out


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def eager_stage(s: Setup, result: Dict[str, Any], stage_s: float, log: Callable[[str], None]) -> None:
    """Training and inference of every method in every precision, FLOPs, memory, logit differences."""
    from benchmarks.run.speed import InferBatch, TrainStep

    a, dev, peak = s.args, s.device, result["device"]["peak"]["used_tflops"]
    t_stage = time.perf_counter()
    last_cost = 0.0  # seconds the previous item took: what the next needs at least
    for i, name in enumerate(s.methods):
        items_left = (len(s.methods) - i) * 2 * len(a.precisions)
        try:
            method, task = s.build(name)
        except Exception as e:
            result["errors"].append({"stage": "eager", "method": name, "error": _error(e)})
            log(f"{name}: build failed: {_error(e)}")
            continue
        img = method.backbone.img_size
        logits: Dict[str, torch.Tensor] = {}
        jobs: List[Tuple[str, Optional[Any], str]] = [("train", ph, p) for ph in trainable_phases(method, task) for p in a.precisions]
        jobs += [("infer", None, p) for p in a.precisions]
        items_left += len(jobs) - 2 * len(a.precisions)
        for mode, ph, prec in jobs:
            share = max(0.0, stage_s - (time.perf_counter() - t_stage)) / max(items_left, 1)
            items_left -= 1
            row = {"stage": "eager", "method": name, "is_baseline": bool(method.is_baseline), "mode": mode,
                   "phase": ph.name if ph is not None else None, "precision": prec, "compiled": False}
            if s.budget.left() - s.reserve_s < last_cost:  # even the shortest measurement would overrun
                result["skipped"].append({"stage": "eager", "method": name, "precision": prec, "mode": mode,
                                          "reason": f"budget: {s.budget.left():.0f}s left"})
                continue
            t_item = time.perf_counter()
            try:
                x, y = s.batch(name, mode == "train", img, task)
                fn = (TrainStep(method, task, x, y, s.cfgs[name].train, phase=ph, amp_dtype=amp_of(prec)) if mode == "train"
                      else InferBatch(method, x, amp_dtype=amp_of(prec)))
                rec, out = timed(fn, len(x), dev, share, a.max_steps, flops=True)
                row.update(rec)
                add_utilisation(row, rec.get("flops_per_step"), peak)
                if mode == "infer":
                    logits[prec] = out
                log(f"{name} {mode}{'/' + ph.name if ph is not None else ''} {prec}: {row['img_s']:.1f} img/s, "
                    f"{row['steps']} steps, {row['peak_mem_mib']:.0f} MiB")
            except Exception as e:
                row["error"] = _error(e)
                log(f"{name} {mode} {prec}: {row['error']}")
                if a.debug:
                    traceback.print_exc()
            result["runs"].append(row)
            fn = None
            last_cost = time.perf_counter() - t_item
        if "fp32" in logits and "bf16" in logits:
            result["precision"].append({"method": name, **logit_difference(logits["fp32"], logits["bf16"])})
        del method, logits
        release(dev)


def compile_stage(s: Setup, result: Dict[str, Any], log: Callable[[str], None]) -> None:
    """bf16 first, then fp32, methods before baselines: the training step of the last phase and the
    evaluation forward with the backbone compiled. A method runs only if its estimated time (the
    longest compile seen so far, or a first guess) fits in what is left of the budget. FLOPs come
    from the eager stage's count, or from one eager call here when that stage did not run."""
    from benchmarks.run.speed import InferBatch, TrainStep, compile_backbone
    from methods.registry import get_method_class

    a, dev, peak, budget = s.args, s.device, result["device"]["peak"]["used_tflops"], s.budget
    _raise_dynamo_limits()
    # a first compile's guess: inductor generates and builds kernels (GPU: Triton, CPU: C++)
    guess = (90.0 if dev.type == "cuda" else 60.0) if a.compile_backend == "inductor" else 10.0
    seen: List[float] = []
    eager = {(r["method"], r["mode"], r["phase"], r["precision"]): r for r in result["runs"]
             if not r["compiled"] and "error" not in r}
    names = sorted(s.methods, key=lambda m: bool(get_method_class(m).is_baseline))
    for prec in [p for p in ("bf16", "fp32") if p in a.precisions]:
        for name in names:
            need = max(seen) if seen else guess
            left = budget.left() - s.reserve_s
            if left < need:
                result["skipped"].append({"stage": "compile", "method": name, "precision": prec,
                                          "reason": f"budget: {left:.0f}s left, a compile takes about {need:.0f}s"})
                continue
            t_method = time.perf_counter()
            rows: List[Tuple[Dict[str, Any], Callable[[], Any], Optional[Dict[str, Any]]]] = []
            try:
                method, task = s.build(name)
                phases = trainable_phases(method, task)
                img = method.backbone.img_size
                for mode, ph in ([("train", phases[-1])] if phases else []) + [("infer", None)]:
                    row = {"stage": "compile", "method": name, "is_baseline": bool(method.is_baseline), "mode": mode,
                           "phase": ph.name if ph is not None else None, "precision": prec, "compiled": True,
                           "compile_backend": a.compile_backend}
                    x, y = s.batch(name, mode == "train", img, task)
                    fn = (TrainStep(method, task, x, y, s.cfgs[name].train, phase=ph, amp_dtype=amp_of(prec))
                          if mode == "train" else InferBatch(method, x, amp_dtype=amp_of(prec)))
                    base = eager.get((name, mode, row["phase"], prec))
                    if base is None:  # no eager stage: count this step's FLOPs with one eager call
                        _, fl = count_flops(fn)
                        base = {"flops_per_step": fl}
                    rows.append((row, fn, base))
                compile_backbone(method.backbone, mode=a.compile_mode, backend=a.compile_backend)
            except Exception as e:
                result["errors"].append({"stage": "compile", "method": name, "precision": prec, "error": _error(e)})
                continue
            for row, fn, base in rows:
                share = 3 * base["median_s"] * min(a.max_steps, 20) if "median_s" in base else 5.0
                try:
                    rec, _ = timed(fn, row_batch(fn), dev, max(0.0, min(share, budget.left() - s.reserve_s)),
                                   a.max_steps, flops=False)
                    row.update(rec)
                    row["compile_s"] = max(0.0, rec["first_call_s"] - rec["median_s"])
                    add_utilisation(row, base.get("flops_per_step"), peak)
                    if "img_s" in base:
                        row["speedup_vs_eager"] = row["img_s"] / base["img_s"]
                    log(f"{name} {row['mode']} {prec} compiled: {row['img_s']:.1f} img/s, compile {row['compile_s']:.1f}s")
                except Exception as e:
                    row["error"] = _error(e)
                    log(f"{name} {row['mode']} {prec} compiled: {row['error']}")
                    if a.debug:
                        traceback.print_exc()
                result["runs"].append(row)
            seen.append(time.perf_counter() - t_method)
            _uncompile(method.backbone)
            del method, rows
            torch._dynamo.reset()  # each method's graphs are its own; keeps dynamo's cache small
            release(dev)


def row_batch(fn: Any) -> int:
    return len(fn.x)


def _raise_dynamo_limits() -> None:
    """Every method wraps the same PromptedViT code: without this, dynamo would stop compiling after
    its default 8 cached variants per code object and silently run eagerly."""
    import torch._dynamo

    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))


def _uncompile(backbone: Any) -> None:
    from benchmarks.run.speed import COMPILED_ATTR

    for obj in (backbone, backbone.vit):
        obj.__dict__.pop("forward_features", None)  # the compiled instance attribute shadowing the method
    backbone.__dict__.pop(COMPILED_ATTR, None)


# --- data loader -------------------------------------------------------------------------------

def write_jpegs(folder: Path, n: int, size: Tuple[int, int], seed: int = 0) -> List[str]:
    """``n`` JPEG files (quality 90) of smooth random content, ``size`` = (height, width): an
    upsampled low-resolution noise image compresses and decodes like a photograph, not like noise."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        low = torch.rand(1, 3, size[0] // 16, size[1] // 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)[0]
        img = (img * 255 + torch.rand(img.shape, generator=g) * 24).clamp(0, 255).to(torch.uint8)
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        paths.append(str(p))
    return paths


def loader_stage(s: Setup, result: Dict[str, Any], seconds: float, log: Callable[[str], None]) -> None:
    """The paper train transform (of the first method's preset) on JPEG files through the
    protocol's loader: images/s after the first batch (worker start-up reported apart)."""
    import numpy as np

    from benchmarks.data.datasets import DatasetSplit, build_transform, resolve_transform_names
    from benchmarks.run.protocol import make_loader
    from benchmarks.data.scenarios import TaskDataset

    a, dev = s.args, s.device
    name = s.methods[0]
    cfg = s.paper_cfgs[name]
    img = s.vit.patch_embed.img_size[0]
    native = a.loader_image_size
    workers = a.loader_workers if a.loader_workers is not None else min(cfg.train.num_workers, os.cpu_count() or 1)
    batch = s.train_batch[name]
    n_images = max(a.loader_images, 4 * batch)  # an epoch's first batch is not timed: at least 3 more
    if s.budget.left() - s.reserve_s < 2.0:
        result["skipped"].append({"stage": "loader", "reason": f"budget: {s.budget.left():.0f}s left"})
        return
    rec: Dict[str, Any] = {"transform_of": name, "benchmark": a.benchmark, "workers": workers, "batch": batch,
                           "jpeg_size": [native * 3 // 4, native], "images": n_images,
                           "cpu_cores": os.cpu_count(), "pin_memory": dev.type == "cuda"}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-jpeg-") as tmp:
            t0 = time.perf_counter()
            paths = write_jpegs(Path(tmp), n_images, (native * 3 // 4, native))
            rec["write_s"] = time.perf_counter() - t0
            rec["train_transform"] = resolve_transform_names(cfg.benchmark, img, native)[0]
            tf = build_transform(cfg.benchmark, img, native, train=True)
            split = DatasetSplit(np.zeros(len(paths), dtype=np.int64), paths=paths)
            ds = TaskDataset(split, np.arange(len(paths)), {0: 0}, tf)
            tcfg = dataclasses.replace(cfg.train, num_workers=workers)
            # Up to 4 epochs, each with a fresh loader (new workers, as the protocol builds one per
            # epoch): an epoch's first batch (worker start-up) is timed apart, the rest is the rate.
            n, dt, firsts, epochs = 0, 0.0, [], 0
            t_end = time.perf_counter() + seconds
            while epochs < 4 and (time.perf_counter() < t_end or (n == 0 and s.budget.left() > s.reserve_s)):
                epochs += 1
                t0 = time.perf_counter()
                for i, (xb, _, _) in enumerate(make_loader(ds, batch, True, epochs, tcfg, drop_last=True, device=dev)):
                    xb = xb.to(dev, non_blocking=True)
                    synchronize(dev)
                    t1 = time.perf_counter()
                    if i == 0:
                        firsts.append(t1 - t0)
                    else:
                        n, dt = n + len(xb), dt + (t1 - t0)
                    t0 = t1
                    if t1 >= t_end and (n or s.budget.left() <= s.reserve_s):
                        break
            rec.update(first_batch_s=statistics.mean(firsts) if firsts else None, timed_images=n, timed_s=dt,
                       epochs=epochs, img_s=n / dt if n and dt > 0 else None)
            log(f"loader: {rec['img_s'] or 0:.0f} img/s with {workers} workers ({rec['train_transform']})")
    except Exception as e:
        rec["error"] = _error(e)
        log(f"loader: {rec['error']}")
    result["loader"] = rec


# --- references --------------------------------------------------------------------------------

def find_reference(root: Path, key: str, ours: str, repo: str) -> Optional[Path]:
    """A checkout in ``root`` named like the harness key (``coda``), our method (``coda_prompt``),
    ``owner+name`` (as ``/work/refs`` holds them) or the repository name."""
    owner, name = repo.split("/")
    for c in (key, ours, f"{owner}+{name}", name, name.lower()):
        if (root / c).is_dir():
            return root / c
    return None


def reference_stage(s: Setup, result: Dict[str, Any], stage_s: float, log: Callable[[str], None]) -> None:
    """One subprocess per reference (their top-level modules collide): ``python -m
    benchmarks.tools.gpu_check --ref-worker ...``, killed when its share of the budget is over."""
    from benchmarks.tables.cost_table import resolve_method_config

    a, root = s.args, Path(s.args.ref_root)
    todo = [(k, o, r) for k, o, r in REFERENCES if o in s.methods]
    t_stage = time.perf_counter()
    for i, (key, ours, repo) in enumerate(todo):
        rec: Dict[str, Any] = {"reference": key, "method": ours, "repository": repo}
        path = find_reference(root, key, ours, repo)
        share = (stage_s - (time.perf_counter() - t_stage)) / (len(todo) - i)
        share = min(share, s.budget.left() - s.reserve_s)
        batch = a.batch_size or resolve_method_config(ours, "cifar100", "paper", {})[0].train.batch_size
        if path is None:
            rec["error"] = f"no checkout of {repo} under {root} (looked for {key}, {ours}, {repo.replace('/', '+')})"
        elif share < 12:  # a worker's start (imports, two ViT-B/16 built on the CPU) alone takes about 10 s
            rec["skipped"] = f"budget: {share:.0f}s left for it"
        else:
            rec["path"], rec["batch"] = str(path), batch
            with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
                cmd = [sys.executable, "-m", "benchmarks.tools.gpu_check", "--ref-worker", key, "--ref-dir", str(path),
                       "--device", str(s.device), "--batch", str(batch), "--seconds", str(max(2.0, 0.3 * share)), "--json", out.name]
                root_dir = str(Path(__file__).resolve().parents[2])
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root_dir, os.environ.get("PYTHONPATH")) if p))
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                try:
                    _, err = proc.communicate(timeout=share)
                    data = Path(out.name).read_text()
                    if proc.returncode == 0 and data.strip():
                        rec.update(json.loads(data))
                    else:
                        rec["error"] = (err.strip().splitlines() or ["no output"])[-1][:300]
                except subprocess.TimeoutExpired:
                    proc.kill()  # the worker this stage started
                    proc.communicate()
                    rec["error"] = f"timed out after {share:.0f}s"
        log(f"reference {key}: " + (f"train ratio {rec['train']['ratio_fp32']:.2f}x" if "train" in rec
                                    else rec.get("error") or rec.get("skipped", "")))
        result["references"].append(rec)


def _to_device(obj: Any, dev: torch.device, seen: set) -> Any:
    """Move what a reference's timed closure holds to ``dev``: modules in place (parameters keep
    their identity, so optimisers stay valid), tensors and devices replaced."""
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        obj.to(dev)
        for k, v in list(vars(obj).items()):  # plain tensor attributes (CODA's dw_k) are not buffers
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                setattr(obj, k, v.to(dev))
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, torch.device):
        return dev
    if isinstance(obj, argparse.Namespace) and hasattr(obj, "device"):
        obj.device = str(dev)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ not in ("builtins", "torch"):
        for k, v in list(vars(obj).items()):
            if isinstance(v, (torch.nn.Module, torch.Tensor)):
                setattr(obj, k, _to_device(v, dev, seen))
    return obj


def move_side(side: Any, dev: torch.device, ref_dir: str) -> None:
    """The refcompare harness builds a reference on the CPU and passes ``torch.device('cpu')`` to its
    engines; on CUDA the worker rewrites the timed closures' cells (device, models, learner, its
    tensors) and the engines' module-level tensors (HiDe's class means) to ``dev``. Done here so that
    the harness itself stays the CPU one that docs/speed.md's numbers come from."""
    seen: set = set()
    for fn in (side.train, side.infer):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            if isinstance(v, (torch.device, torch.Tensor)):
                cell.cell_contents = _to_device(v, dev, seen)
            elif not callable(v) or isinstance(v, torch.nn.Module) or hasattr(v, "__dict__"):
                _to_device(v, dev, seen)
    root = os.path.abspath(ref_dir)
    for mod in list(sys.modules.values()):
        if str(getattr(mod, "__file__", "") or "").startswith(root):
            for k, v in list(vars(mod).items()):
                if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                    setattr(mod, k, {kk: t.to(dev) for kk, t in v.items()})


def ref_worker(argv: Sequence[str]) -> int:
    """One reference against ours on one device (``--device``), fp32 both, plus ours in bf16."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-worker", required=True)
    ap.add_argument("--ref-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    import copy

    from benchmarks.tools import refcompare as rc
    from benchmarks.tables.cost_table import random_backbone
    from benchmarks.run.speed import InferBatch, time_alternating

    dev = torch.device(a.device)
    vit = random_backbone("vit_base_patch16_224", seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, 224, 224, generator=g).to(dev)
    y = torch.randint(rc.TASK * rc.PER_TASK, (rc.TASK + 1) * rc.PER_TASK, (a.batch,), generator=g).to(dev)
    torch.manual_seed(0)
    ours = rc.our_side(a.ref_worker, vit, x, y)
    ours.train.method.to(dev)
    torch.manual_seed(0)
    ref = rc.reference_side(a.ref_worker, a.ref_dir, vit, x, y)
    move_side(ref, dev, a.ref_dir)  # on the CPU a no-op move, which keeps this path exercised
    bf16_train = copy.copy(ours.train)
    bf16_train.amp_dtype = torch.bfloat16
    fns = {"train": {"ours": ours.train, "reference": ref.train, "ours_bf16": bf16_train},
           "infer": {"ours": ours.infer, "reference": ref.infer,
                     "ours_bf16": InferBatch(ours.train.method, x, amp_dtype=torch.bfloat16)}}
    out: Dict[str, Any] = {"device": str(dev), "batch": a.batch, "ours_notes": ours.notes, "ref_notes": ref.notes}
    for kind, f in fns.items():
        t0 = time.perf_counter()
        time_alternating(f, 1, warmup=1, device=dev)  # warm-up, then one turn to size the repeats
        turn = (time.perf_counter() - t0) / 2
        repeats = max(2, min(20, int(a.seconds / 2 / max(turn, 1e-6))))
        t = time_alternating(f, repeats, warmup=0, device=dev)
        med = {k: statistics.median(v["wall"]) for k, v in t.items()}
        out[kind] = {"repeats": repeats, **{f"{k}_s": v for k, v in med.items()},
                     **{f"{k}_img_s": a.batch / v for k, v in med.items()},
                     "ratio_fp32": med["reference"] / med["ours"], "ratio_bf16": med["reference"] / med["ours_bf16"]}
    Path(a.json).write_text(json.dumps(out))
    return 0


# --- outputs -----------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def to_markdown(r: Dict[str, Any]) -> str:
    d = r["device"]
    pk = d["peak"]
    lines = [f"# gpu-check: {d['name']}", "",
             f"{d['type']}, torch {d['torch']}, timm {d['timm']}; backbone {r['settings']['backbone']} (random weights), "
             f"{r['settings']['preset']} method configs for {r['settings']['benchmark']}, last task; bf16 peak used "
             f"{pk['used_tflops']:.1f} TFLOP/s ({pk['source']}"
             + (f"; one {pk['matmul_n']}³ bf16 matmul measured {pk['matmul_bf16_tflops']:.1f}" if pk["table_bf16_tflops"] else "")
             + f"); {r['elapsed_s']:.0f}s of a {r['settings']['budget_s']:.0f}s budget"
             + ("" if r["complete"] else " (INCOMPLETE: cut short)") + ".", ""]
    runs = [x for x in r["runs"] if "error" not in x]
    keys = list(dict.fromkeys((x["method"], x["mode"], x["phase"]) for x in r["runs"]))
    precs = r["settings"]["precisions"]

    def get(m, mode, ph, prec, comp):
        return next((x for x in runs if (x["method"], x["mode"], x["phase"], x["precision"], x["compiled"]) == (m, mode, ph, prec, comp)), None)

    head = ["method", "step", "batch"] + [f"img/s {p}" for p in precs] + [f"img/s {p} compiled" for p in precs] + \
           ["compile s", "peak MiB " + " / ".join(precs), "GFLOP/img", "TFLOP/s bf16 (util.)", "TFLOP/s bf16 compiled (util.)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, mode, ph in keys:
        e = {p: get(m, mode, ph, p, False) for p in precs}
        c = {p: get(m, mode, ph, p, True) for p in precs}
        anyr = next((v for v in list(e.values()) + list(c.values()) if v), None)
        comp = [v["compile_s"] for v in c.values() if v]
        gf = next((v.get("flops_per_image") for v in e.values() if v and v.get("flops_per_image")), None)
        util = lambda v: f"{v['tflops']:.1f} ({100 * v['utilisation']:.0f}%)" if v and v.get("tflops") else "–"  # noqa: E731
        cells = [m, mode + (f" ({ph})" if ph else ""), str(anyr["batch"]) if anyr else "–"]
        cells += [_f(e[p]["img_s"] if e[p] else None) for p in precs] + [_f(c[p]["img_s"] if c[p] else None) for p in precs]
        cells += [" / ".join(f"{v:.0f}" for v in comp) or "–", " / ".join(_f(e[p]["peak_mem_mib"] if e[p] else None, "{:.0f}") for p in precs),
                  _f(gf / 1e9 if gf else None, "{:.2f}"), util(e.get("bf16")), util(c.get("bf16"))]
        lines.append("| " + " | ".join(cells) + " |")
    if r["precision"]:
        lines += ["", "bf16 autocast against fp32, evaluation logits of the same batch:", "",
                  "| method | max abs diff | mean abs diff | fp32 logit std | same prediction |", "|---|---|---|---|---|"]
        for p in r["precision"]:
            lines.append(f"| {p['method']} | {_f(p['max_abs'], '{:.4f}')} | {_f(p['mean_abs'], '{:.5f}')} | "
                         f"{_f(p['fp32_logit_std'], '{:.4f}')} | {100 * p['agreement']:.1f}% of {p['images']} |")
    ld = r.get("loader")
    if ld:
        lines += ["", f"Data loader: {_f(ld.get('img_s'), '{:.0f}')} img/s, {ld['workers']} workers of {ld['cpu_cores']} cores, "
                  f"batch {ld['batch']}, `{ld.get('train_transform', '?')}` on {ld['jpeg_size'][1]}x{ld['jpeg_size'][0]} "
                  f"JPEG files, {ld.get('epochs')} epochs; an epoch's first batch (worker start-up, apart) {_f(ld.get('first_batch_s'), '{:.2f}')}s" + (f"; error: {ld['error']}" if "error" in ld else ".")]
    if r["references"]:
        lines += ["", "Reference code on the same device (refcompare harness, CIFAR-100 task 2, fp32 both; "
                  "ratio = reference seconds / ours):", "",
                  "| reference | batch | train img/s ours fp32 / bf16 | ref | train ratio fp32 / vs bf16 | "
                  "infer img/s ours fp32 / bf16 | ref | infer ratio fp32 / vs bf16 |", "|---|---|---|---|---|---|---|---|"]
        for x in r["references"]:
            if "train" not in x:
                lines.append(f"| {x['reference']} ({x['repository']}) | – | {x.get('error') or x.get('skipped')} | | | | | |")
                continue
            t, i = x["train"], x["infer"]
            lines.append(f"| {x['reference']} ({x['repository']}) | {x['batch']} | {t['ours_img_s']:.1f} / {t['ours_bf16_img_s']:.1f} | "
                         f"{t['reference_img_s']:.1f} | {t['ratio_fp32']:.2f}x / {t['ratio_bf16']:.2f}x | "
                         f"{i['ours_img_s']:.1f} / {i['ours_bf16_img_s']:.1f} | {i['reference_img_s']:.1f} | "
                         f"{i['ratio_fp32']:.2f}x / {i['ratio_bf16']:.2f}x |")
    notes = [f"- error: {x['method']} {x['mode']} {x['precision']}{' compiled' if x['compiled'] else ''}: {x['error']}"
             for x in r["runs"] if "error" in x]
    notes += [f"- error: {x.get('stage')} {x.get('method')}: {x['error']}" for x in r["errors"]]
    notes += [f"- skipped: {x['stage']} {x.get('method', '')} {x.get('precision', '')}: {x['reason']}" for x in r["skipped"]]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write(out: Path, result: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(to_markdown(result))


# --- the command -------------------------------------------------------------------------------

def missing_modules() -> List[str]:
    return [pip for mod, pip in REQUIRED_MODULES if importlib.util.find_spec(mod) is None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the tiny CPU mode")
    p.add_argument("--out", default="results/gpu-check", help="output folder (gpu_check.json, gpu_check.md)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds the whole check may take (default 420)")
    p.add_argument("--methods", action="append", help="methods / baselines, comma-separated (default: all)")
    p.add_argument("-b", "--benchmark", default="imagenet_r", help="benchmark of the method configs (class and task counts)")
    p.add_argument("--backbone", default=None, help=f"default {CUDA_BACKBONE} on CUDA, {CPU_BACKBONE} on CPU")
    p.add_argument("--batch-size", type=int, default=None,
                   help="one batch size for training and inference (default: the paper preset's; 8 in the CPU mode)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile stage")
    p.add_argument("--stages", default="eager,loader,refs,compile",
                   help="comma-separated subset of eager, loader, refs (with --ref-root), compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor; eager only checks tracing)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's)")
    p.add_argument("--max-steps", type=int, default=None, help="most timed steps per item (default 50; 3 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--loader-images", type=int, default=None, help="synthetic JPEG files (default 768 on CUDA, 8 on CPU; at least 4 batches)")
    p.add_argument("--loader-workers", type=int, default=None, help="loader workers (default: the preset's, at most the cores)")
    p.add_argument("--loader-image-size", type=int, default=None, help="JPEG width; height is 3/4 of it (default 400 on CUDA, 48 on CPU)")
    p.add_argument("--ref-root", default=None, help="folder of the authors' checkouts (l2p, dualprompt, coda, smope, hide or owner+name)")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing items")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table on stdout")


def cli(args: argparse.Namespace) -> int:
    from benchmarks.config import ConfigError

    miss = missing_modules()
    if miss:
        raise ConfigError(f"gpu-check needs the Python package{'s' if len(miss) > 1 else ''} {', '.join(miss)}, "
                          f"which {'are' if len(miss) > 1 else 'is'} not installed (pip install {' '.join(miss)})")
    if args.budget <= 0 or (args.max_steps is not None and args.max_steps < 1) or (args.batch_size is not None and args.batch_size < 1):
        raise ConfigError("--budget, --max-steps and --batch-size must be positive")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or any(p not in ("fp32", "bf16") for p in args.precisions):
        raise ConfigError("--precisions takes fp32, bf16 or both, comma-separated")
    args.stages = [st.strip() for st in args.stages.split(",") if st.strip()]
    if not args.stages or any(st not in ("eager", "loader", "refs", "compile") for st in args.stages):
        raise ConfigError("--stages takes eager, loader, refs and compile, comma-separated")
    if args.ref_root and not Path(args.ref_root).is_dir():
        raise ConfigError(f"--ref-root {args.ref_root} is not a folder")
    from benchmarks.run.protocol import resolve_device

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("gpu-check found no CUDA device; pass --device cpu for the tiny CPU mode")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and args.backbone is None:  # the tiny CPU mode: micro ViT, small batches, few steps
        args.batch_size = args.batch_size or 8
    args.max_steps = args.max_steps or (50 if cuda else 3)
    args.loader_images = args.loader_images or (768 if cuda else 8)
    args.loader_image_size = args.loader_image_size or (400 if cuda else 48)
    try:
        from benchmarks.run import cli as bench_cli
        methods = bench_cli.expand_methods(bench_cli.split_names(args.methods) or ["all"])
    except ImportError as e:  # a method module needs a package this machine lacks
        raise ConfigError(f"gpu-check could not import the methods: {e.name or e} is missing (pip install {e.name or e})") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget)
    log = (lambda s: None) if getattr(args, "quiet", False) else (lambda s: print(f"[{budget.elapsed():5.0f}s] {s}", flush=True))
    out = Path(args.out)
    result: Dict[str, Any] = {
        "schema": 1, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "complete": False,
        "device": device_info(device, 8192 if cuda else 1024),
        "settings": {"budget_s": args.budget, "benchmark": args.benchmark, "precisions": args.precisions,
                     "compile": not args.no_compile, "compile_backend": args.compile_backend, "max_steps": args.max_steps,
                     "batch_size_override": args.batch_size, "methods": methods},
        "runs": [], "precision": [], "loader": None, "references": [], "skipped": [], "errors": [], "elapsed_s": 0.0}
    log(f"{result['device']['name']}: bf16 peak {result['device']['peak']['used_tflops']:.1f} TFLOP/s "
        f"({result['device']['peak']['source']})")
    s = Setup(args, device, methods)
    s.budget, s.reserve_s = budget, 3.0  # seconds kept for writing the outputs
    result["settings"].update(backbone=s.backbone, preset=s.preset, train_batch=s.train_batch, infer_batch=s.infer_batch)
    # stage shares of what is left when the stage starts
    stages = [st for st in args.stages if not (st == "compile" and args.no_compile) and not (st == "refs" and not args.ref_root)]
    result["settings"]["stages"] = stages
    weights = {k: w for k, w in (("eager", 5.0), ("loader", 0.6), ("refs", 3.0), ("compile", 4.0)) if k in stages}

    def share(stage: str) -> float:
        keys = list(weights)
        if stage not in keys:
            return 0.0
        rest = sum(weights[k] for k in keys[keys.index(stage):])
        return max(0.0, budget.left() - s.reserve_s) * weights[stage] / rest if rest else 0.0

    def checkpoint() -> None:
        result["elapsed_s"] = budget.elapsed()
        write(out, result)

    # the compile stage last: it takes what is left, skipping (and naming) what no longer fits
    if "eager" in stages:
        eager_stage(s, result, share("eager"), log)
        checkpoint()
    if "loader" in stages:
        loader_stage(s, result, share("loader"), log)
        checkpoint()
    if "refs" in stages:
        reference_stage(s, result, share("refs"), log)
        checkpoint()
    if "compile" in stages:
        compile_stage(s, result, log)
    result["complete"] = True
    checkpoint()
    if not args.quiet:
        print(to_markdown(result))
    print(f"gpu-check written to {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {budget.elapsed():.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # the reference worker: python -m benchmarks.tools.gpu_check --ref-worker KEY ...
    sys.exit(ref_worker(sys.argv[1:]))
