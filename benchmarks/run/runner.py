"""One run end to end: resolved config -> backbone, scenario, method -> tasks -> result.json.

Everything that can fail because of user input (config, backbone, checkpoint, data, the state of
the run directory) is checked *before* the run directory is written, so bad input leaves nothing
behind. Checkpoints, resume, stop signals and the status file are described in
``run_prepared`` and docs/reliability.md; data-parallel runs in benchmarks/run/distributed.py.
"""
from __future__ import annotations

import copy
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.run import distributed as dist_util
from benchmarks import metrics as M
from benchmarks.config import ConfigError, RunConfig
from benchmarks.run.protocol import (
    EvalResult,
    NonFiniteLossError,
    QueryCache,
    RunContext,
    TaskContext,
    evaluate,
    resolve_device,
    resolve_precision,
    seed_everything,
    derive_seed,
    rng_state,
    train_phase,
)
from benchmarks.run.runlog import RunMetrics, fmt_elapsed, require_tensorboard, sig4
from benchmarks.data.scenarios import Scenario, build_scenario
from benchmarks.run.store import CHECKPOINT_FORMAT, DamagedFileError, RunStore, config_hash, now, run_dir, validate_tag
from methods.backbones import BackboneInfo, create_backbone
from methods.base import ContinualMethod, Task
from methods.registry import create_method

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]


class RunError(RuntimeError):
    """A run cannot start (e.g. an incompatible checkpoint on --resume); one sentence."""


class DamagedResultError(RunError):
    """The run folder's result.json is damaged (not JSON, or not matching its SHA-256); sweeps skip and name it."""


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
    stale_writer: Optional[str] = None  # set by run_prepared: the killed writer a stale 'running' names


def benchmark_label(cfg: RunConfig, default_tasks: int) -> str:
    """Run-folder name of the benchmark: the name, plus the task count when not the default."""
    b = cfg.benchmark
    label = b.name if b.num_tasks == default_tasks else f"{b.name}-{b.num_tasks}t"
    return label


def prepare(cfg: RunConfig, tag: Optional[str] = None) -> Prepared:
    """Validate and build device, backbone, scenario and method (no file is written)."""
    validate_tag(tag)
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    seed_everything(derive_seed(cfg.seed, "init"))
    if cfg.tensorboard:
        require_tensorboard()  # before any file is written: one sentence, exit status 2
    backbone, info = create_backbone(cfg.backbone, benchmark=cfg.benchmark)
    scenario = build_scenario(cfg.benchmark, cfg.seed, backbone.img_size)
    if scenario.image_size != backbone.img_size:
        raise ConfigError(f"benchmark.image_size={scenario.image_size} differs from the backbone input size {backbone.img_size}")
    seed_everything(derive_seed(cfg.seed, "method"))
    method = create_method(cfg.method_name, backbone, scenario.num_classes, cfg.method,
                           num_tasks=scenario.num_tasks).to(device)
    from benchmarks.run.speed import apply_run_options

    apply_run_options(method, cfg)  # --compile: torch.compile the backbone passes (lazily, at first call)
    check_epochs(cfg, method, scenario)
    from benchmarks.data.datasets import _DEFAULT_TASKS

    label = benchmark_label(cfg, _DEFAULT_TASKS.get(cfg.benchmark.name, cfg.benchmark.num_tasks))
    mlabel = cfg.method_name if not tag else f"{cfg.method_name}@{tag}"
    return Prepared(cfg, device, amp, info, scenario, method, label, mlabel)


def _hist_to_list(h: Dict[int, torch.Tensor]) -> Dict[str, Any]:
    return {str(j): v.tolist() for j, v in h.items()}


