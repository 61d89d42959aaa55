"""Read every ``result.json`` under a runs folder into tidy pandas frames.

Reports are regenerated from stored results only: nothing here trains or evaluates a model.

* :attr:`RunSet.runs` -- one row per run (benchmark, method label, seed, metrics, cost, ...);
* :attr:`RunSet.acc` -- long form, one row per (run, step, task) accuracy-matrix entry;
* :attr:`RunSet.curves` -- one row per (run, step): average accuracy over the seen tasks;
* :attr:`RunSet.forgetting` -- one row per (run, task): max-based forgetting of that task.

Runs are grouped by ``(benchmark, method)``, where ``benchmark`` is the run-folder label
(``cifar100``, or ``cifar100-5t`` for a non-default task count) and ``method`` the method label
(``l2p``, or ``l2p@tag`` for a tagged variant). Metrics are taken from ``result.json`` and, where a
key is missing, recomputed from the accuracy matrix with :mod:`benchmarks.metrics` (one formula
per metric for the whole suite).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd

from benchmarks import metrics as M
from benchmarks.config import ConfigError
from benchmarks.run.store import read_result_file

METRIC_KEYS = ("faa", "caa", "ffm", "ffm_prior", "coda_f", "bwt")
# cost keys copied into the run frame as cost_<key> (whatever else the block holds is kept in `results`)
COST_KEYS = ("backbone_params", "added_params", "trainable_params", "allocated_params", "used_params", "state_numbers",
             "state_bytes", "inference_passes", "train_passes", "inference_gmacs", "inference_gflops", "train_gmacs",
             "train_gflops", "train_fwd_gmacs", "paper_convention_gflops_inference", "paper_convention_gflops_train",
             "train_img_s", "infer_img_s", "peak_mem_mb", "query_pass")


class ReportError(ConfigError):
    """Bad report input (no runs, unknown method for --compare, ...): one sentence, exit status 2."""


@dataclass
class RunSet:
    """Every stored run under one folder, as tidy frames plus the raw result dicts."""

    root: Path
    runs: pd.DataFrame
    acc: pd.DataFrame
    curves: pd.DataFrame
    forgetting: pd.DataFrame
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # run_id -> result.json dict
    skipped: List[str] = field(default_factory=list)  # unreadable result files, with the reason

    def groups(self) -> List[tuple]:
        """(benchmark, method) pairs in display order: per benchmark, methods first, then baselines."""
        if self.runs.empty:
            return []
        g = self.runs.groupby(["benchmark", "method"], sort=False).agg(
            is_baseline=("is_baseline", "first"), upper=("is_upper_bound", "first")).reset_index()
        g = g.sort_values(["benchmark", "is_baseline", "upper", "method"])
        return list(zip(g["benchmark"], g["method"]))

    def group_results(self, benchmark: str, method: str) -> List[Dict[str, Any]]:
        """The result dicts of one (benchmark, method) group, ordered by seed."""
        rows = self.runs[(self.runs.benchmark == benchmark) & (self.runs.method == method)].sort_values("seed")
        return [self.results[r] for r in rows.run_id]


UPPER_BOUND_NAMES = ("joint",)  # for results written before result.json carried "is_upper_bound"


def _is_upper_bound(res: Dict[str, Any], method_name: str) -> bool:
    """True for baselines that train on every task's data (``ContinualMethod.joint``): an oracle, not a competitor.

    Read from result.json's ``is_upper_bound``; older results fall back on the method name, so the
    report never has to import the method registry (and torch / timm) just to render tables.
    """
    if "is_upper_bound" in res:
        return bool(res["is_upper_bound"])
    return method_name in UPPER_BOUND_NAMES


def _num(v: Any) -> float:
    """JSON number or null -> float (NaN for null / missing)."""
    if v is None or isinstance(v, bool):
        return math.nan if v is None else float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def find_results(root: Path) -> List[Path]:
    """Every ``result.json`` below ``root`` (sorted, so reports are deterministic)."""
    return sorted(p for p in Path(root).rglob("result.json") if p.is_file())


def load_runs(root: str | Path) -> RunSet:
    """Load every result under ``root``; a missing folder or one without results is a ReportError."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"runs folder '{root}' does not exist; pass --runs with the --out folder of 'bench.py run'")
    paths = find_results(root)
    if not paths:
        raise ReportError(f"no result.json found under '{root}'; run 'bench.py run ... --out {root}' first")
    results: Dict[str, Dict[str, Any]] = {}
    skipped: List[str] = []
    for p in paths:
        try:
            res = read_result_file(p)  # JSON object, matching result.json.sha256 when there is one
            check_result_fields(res)
        except (OSError, KeyError, TypeError, ValueError) as e:
            why = str(e) if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: {e}"
            skipped.append(f"{p}: {why.replace(str(p) + ' ', '')}")
            continue
        results[str(p.parent.relative_to(root))] = res
    if not results:
        raise ReportError(f"none of the {len(paths)} result.json files under '{root}' could be read (first: {skipped[0]})")
    for s in skipped:
        warnings.warn(f"skipped unreadable result {s}", stacklevel=2)
    results = _drop_duplicates(results)
    return _frames(root, results, skipped)


