"""``bench.py sweep``: benchmarks × methods × seeds (× presets), validated first, run by a launcher.

The grid comes from the ``run`` flags (``-b``, ``-m``, ``--seeds``, ``--preset``, ``--set``) or a
YAML file (``--grid``)::

    benchmarks: [cifar100, imagenet_r]
    methods:
      - l2p
      - dualprompt
      - {name: smope, tag: k4, set: [method.top_k=4]}   # a variant, run folder smope@k4
    seeds: [0, 1, 2]
    presets: [paper]                                    # optional (default: --preset)
    set: [train.num_workers=8]                          # for every run; CLI --set wins

Before anything is launched every config is resolved and built once on CPU (seeds aside), and
every run directory is inspected (``runner.plan_run``): bad input, a result of another config or
an incompatible checkpoint stop the sweep with exit status 2 and nothing written. Runs already
done with the same config hash are skipped; interrupted or killed runs resume from their
checkpoint; a failing run is recorded and the sweep goes on. The summary lists every run as
done / failed / skipped / interrupted with its folder.

Launchers (each calls :func:`run_job`, the same function, on one run's spec):

* ``local``: one run after the other in this process; with ``--gpus N``, N worker processes at a
  time, worker i pinned to GPU i by ``CUDA_VISIBLE_DEVICES``;
* ``slurm``: a submitit job array, one run per job (``--partition``, ``--time-limit``,
  ``--gpus``, ``--cpus-per-task``, ``--array-parallelism``). A job that gets SLURM's pre-emption
  / time-limit warning (submitit's SIGUSR2) saves a checkpoint at the next step and is requeued
  by submitit; the requeued job resumes. ``--submitit-backend local`` runs the same array as
  local processes through submitit's LocalExecutor (testing without a cluster).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from benchmarks.config import ConfigError, RunConfig, deep_merge, parse_set, resolve_config, run_config_from_dict

ROOT = Path(__file__).resolve().parents[2]
GRID_KEYS = ("benchmarks", "methods", "seeds", "presets", "set")


@dataclass
class Entry:
    """One run of the sweep."""

    cfg: RunConfig
    tag: Optional[str]
    path: Path
    action: str = "start"  # from runner.plan_run: skip | resume | start
    status: str = "pending"  # done | failed | skipped | interrupted | damaged | pending
    error: str = ""
    note: str = ""

    def spec(self, out: str, overwrite: bool) -> Dict[str, Any]:
        """What a worker needs to run it: the resolved config, not the command line."""
        return {"config": self.cfg.to_dict(), "tag": self.tag, "out": str(out), "overwrite": overwrite}


# --- the grid ------------------------------------------------------------------------------

def _as_list(value: Any, key: str) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, list):
        return value
    raise ConfigError(f"grid key '{key}' expects a list, got {value!r}")


def _overrides(value: Any, where: str) -> Dict[str, Any]:
    """``set`` in a grid: a list of ``key=value`` strings or a nested mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_set(value)
    raise ConfigError(f"{where} 'set' expects a list of key=value strings or a mapping, got {value!r}")


def load_grid(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file {path} not found")
    try:
        grid = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path} must be a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key '{unknown[0]}' in {path}; valid keys are: {', '.join(GRID_KEYS)}")
    return grid