# --- stop signals --------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class RunInterrupted(Exception):
    """A stop signal ended the run after its state was saved; exit status 128 + the signal."""

    def __init__(self, signum: int, run_path: Path, where: str) -> None:
        self.signum = int(signum)
        self.run_path = run_path
        super().__init__(f"{signal.Signals(signum).name} received: saved a checkpoint {where} in {run_path}; "
                         f"continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active, SIGINT / SIGTERM / SIGUSR2 request a stop at the next safe point.

    The first signal only sets a flag: the run finishes its current optimiser step (or the task's
    end_task and evaluation), saves a checkpoint and raises :class:`RunInterrupted`. A second
    signal stops at once (``KeyboardInterrupt``; the last checkpoint is kept). SIGUSR2 is the
    pre-emption warning of SLURM's ``--signal`` and of submitit: a Python handler installed
    before ours for the received signal (submitit's checkpoint-and-requeue) is called once our
    checkpoint is on disk. Handlers are installed from the main thread only.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.second: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        global ACTIVE_STOP
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        ACTIVE_STOP = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global ACTIVE_STOP
        for s, h in self._previous.items():
            signal.signal(s, h)
        ACTIVE_STOP = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.second = signum
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None

    def chain(self) -> None:
        """Call the handler that was installed before ours for the received signal, if any."""
        prev = self._previous.get(self.signum) if self.signum is not None else None
        if callable(prev) and prev is not signal.default_int_handler:
            prev(self.signum, None)


ACTIVE_STOP: Optional[StopSignals] = None  # the stop handler of the run in progress (tests peek at it)


# --- planning: what a run would do, decided before anything is written ----------------------

@dataclass
class RunPlan:
    """``action``: ``skip`` (done with the same config), ``resume`` (``checkpoint`` set) or ``start``."""

    store: RunStore
    chash: str
    action: str
    checkpoint: Optional[Dict[str, Any]] = None


def run_path(cfg: RunConfig, out: str | Path, tag: Optional[str] = None) -> Path:
    """``<out>/<benchmark>/<method[@tag]>/seed<k>`` of a config, without building anything."""
    from benchmarks.data.datasets import _DEFAULT_TASKS

    validate_tag(tag)
    label = benchmark_label(cfg, _DEFAULT_TASKS.get(cfg.benchmark.name, cfg.benchmark.num_tasks))
    return run_dir(out, label, cfg.method_name if not tag else f"{cfg.method_name}@{tag}", cfg.seed)


def plan_run(cfg: RunConfig, path: str | Path, resume: bool = False, overwrite: bool = False,
             writable: bool = True) -> RunPlan:
    """Inspect the run directory (no write) and decide; a state that needs the user is a RunError.

    * done with the same config: skip (also with ``resume``); with another config: refused unless
      ``overwrite``;
    * ``resume``: continue from the checkpoint when there is one; an unreadable checkpoint or one
      made by another method or config is refused;
    * without ``resume``, the checkpoint of an unfinished run is not silently replaced: refused
      unless ``overwrite``.
    """
    store = RunStore(Path(path), writable)
    chash = config_hash(cfg.to_dict())
    done = store.is_done()
    if done and not overwrite:
        try:
            stored_hash = store.read_result().get("config_hash")
        except DamagedFileError as e:
            raise DamagedResultError(f"{e}; remove it or pass --overwrite to run again") from None
        if stored_hash == chash:
            return RunPlan(store, chash, "skip")
        if not resume:
            raise RunError(f"{store.result_path} holds a result with a different config; use --overwrite or another --out")
        raise RunError(f"the result and checkpoint in {store.path} were made by a different method or config; "
                       f"use --overwrite or another --out")
    if not resume:
        if store.checkpoint_path.exists() and not done and not overwrite:
            raise RunError(f"{store.path} holds the checkpoint of an unfinished run; pass --resume to continue it "
                           f"or --overwrite to start again")
        return RunPlan(store, chash, "start")
    try:
        ckpt = store.load_checkpoint(verify=False)  # weights_only: a planted pickle runs nothing
    except ValueError as e:
        raise RunError(f"{e}; remove it or drop --resume") from None
    if ckpt is None:
        return RunPlan(store, chash, "start")
    if ckpt.get("method") != cfg.method_name or ckpt.get("config_hash") != chash:
        raise RunError(f"the checkpoint in {store.path} was made by a different method or config; remove it or drop --resume")
    try:  # after the identity check, so that a whole checkpoint of another run is named as such
        store.verify_checkpoint()
    except DamagedFileError as e:
        raise RunError(f"{e}; remove it or drop --resume") from None
    return RunPlan(store, chash, "resume", ckpt)


def validate_configs(cfgs: List[RunConfig], tag: Optional[str] = None) -> None:
    """Build (on CPU, then discard) every distinct config but the seed, so bad input fails first.

    Catches what only construction reveals: method constructors' checks, missing data or
    checkpoint files, a class count the task count does not divide.
    """
    seen = set()
    for cfg in cfgs:
        d = cfg.to_dict()
        key = config_hash({**d, "seed": 0, "method_name": d["method_name"]})
        if key in seen:
            continue
        seen.add(key)
        probe = copy.deepcopy(cfg)
        probe.device = "cpu"
        prepare(probe, tag=tag)


def plan_all(cfgs: List[RunConfig], out: str | Path, tag: Optional[str], resume: bool, overwrite: bool) -> None:
    """Inspect every run folder (no write) before the first run starts: a live writer, a damaged
    result or an unusable checkpoint in run 3 of 5 stops the command before runs 1 and 2."""
    for cfg in cfgs:
        path = run_path(cfg, out, tag)
        RunStore(path).refuse_if_written()
        plan_run(cfg, path, resume, overwrite, writable=False)


def describe_position(ckpt: Dict[str, Any], num_tasks: int) -> str:
    pos = ckpt.get("position")
    if pos is None:
        return f"after task {ckpt['task'] + 1}/{num_tasks}"
    return f"in task {pos['task'] + 1}/{num_tasks} (phase {pos['phase'] + 1}, epoch {pos['epoch'] + 1}, {pos['batch']} batches done)"


def _rank_rng(ckpt: Dict[str, Any], dctx: dist_util.DistContext) -> Optional[Dict[str, Any]]:
    rngs = ckpt.get("rng") or []
    if not rngs:
        return None
    return rngs[dctx.rank] if len(rngs) == dctx.world_size else rngs[0]


def check_epochs(cfg: RunConfig, method: ContinualMethod, sc: Scenario) -> None:
    """``train.epochs`` must be at least 1 for a method that trains (NCM trains nothing: 0 is its preset)."""
    if cfg.train.epochs >= 1:
        return
    try:
        phases = method.phases(sc.tasks[0])
    except Exception:  # phases may need begin_task; then the method trains with the run's epochs
        phases = [None]
    for ph in phases:
        epochs = (ph.train or {}).get("epochs", cfg.train.epochs) if ph is not None else cfg.train.epochs
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"train.epochs={cfg.train.epochs}: {cfg.method_name} trains, so it needs at least 1 epoch")


def run_prepared(p: Prepared, out: str | Path, resume: bool = False, overwrite: bool = False,
                 log_to_stdout: bool = True) -> Dict[str, Any]:
    """Plan the run, become the folder's only writer, then train (:func:`_run_planned`).

    The folder is locked (``RunStore.lock``: a second process is refused with one sentence
    naming the live pid) and planned again under the lock. Whatever ends the run, no
    ``status: running`` is left behind by this process, and an ``--overwrite`` that does not get
    to write its result puts back the config.yaml of the result that is kept.
    """
    dctx = dist_util.current()
    path = run_dir(out, p.benchmark_label, p.method_label, p.cfg.seed)
    if dctx.is_main:
        RunStore(path).refuse_if_written()  # a live writer is the first thing to tell
    plan = plan_run(p.cfg, path, resume, overwrite, writable=dctx.is_main)
    if plan.action == "skip" or not dctx.is_main:
        return _run_planned(p, plan, dctx, log_to_stdout)
    store = plan.store
    store.lock()
    try:
        plan = plan_run(p.cfg, path, resume, overwrite)  # again: the folder may have changed before we held it
        plan.store = store
        stale = store.status() if plan.action != "skip" else None
        if stale and stale.get("status") == "running":
            p.stale_writer = f"process {stale.get('pid')} on {stale.get('host')}"
        # the config.yaml of an existing result, kept by a hard link (needs no space) until the new
        # result is written, so that a failed --overwrite puts it back
        config, kept = store.path / "config.yaml", store.path / ".config.yaml.kept"
        keep = store.result_path.exists() and config.is_file()
        old_config: Optional[bytes] = None
        if keep:
            kept.unlink(missing_ok=True)
            try:
                os.link(config, kept)
            except OSError:  # a file system without hard links: keep the bytes (rewriting needs space)
                old_config = config.read_bytes()
        old_result = store.result_path.read_bytes() if keep else None
        try:
            result = _run_planned(p, plan, dctx, log_to_stdout)
        except BaseException as e:
            _after_failure(store, e)
            if keep and store.result_path.read_bytes() == old_result:
                if old_config is None:
                    os.replace(kept, config)  # a rename: works on a full disk too
                else:
                    try:
                        from benchmarks.run.store import atomic_write_text

                        atomic_write_text(config, old_config.decode())
                    except Exception:
                        pass  # the kept result.json carries its own config
            raise
        finally:
            kept.unlink(missing_ok=True)
        return result
    finally:
        store.unlock()


def _after_failure(store: RunStore, e: BaseException) -> None:
    """No false ``running`` status is left behind by this process."""
    try:
        st = store.status() or {}
        if st.get("status") == "running" and st.get("pid") == os.getpid():
            store.set_status("failed", error=f"{type(e).__name__}: {e}", finished=now())
    except Exception:
        store.drop_status()  # even a small write fails (a full disk): no status beats a false one


def _run_planned(p: Prepared, plan: RunPlan, dctx: dist_util.DistContext, log_to_stdout: bool) -> Dict[str, Any]:
    """Train and evaluate every task, writing the run directory. Returns the result dict.

    Checkpoints (``checkpoint.pt``, atomic) hold everything needed to continue exactly: the
    method's ``checkpoint_state()``, the accuracy matrix and diagnostics so far, the RNG states of
    every rank and, mid-task, the position (task, phase, epoch, batch) with the optimiser and
    scheduler states. One is written after each task, after every
    ``train.checkpoint_every_epochs`` epochs, and when a stop signal arrives.

    Resuming replays ``method.begin_task`` for tasks 0..t (t: the task of the checkpoint,
    finished or not) on the freshly built method, then loads the saved state. The contract for
    method authors: ``begin_task`` may set anything that is not learned (trainable flags, the
    current task, allocated slices), and everything learned or accumulated (parameters, buffers,
    counters, class statistics) lives in the state_dict (parameters, buffers or
    ``get_extra_state``), so loading it after the replay restores the method exactly.
    """
    cfg, method, sc, store, chash = p.cfg, p.method, p.scenario, plan.store, plan.chash
    verbose = log_to_stdout and not cfg.quiet and dctx.is_main
    if plan.action == "skip":
        if verbose:
            print(f"{store.path}: already done (use --overwrite to run again)")
        return store.read_result()
    if dctx.enabled and cfg.train.batch_size % dctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} cannot be split evenly over {dctx.world_size} "
                          f"processes; the global batch stays the preset's, so choose a process count that divides it")
    T = sc.num_tasks
    acc: List[List[Optional[float]]] = [[None] * T for _ in range(T)]
    tii: List[List[Optional[float]]] = [[None] * T for _ in range(T)]
    seen_acc: List[float] = []
    selection: Dict[str, Any] = {"final": {}, "diagonal": {}}
    timing: Dict[str, List[float]] = {"train_seconds": [], "end_task_seconds": [], "eval_seconds": []}
    start_task = 0
    ckpt = plan.checkpoint
    pos: Optional[Dict[str, Any]] = None
    if ckpt is not None:  # still nothing written: a checkpoint that does not fit is a RunError
        pos = ckpt.get("position")
        for t in range((pos["task"] if pos else ckpt["task"]) + 1):
            seed_everything(derive_seed(cfg.seed, t, "begin"))
            method.begin_task(sc.tasks[t])
        try:
            method.load_checkpoint_state(ckpt["state"])
        except RuntimeError as e:
            raise RunError(f"the checkpoint in {store.path} does not fit the method ({e}); remove it or drop --resume") from None
        acc, tii, seen_acc = ckpt["acc"], ckpt["tii"], ckpt["seen_acc"]
        selection, timing = ckpt["selection"], ckpt["timing"]
        start_task = ckpt["task"] + 1
    dist_util.broadcast_state(dctx, method.checkpoint_state())
    store.create()
    store.write_config(cfg.to_dict())
    meta = dict(started=now(), host=socket.gethostname(), pid=os.getpid(), world_size=dctx.world_size,
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    store.set_status("running", **meta)

    run_t0 = time.time()

    def log(msg: str) -> None:  # every line carries the time elapsed since this process began the run
        msg = f"{fmt_elapsed(time.time() - run_t0)} {msg}"
        store.log(msg)
        if verbose:
            print(msg, flush=True)

    monitor = RunMetrics(store.path, log, writable=dctx.is_main, tensorboard=cfg.tensorboard, fresh=ckpt is None)
    run = RunContext(cfg, sc, p.device, p.amp, QueryCache(cfg.query_cache), log=log,
                     progress=verbose and sys.stderr.isatty(),
                     train_deterministic=cfg.benchmark.train_transform == "none", dist=dctx,
                     on_epoch_metrics=monitor.epoch)
    if p.stale_writer:
        log(f"status.json said running, but {p.stale_writer} no longer holds the folder (it was killed)")
    if ckpt is not None:
        log(f"resumed from {store.checkpoint_path} {describe_position(ckpt, T)}")
    task_t0 = [time.time()]
    interrupted = False

    def checkpoint(last_done: int, position: Optional[Dict[str, Any]]) -> None:
        rngs = dist_util.gather_objects(dctx, rng_state())
        state = method.checkpoint_state()
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise NonFiniteLossError(f"{method.name}: '{k}' became NaN or infinite")
        store.save_checkpoint({
            "format": CHECKPOINT_FORMAT, "task": last_done, "position": position, "method": cfg.method_name, "config_hash": chash,
            "state": state, "acc": acc, "tii": tii, "seen_acc": seen_acc, "selection": selection, "timing": timing,
            "rng": rngs, "world_size": dctx.world_size,
        })

    def position(task: Task, phase_idx: int, epoch: int, batch: int, optimizer, scheduler) -> Dict[str, Any]:
        return {"task": task.index, "phase": phase_idx, "epoch": epoch, "batch": batch,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "train_seconds": time.time() - task_t0[0]}

    def interrupt(where: str) -> None:
        nonlocal interrupted
        interrupted = True
        signum = stop.signum or signal.SIGTERM  # ranks that did not receive the signal itself
        store.set_status("interrupted", signal=signal.Signals(signum).name, checkpoint=where, finished=now(), **meta)
        log(f"interrupted by {signal.Signals(signum).name}: checkpoint saved {where}")
        stop.chain()  # e.g. submitit requeues the job and exits here
        raise RunInterrupted(signum, store.path, where)

    def on_epoch_end(task: Task, phase_idx: int, epoch: int, epochs: int, optimizer, scheduler) -> None:
        k = cfg.train.checkpoint_every_epochs
        if k > 0 and (epoch + 1) % k == 0:
            checkpoint(task.index - 1, position(task, phase_idx, epoch + 1, 0, optimizer, scheduler))

    def on_stop(task: Task, phase_idx: int, epoch: int, batch: int, steps_per_epoch: int, epochs: int,
                optimizer, scheduler) -> None:
        if batch >= steps_per_epoch:
            epoch, batch = epoch + 1, 0
        checkpoint(task.index - 1, position(task, phase_idx, epoch, batch, optimizer, scheduler))
        interrupt(f"in task {task.index + 1}/{T} (phase {phase_idx + 1}, epoch {epoch + 1}, {batch} batches done)")

    with StopSignals() as stop:
        run.should_stop, run.on_stop, run.on_epoch_end = stop.requested, on_stop, on_epoch_end
        try:
            for t in range(start_task, T):
                task = sc.tasks[t]
                here = pos if pos is not None and pos["task"] == t else None
                if here is None:  # else begin_task was replayed before the state was loaded
                    seed_everything(derive_seed(cfg.seed, t, "begin"))
                    method.begin_task(task)
                task_t0[0] = time.time() - (here["train_seconds"] if here else 0.0)
                for i, phase in enumerate(method.phases(task)):
                    kw: Dict[str, Any] = {}
                    if here is not None and i < here["phase"]:
                        continue
                    if here is not None and i == here["phase"]:
                        kw = dict(start_epoch=here["epoch"], start_batch=here["batch"],
                                  opt_state={"optimizer": here["optimizer"], "scheduler": here["scheduler"]},
                                  rng_state=_rank_rng(ckpt, dctx) if here["batch"] else None)
                    stats = train_phase(method, run, task, phase, i, **kw)
                    log(f"task {t + 1}/{T} phase {phase.name}: {stats['epochs']} epochs, {stats['steps']} steps, "
                        f"loss {sig4(stats['last_loss'])}, {stats['seconds']:.1f}s")
                pos = None
                timing["train_seconds"].append(time.time() - task_t0[0])
                t0 = time.time()
                seed_everything(derive_seed(cfg.seed, t, "end"))
                method.end_task(task, TaskContext(run, task))
                dist_util.broadcast_state(dctx, method.checkpoint_state())
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
                monitor.evaluation(t, T, list(ev.acc), seen_acc[-1])
                checkpoint(t, None)
                if t < T - 1 and dist_util.any_rank(dctx, stop.requested(), p.device):
                    interrupt(f"after task {t + 1}/{T}")
            if dctx.is_main:
                result = build_result(p, acc, tii, seen_acc, selection, timing, chash, run)
            else:  # only rank 0 writes; the others return the matrix they agree on
                result = {"acc_matrix": acc, "metrics": M.summarize(acc), "config_hash": chash, "rank": dctx.rank}
            store.write_result(result)
            store.set_status("done", finished=now(), **meta)
            monitor.close()
            return result
        except BaseException as e:
            monitor.close()  # flushes the TensorBoard events written so far
            if interrupted:
                raise
            if isinstance(e, KeyboardInterrupt):
                name = signal.Signals(stop.second or signal.SIGINT).name
                store.set_status("interrupted", signal=name, finished=now(), **meta,
                                 error="stopped at once (a second signal, or KeyboardInterrupt); the last checkpoint is kept")
                raise
            try:
                store.set_status("failed", error=f"{type(e).__name__}: {e}", finished=now(), **meta)
            except Exception:  # a full disk: the original error is the one to tell; no false 'running'
                store.drop_status()
            if isinstance(e, NonFiniteLossError):
                kept = (f"the last good checkpoint is kept in {store.checkpoint_path}" if store.checkpoint_path.exists()
                        else f"no checkpoint had been saved yet in {store.path}")
                raise NonFiniteLossError(f"{e}; the run stopped (status failed) and {kept}") from None
            raise


def measured_throughput(p: Prepared, batch_size: int) -> Dict[str, Any]:
    """Training-step and inference images/s of the trained method, measured here at the end of the
    run (on a copy, RNG untouched; benchmarks/run/throughput.py), with the device and precision named.

    The report's throughput columns read these; timing the run's own epochs instead would mix in
    data loading and the query cache."""
    from benchmarks.run.throughput import measure

    try:
        devices = [torch.cuda.current_device()] if p.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            probe = copy.deepcopy(p.method)
            tp = measure(probe, p.scenario.tasks[-1], p.device, batch_size=batch_size, amp_dtype=p.amp,
                         warmup=1, repeats=3, steps=2)
        del probe
    except Exception as e:  # a failed measurement must not lose the run's result
        return {"throughput_error": f"{type(e).__name__}: {e}"}
    return {"train_img_s": tp.train_img_s, "infer_img_s": tp.infer_img_s,
            "throughput": {"device": hardware_string(p.device), "precision": tp.precision, "batch_size": tp.batch_size,
                           "torch_threads": torch.get_num_threads(),
                           "how": "median of 3 timings of 2 calls after 1 warm-up, end of run, random inputs"}}


def build_result(p: Prepared, acc, tii, seen_acc, selection, timing, chash: str, run: RunContext) -> Dict[str, Any]:
    from benchmarks import diagnostics as D
    from benchmarks.cost.engine import run_cost

    cfg, method = p.cfg, p.method
    has_tii = any(v is not None for row in tii for v in row)
    return {
        "schema": SCHEMA_VERSION,
        "benchmark": p.benchmark_label,
        "method": p.method_label,
        "method_name": cfg.method_name,
        "is_baseline": method.is_baseline,
        "is_upper_bound": bool(method.joint),  # trains on every task's data (reports never rank it best)
        "seed": cfg.seed,
        "preset": cfg.preset,
        "acc_matrix": acc,
        "acc_seen_samples": seen_acc,
        "tii_matrix": tii if has_tii else None,
        "metrics": M.summarize(acc),
        "diagnostics": {
            "selection_hist": selection if (selection["final"] or selection["diagonal"]) else None,
            "selection_size": method.selection_size,
            # issue 22: the usage / task-identity summaries the report plots, and the method's kind
            "prompt_usage": D.prompt_usage(selection, method.selection_size),
            "task_id_accuracy": D.task_id_accuracy(tii),
            "method_traits": D.method_traits(method, p.scenario.tasks),
            "method": method.diagnostics(),
            "query_cache": {"hits": run.cache.hits, "misses": run.cache.misses},
        },
        "cost": {**run_cost(method, p.scenario), **measured_throughput(p, cfg.train.batch_size)},
        "timing": {**timing, "total_seconds": sum(sum(v) for v in timing.values())},
        "config": cfg.to_dict(),
        "config_hash": chash,
        "scenario": p.scenario.describe(),
        "env": environment(p.device, p.backbone_info, p.amp),
        "finished": now(),
    }