def check_result_fields(res: Dict[str, Any]) -> None:
    """Raise ValueError naming the first field of a result that a report cannot use.

    A result without ``is_baseline`` (older versions) gets it from the method registry; one of a
    method that is no longer registered is refused rather than ranked as a method.
    """
    M.as_matrix(res["acc_matrix"])  # validates shape and the lower triangle (KeyError if absent)
    for key in ("benchmark", "method"):
        if not isinstance(res.get(key), str) or not res[key]:
            raise ValueError(f"field '{key}' is {res.get(key)!r}, not a name")
    if not isinstance(res.get("seed"), int) or isinstance(res.get("seed"), bool):
        raise ValueError(f"field 'seed' is {res.get('seed')!r}, not an integer")
    for key in ("is_baseline", "is_upper_bound"):
        if key in res and not isinstance(res[key], bool):
            raise ValueError(f"field '{key}' is {res[key]!r}, not true or false")
    for key in ("metrics", "cost", "config", "env", "timing", "scenario", "diagnostics"):
        if res.get(key) is not None and not isinstance(res[key], dict):
            raise ValueError(f"field '{key}' is {type(res[key]).__name__}, not a mapping")
    for k, v in (res.get("metrics") or {}).items():
        if k in METRIC_KEYS and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"field 'metrics.{k}' is {v!r}, not a number")
    if res.get("acc_seen_samples") is not None and not isinstance(res["acc_seen_samples"], list):
        raise ValueError("field 'acc_seen_samples' is not a list")
    tii = res.get("tii_matrix")
    if tii is not None and not (isinstance(tii, list) and all(isinstance(r, list) for r in tii)):
        raise ValueError("field 'tii_matrix' is not a matrix")
    if "is_baseline" not in res:
        name = res.get("method_name") or (res.get("config") or {}).get("method_name") or res["method"].split("@")[0]
        try:
            from methods.registry import get_method_class

            res["is_baseline"] = bool(get_method_class(str(name)).is_baseline)
        except Exception:
            raise ValueError(f"field 'is_baseline' is missing and method '{name}' is not registered, so it cannot be "
                             f"told apart from a baseline") from None