def expand(args: argparse.Namespace) -> List[Entry]:
    """Resolve every run of the grid (raises ConfigError / UnknownMethodError on bad input)."""
    from benchmarks.run import cli as bench_cli
    from benchmarks.run.runner import run_path

    grid = load_grid(args.grid) if args.grid else {}
    benches = bench_cli.expand_benchmarks([str(b) for b in _as_list(grid.get("benchmarks"), "benchmarks")]
                                      or bench_cli.split_names(args.benchmark))
    methods: List[Dict[str, Any]] = []
    for m in _as_list(grid.get("methods"), "methods"):
        if isinstance(m, str):
            methods += [{"name": n} for n in bench_cli.expand_methods([m])]
        elif isinstance(m, dict) and isinstance(m.get("name"), str) and set(m) <= {"name", "tag", "set"}:
            bench_cli.expand_methods([m["name"]])
            methods.append(m)
        else:
            raise ConfigError(f"a grid method must be a name or a mapping with name, tag and set; got {m!r}")
    if not methods:
        methods = [{"name": n} for n in bench_cli.expand_methods(bench_cli.split_names(args.method))]
    seeds = _as_list(grid.get("seeds"), "seeds") or list(args.seeds)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"grid seeds must be integers, got {seeds!r}")
    presets = [str(p) for p in _as_list(grid.get("presets"), "presets")] or [args.preset]
    common = deep_merge(_overrides(grid.get("set"), "the grid's"), bench_cli.cli_overrides(args))
    entries: List[Entry] = []
    for preset in presets:
        for b in benches:
            for m in methods:
                tag = m.get("tag") if m.get("tag") is not None else args.tag
                over = deep_merge(common, _overrides(m.get("set"), f"method {m['name']}'s"))
                # the CLI --set still wins over a method entry's set
                over = deep_merge(over, parse_set(getattr(args, "set", None) or []))
                for s in seeds:
                    cfg = resolve_config(m["name"], b, preset, over)
                    cfg.seed = s
                    entries.append(Entry(cfg, None if tag is None else str(tag), run_path(cfg, args.out, tag)))
    paths = [e.path for e in entries]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    if dup is not None:
        raise ConfigError(f"two runs of the grid share the folder {dup}; give variants distinct tags")
    return entries


def plan(entries: List[Entry], overwrite: bool) -> None:
    """Validate every config (built once on CPU) and decide skip / resume / start per run."""
    from benchmarks.run.runner import plan_run, validate_configs

    by_tag: Dict[Optional[str], List[RunConfig]] = {}
    for e in entries:
        by_tag.setdefault(e.tag, []).append(e.cfg)
    for tag, cfgs in by_tag.items():
        validate_configs(cfgs, tag=tag)
    from benchmarks.run.runner import DamagedResultError
    from benchmarks.run.store import RunStore

    for e in entries:
        try:
            e.action = plan_run(e.cfg, e.path, resume=not overwrite, overwrite=overwrite).action
        except DamagedResultError as err:  # skipped and named (counted in the summary); the others go on
            e.action, e.status, e.error = "skip", "damaged", str(err)
            continue
        if e.action == "skip":
            e.status = "skipped"
        store = RunStore(e.path)
        writer = store.writer()
        if writer is not None:  # another process holds the folder's lock right now
            e.action, e.status, e.error = "skip", "skipped", f"still running in {writer}"
        elif store.is_stale():
            e.note = "status said running, but its process was killed"


# --- the run function every launcher calls -------------------------------------------------

