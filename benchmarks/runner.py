"""One run end to end: resolved config -> backbone, scenario, method -> tasks -> result.json.

Everything that can fail because of user input (config, backbone, checkpoint, data) is checked
*before* the run directory is created, so bad input leaves nothing behind.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks import metrics as M
from benchmarks.config import ConfigError, RunConfig
from benchmarks.protocol import (
    EvalResult,
    QueryCache,
    RunContext,
    TaskContext,
    evaluate,
    resolve_device,
    resolve_precision,
    seed_everything,
    derive_seed,
    train_phase,
)
from benchmarks.scenarios import Scenario, build_scenario
from benchmarks.store import RunStore, config_hash, now, run_dir
from methods.backbones import BackboneInfo, create_backbone
from methods.base import ContinualMethod
from methods.registry import create_method

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """A run cannot start (e.g. an incompatible checkpoint on --resume); one sentence."""


def git_commit() -> Dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return {"commit": sha or None, "dirty": dirty}
    except Exception:
        return {"commit": None, "dirty": None}


def hardware_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device, backbone: BackboneInfo, amp: Optional[torch.dtype]) -> Dict[str, Any]:
    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "hardware": hardware_string(device),
        "precision": "bf16" if amp == torch.bfloat16 else "fp32",
        "git": git_commit(),
        "backbone": backbone.to_dict(),
    }


@dataclass
class Prepared:
    """Everything built and validated before any file is written."""

    cfg: RunConfig
    device: torch.device
    amp: Optional[torch.dtype]
    backbone_info: BackboneInfo
    scenario: Scenario
    method: ContinualMethod
    benchmark_label: str
    method_label: str


def benchmark_label(cfg: RunConfig, default_tasks: int) -> str:
    """Run-folder name of the benchmark: the name, plus the task count when not the default."""
    b = cfg.benchmark
    label = b.name if b.num_tasks == default_tasks else f"{b.name}-{b.num_tasks}t"
    return label


def prepare(cfg: RunConfig, tag: Optional[str] = None) -> Prepared:
    """Validate and build device, backbone, scenario and method (no file is written)."""
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    seed_everything(derive_seed(cfg.seed, "init"))
    backbone, info = create_backbone(cfg.backbone)
    scenario = build_scenario(cfg.benchmark, cfg.seed, backbone.img_size)
    if scenario.image_size != backbone.img_size:
        raise ConfigError(f"benchmark.image_size={scenario.image_size} differs from the backbone input size {backbone.img_size}")
    seed_everything(derive_seed(cfg.seed, "method"))
    method = create_method(cfg.method_name, backbone, scenario.num_classes, cfg.method).to(device)
    from benchmarks.datasets import _DEFAULT_TASKS

    label = benchmark_label(cfg, _DEFAULT_TASKS.get(cfg.benchmark.name, cfg.benchmark.num_tasks))
    mlabel = cfg.method_name if not tag else f"{cfg.method_name}@{tag}"
    return Prepared(cfg, device, amp, info, scenario, method, label, mlabel)


def _hist_to_list(h: Dict[int, torch.Tensor]) -> Dict[str, Any]:
    return {str(j): v.tolist() for j, v in h.items()}


def run_prepared(p: Prepared, out: str | Path, resume: bool = False, overwrite: bool = False,
                 log_to_stdout: bool = True) -> Dict[str, Any]:
    """Train and evaluate every task, writing the run directory. Returns the result dict."""
    cfg, method, sc = p.cfg, p.method, p.scenario
    store = RunStore(run_dir(out, p.benchmark_label, p.method_label, cfg.seed))
    cfg_dict = cfg.to_dict()
    chash = config_hash(cfg_dict)
    if store.is_done() and not overwrite and not resume:
        res = store.read_result()
        if res.get("config_hash") == chash:
            if log_to_stdout and not cfg.quiet:
                print(f"{store.path}: already done (use --overwrite to run again)")
            return res
        raise RunError(f"{store.result_path} holds a result with a different config; use --overwrite or another --out")
    ckpt = store.load_checkpoint() if resume else None
    if ckpt is not None and (ckpt.get("config_hash") != chash or ckpt.get("method") != cfg.method_name):
        raise RunError(f"the checkpoint in {store.path} was made by a different method or config; remove it or drop --resume")
    store.create()
    store.write_config(cfg_dict)
    store.set_status("running", started=now())

    def log(msg: str) -> None:
        store.log(msg)
        if log_to_stdout and not cfg.quiet:
            print(msg, flush=True)

    run = RunContext(cfg, sc, p.device, p.amp, QueryCache(cfg.query_cache), log=log,
                     progress=not cfg.quiet and sys.stderr.isatty(),
                     train_deterministic=cfg.benchmark.train_transform == "none")
    T = sc.num_tasks
    acc: List[List[Optional[float]]] = [[None] * T for _ in range(T)]
    tii: List[List[Optional[float]]] = [[None] * T for _ in range(T)]
    seen_acc: List[float] = []
    selection: Dict[str, Any] = {"final": {}, "diagonal": {}}
    timing: Dict[str, List[float]] = {"train_seconds": [], "end_task_seconds": [], "eval_seconds": []}
    start_task = 0
    if ckpt is not None:
        for t in range(ckpt["task"] + 1):
            method.begin_task(sc.tasks[t])
        method.load_checkpoint_state(ckpt["state"])
        acc, tii, seen_acc = ckpt["acc"], ckpt["tii"], ckpt["seen_acc"]
        selection, timing = ckpt["selection"], ckpt["timing"]
        start_task = ckpt["task"] + 1
        log(f"resumed from {store.checkpoint_path} after task {start_task}")
    try:
        for t in range(start_task, T):
            task = sc.tasks[t]
            seed_everything(derive_seed(cfg.seed, t, "begin"))
            method.begin_task(task)
            t0 = time.time()
            for i, phase in enumerate(method.phases(task)):
                stats = train_phase(method, run, task, phase, i)
                log(f"task {t + 1}/{T} phase {phase.name}: {stats['epochs']} epochs, {stats['steps']} steps, "
                    f"loss {stats['last_loss']}, {stats['seconds']:.1f}s")
            timing["train_seconds"].append(time.time() - t0)
            t0 = time.time()
            seed_everything(derive_seed(cfg.seed, t, "end"))
            method.end_task(task, TaskContext(run, task))
            timing["end_task_seconds"].append(time.time() - t0)
            t0 = time.time()
            ev: EvalResult = evaluate(method, run, task)
            timing["eval_seconds"].append(time.time() - t0)
            for j, a in enumerate(ev.acc):
                acc[t][j] = a
                tii[t][j] = ev.task_acc[j]
            seen_acc.append(100.0 * sum(ev.correct) / sum(ev.total))
            if ev.selection:
                selection["diagonal"][str(t)] = ev.selection[t].tolist()
                if t == T - 1:
                    selection["final"] = _hist_to_list(ev.selection)
            log(f"task {t + 1}/{T} eval: " + " ".join(f"{a:.2f}" for a in ev.acc) + f" | avg {sum(ev.acc) / len(ev.acc):.2f}")
            store.save_checkpoint({"task": t, "method": cfg.method_name, "config_hash": chash,
                                   "state": method.checkpoint_state(), "acc": acc, "tii": tii, "seen_acc": seen_acc,
                                   "selection": selection, "timing": timing})
        result = build_result(p, acc, tii, seen_acc, selection, timing, chash, run)
        store.write_result(result)
        store.set_status("done", finished=now())
        return result
    except BaseException as e:
        store.set_status("failed", error=f"{type(e).__name__}: {e}", finished=now())
        raise


def build_result(p: Prepared, acc, tii, seen_acc, selection, timing, chash: str, run: RunContext) -> Dict[str, Any]:
    from benchmarks.cost import run_cost

    cfg, method = p.cfg, p.method
    has_tii = any(v is not None for row in tii for v in row)
    return {
        "schema": SCHEMA_VERSION,
        "benchmark": p.benchmark_label,
        "method": p.method_label,
        "method_name": cfg.method_name,
        "is_baseline": method.is_baseline,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "acc_matrix": acc,
        "acc_seen_samples": seen_acc,
        "tii_matrix": tii if has_tii else None,
        "metrics": M.summarize(acc),
        "diagnostics": {
            "selection_hist": selection if (selection["final"] or selection["diagonal"]) else None,
            "selection_size": method.selection_size,
            "method": method.diagnostics(),
            "query_cache": {"hits": run.cache.hits, "misses": run.cache.misses},
        },
        "cost": run_cost(method, p.scenario),
        "timing": {**timing, "total_seconds": sum(sum(v) for v in timing.values())},
        "config": cfg.to_dict(),
        "config_hash": chash,
        "scenario": p.scenario.describe(),
        "env": environment(p.device, p.backbone_info, p.amp),
        "finished": now(),
    }