def _drop_duplicates(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Keep one result per (benchmark, method, seed): the most recently finished one, with a warning."""
    best: Dict[tuple, str] = {}
    for rid, r in results.items():
        key = (r["benchmark"], r["method"], r["seed"])
        if key in best:
            other = best[key]
            keep = rid if str(r.get("finished", "")) > str(results[other].get("finished", "")) else other
            warnings.warn(f"two results for {key}: {other} and {rid}; keeping {keep}", stacklevel=3)
            best[key] = keep
        else:
            best[key] = rid
    kept = set(best.values())
    return {rid: r for rid, r in results.items() if rid in kept}


def _frames(root: Path, results: Dict[str, Dict[str, Any]], skipped: List[str]) -> RunSet:
    run_rows, acc_rows, curve_rows, forget_rows = [], [], [], []
    for rid, r in results.items():
        A = M.as_matrix(r["acc_matrix"])
        T = A.shape[0]
        stored = r.get("metrics") or {}
        summary = M.summarize(r["acc_matrix"])
        metrics = {k: _num(stored[k]) if stored.get(k) is not None else _num(summary[k]) for k in METRIC_KEYS}
        cfg = r.get("config") or {}
        env = r.get("env") or {}
        bb = env.get("backbone") or {}
        cost = r.get("cost") or {}
        method_name = r.get("method_name") or cfg.get("method_name") or str(r["method"]).split("@")[0]
        base = {"run_id": rid, "benchmark": r["benchmark"], "method": r["method"], "seed": int(r["seed"])}
        run_rows.append({
            **base,
            "method_name": method_name,
            "is_baseline": bool(r.get("is_baseline", False)),
            "is_upper_bound": _is_upper_bound(r, method_name),
            "preset": r.get("preset"),
            "dataset": (cfg.get("benchmark") or {}).get("name", r["benchmark"].split("-")[0]),
            "num_tasks": T,
            "num_classes": (r.get("scenario") or {}).get("num_classes"),
            "backbone": bb.get("name"),
            "backbone_sha256": bb.get("sha256"),
            "precision": env.get("precision"),
            "hardware": env.get("hardware"),
            **metrics,
            "tii_final": _tii_final(r.get("tii_matrix")),
            **{f"cost_{k}": _num(cost.get(k)) for k in COST_KEYS},
            "total_seconds": _num((r.get("timing") or {}).get("total_seconds")),
            "config_hash": r.get("config_hash"),
            "finished": r.get("finished"),
        })
        for t in range(T):
            for j in range(t + 1):
                acc_rows.append({**base, "step": t, "task": j, "acc": float(A[t, j])})
        seen = r.get("acc_seen_samples") or [math.nan] * T
        for t, a in enumerate(summary["avg_acc_curve"]):
            curve_rows.append({**base, "step": t, "tasks_seen": t + 1, "avg_acc": a, "seen_acc": _num(seen[t]) if t < len(seen) else math.nan})
        for j, f in enumerate(summary["forgetting_per_task"]):
            forget_rows.append({**base, "task": j, "forgetting": f})
    runs = pd.DataFrame(run_rows).sort_values(["benchmark", "method", "seed"]).reset_index(drop=True)
    return RunSet(root, runs, pd.DataFrame(acc_rows), pd.DataFrame(curve_rows), pd.DataFrame(forget_rows), results, skipped)


def _tii_final(tii: Optional[List[List[Optional[float]]]]) -> float:
    """Mean task-identity accuracy over the tasks after the last step (NaN if the method predicts none)."""
    if not tii:
        return math.nan
    last = [v for v in tii[-1] if v is not None]
    return sum(last) / len(last) if last else math.nan


def load_cost(folder: Optional[str | Path]) -> Dict[str, pd.DataFrame]:
    """``cost.csv`` / ``growth.csv`` of a ``bench.py cost --out`` folder (absent files -> absent keys)."""
    out: Dict[str, pd.DataFrame] = {}
    if folder is None:
        return out
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"cost folder '{folder}' does not exist; pass the --out folder of 'bench.py cost'")
    for name in ("cost", "growth"):
        p = folder / f"{name}.csv"
        if p.exists():
            try:
                out[name] = pd.read_csv(p)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                warnings.warn(f"skipped unreadable {p}: {e}", stacklevel=2)
    return out