def run_job(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one sweep entry (resuming a compatible checkpoint) and report how it ended.

    Returns ``{"status": done | failed | interrupted | skipped, "run_dir", "error", "exit_code"}``;
    never raises for a failing run, so a job array's other runs go on.
    """
    from benchmarks.run.protocol import NonFiniteLossError
    from benchmarks.run.runner import RunInterrupted, prepare, run_path, run_prepared

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    cfg = run_config_from_dict(spec["config"])
    validate = getattr(cfg.method, "validate", None)
    if callable(validate):
        validate()
    tag, out, overwrite = spec.get("tag"), spec["out"], bool(spec.get("overwrite"))
    path = run_path(cfg, out, tag)
    res: Dict[str, Any] = {"run_dir": str(path), "error": "", "status": "done", "exit_code": 0}
    try:
        p = prepare(cfg, tag=tag)
        result = run_prepared(p, out, resume=not overwrite, overwrite=overwrite, log_to_stdout=not cfg.quiet)
        res["faa"] = result.get("metrics", {}).get("faa")
    except RunInterrupted as e:
        res.update(status="interrupted", error=str(e), exit_code=e.exit_code)
    except KeyboardInterrupt:
        res.update(status="interrupted", error="KeyboardInterrupt", exit_code=130)
    except NonFiniteLossError as e:
        res.update(status="failed", error=f"NonFiniteLossError: {e}", exit_code=1)
    except Exception as e:  # a bug or a user error surfaced only now: record it, go on
        from benchmarks.run import cli as bench_cli
        code = 2 if isinstance(e, bench_cli.user_errors()) else 1
        res.update(status="failed", error=f"{type(e).__name__}: {e}", exit_code=code)
        if code == 1:
            traceback.print_exc()
    return res


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is optional for the local launcher
    _Checkpointable = object  # type: ignore[misc,assignment]


class SweepJob(_Checkpointable):  # type: ignore[misc,valid-type]
    """submitit callable: one run per job. On pre-emption submitit calls ``checkpoint`` (inherited:
    requeue with the same spec) after the run has saved its own checkpoint, and the requeued job
    resumes from it."""

    def __call__(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        return run_job(spec)


# --- launchers -----------------------------------------------------------------------------

def launch_local(pending: List[Entry], args: argparse.Namespace) -> Optional[int]:
    """In this process, one after the other; returns the signal that stopped the sweep, if any."""
    try:
        for e in pending:
            r = run_job(e.spec(args.out, args.overwrite))
            e.status, e.error = r["status"], r["error"]
            if e.status == "interrupted":
                return r["exit_code"] - 128
    except KeyboardInterrupt:  # Ctrl-C between two runs
        return int(signal.SIGINT)
    return None


def launch_processes(pending: List[Entry], args: argparse.Namespace) -> Optional[int]:
    """``--gpus N``: N worker processes at a time, worker slot i sees only GPU i."""
    n = max(1, args.gpus)
    # slot i gets the i-th *visible* GPU: respects a CUDA_VISIBLE_DEVICES the sweep itself was given
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(n)]
    logs = Path(args.out) / ".sweep"
    logs.mkdir(parents=True, exist_ok=True)
    queue = list(pending)
    running: Dict[int, tuple] = {}  # slot -> (Popen, Entry, log file)
    stop: List[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not stop:
            stop.append(signum)
            for proc, _, _ in running.values():
                proc.send_signal(signum)  # each worker saves its checkpoint and exits

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            for slot in range(n):
                if slot not in running and queue and not stop:
                    e = queue.pop(0)
                    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible[slot % len(visible)], PYTHONPATH=_pythonpath())
                    log = logs / f"{e.path.relative_to(args.out).as_posix().replace('/', '_')}.log"
                    fh = open(log, "w")
                    cmd = [sys.executable, "-m", "benchmarks.run.sweep", "--job", json.dumps(e.spec(args.out, args.overwrite))]
                    # own session: a terminal Ctrl-C reaches only this process, which forwards it
                    # once (a worker that got it twice would stop without its checkpoint)
                    running[slot] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                      start_new_session=True), e, fh)
            if stop and not running:
                break
            time.sleep(0.2)
            for slot in list(running):
                proc, e, fh = running[slot]
                code = proc.poll()
                if code is None:
                    continue
                fh.close()
                del running[slot]
                e.status = "done" if code == 0 else ("interrupted" if code >= 128 else "failed")
                if code != 0:
                    e.error = _last_error(e.path, Path(fh.name))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return stop[0] if stop else None


def launch_slurm(pending: List[Entry], args: argparse.Namespace) -> Optional[int]:
    """A submitit job array; waits for it and fills the statuses unless ``--no-wait``."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm launcher needs submitit; pip install submitit") from None
    backend = args.submitit_backend
    folder = Path(args.out) / ".submitit"
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=backend)
    except RuntimeError as e:  # e.g. 'Could not detect "srun"': not on a SLURM login node
        raise ConfigError(f"--launcher slurm needs a SLURM cluster ({str(e).strip().rstrip('.')}); use --launcher local, "
                          f"or --submitit-backend local to run the job array on this machine") from None
    gpus = args.gpus if args.gpus is not None else (0 if (args.device or "").startswith("cpu") else 1)
    params: Dict[str, Any] = {"timeout_min": args.time_limit, "name": "promptcl", "slurm_array_parallelism": args.array_parallelism}
    if backend == "slurm":  # the local / debug executors reject cluster resources
        params.update(gpus_per_node=gpus, cpus_per_task=args.cpus_per_task, slurm_setup=[f"export PYTHONPATH={_pythonpath()}"])
        if args.partition:
            params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    os.environ["PYTHONPATH"] = _pythonpath()  # local jobs inherit it; unpickling needs the repo
    jobs = executor.map_array(SweepJob(), [e.spec(args.out, args.overwrite) for e in pending])
    print(f"submitted {len(jobs)} job(s) ({backend}): {', '.join(str(j.job_id) for j in jobs)}; logs in {folder}", flush=True)
    if args.no_wait:
        for e in pending:
            e.status = "submitted"
        return None
    for e, job in zip(pending, jobs):
        try:
            r = job.result()
            e.status, e.error = r["status"], r["error"]
        except Exception as ex:  # the job itself died (killed, out of memory, node failure)
            e.status, e.error = "failed", f"job {job.job_id}: {str(ex).strip().splitlines()[-1] if str(ex).strip() else type(ex).__name__}"
    return None


def _pythonpath() -> str:
    cur = os.environ.get("PYTHONPATH", "")
    return str(ROOT) if not cur else (cur if str(ROOT) in cur.split(os.pathsep) else f"{ROOT}{os.pathsep}{cur}")


def _last_error(path: Path, log: Path) -> str:
    """The error of a run that ended badly: status.json's, else the log's last line."""
    try:
        st = json.loads((path / "status.json").read_text())
        if st.get("error") or st.get("status") == "interrupted":
            return st.get("error") or f"interrupted by {st.get('signal')}"
    except (OSError, ValueError):
        pass
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1] if lines else "no output"


# --- command -------------------------------------------------------------------------------

def summary(entries: List[Entry]) -> str:
    counts = {k: sum(e.status == k for e in entries)
              for k in ("done", "failed", "skipped", "damaged", "interrupted", "pending", "submitted")}
    head = "sweep: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("done", "failed", "skipped", "damaged"))
    lines = [head]
    for e in entries:
        lines.append(f"  {e.status:<12} {e.path}" + (f"  ({e.error.splitlines()[0][:300]})" if e.error else ""))
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``bench.py sweep``; exit 0 when every run is done or skipped, 1 when one failed,
    128 + signal when the sweep was interrupted, 2 for bad input (nothing launched)."""
    from benchmarks.run.store import check_out_folder

    check_out_folder(args.out)
    entries = expand(args)
    plan(entries, args.overwrite)
    pending = [e for e in entries if e.action != "skip"]
    damaged = [e for e in entries if e.status == "damaged"]
    if damaged:
        print(f"sweep: {len(damaged)} damaged result.json skipped (named below); remove them or pass --overwrite",
              file=sys.stderr, flush=True)
    if args.dry_run:
        for e in entries:
            what = "damaged" if e.status == "damaged" else ("skip (done)" if e.action == "skip" else e.action)
            extra = e.error or e.note
            print(f"  {what:<12} {e.path}" + (f"  ({extra})" if extra else ""))
        print(f"sweep (dry run): {len(pending)} to run, {len(entries) - len(pending) - len(damaged)} already done, "
              f"{len(damaged)} damaged")
        return 1 if damaged else 0
    print(f"sweep: {len(entries)} runs, {len(pending)} to run, {len(entries) - len(pending) - len(damaged)} already done "
          f"({args.launcher}{'' if args.launcher == 'slurm' or not args.gpus else f', {args.gpus} processes'})", flush=True)
    if not pending:
        signum = None
    elif args.launcher == "slurm":
        signum = launch_slurm(pending, args)
    elif args.gpus:
        signum = launch_processes(pending, args)
    else:
        signum = launch_local(pending, args)
    print(summary(entries), flush=True)
    if signum:
        return 128 + signum
    return 1 if any(e.status in ("failed", "damaged") for e in entries) else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Worker entry point of the process launcher: ``python -m benchmarks.run.sweep --job SPEC``."""
    ap = argparse.ArgumentParser(prog="benchmarks.run.sweep")
    ap.add_argument("--job", required=True, help="JSON run spec (see Entry.spec)")
    a = ap.parse_args(argv)
    r = run_job(json.loads(a.job))
    if r["error"]:
        print(f"{r['status']}: {r['error']}", file=sys.stderr, flush=True)
    return int(r["exit_code"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
