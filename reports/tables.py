"""The report's tables, built as :class:`Table` objects (display cells + a numeric frame for CSV).

* :func:`main_table` -- one row per (benchmark, method): metrics as mean ± std over seeds with the
  number of seeds, added parameters, inference GFLOPs and throughput; the best value per column
  is marked (direction-aware: accuracy higher, forgetting and cost lower). Upper bounds (methods
  that train on every task's data, ``ContinualMethod.joint``) are shown but never marked best.
* :func:`reproduction_table` -- reported number (``benchmarks/tables/references``) vs ours vs delta,
  only where benchmark, task count, method and the entry's ``match`` keys agree.
* :func:`protocol_diff_table` -- every setting in which the compared runs differ (resolved config,
  backbone identity, precision, hardware, versions, class order per seed, seeds).
* :func:`paired_tables` -- per-seed differences of two methods and their 95% t-interval.
* :func:`cost_table` -- the ``bench.py cost`` table (``cost.csv``) as it is, units in the headers.

All "± std" are sample standard deviations over seeds (``reports.stats.STD_DDOF``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from benchmarks import diagnostics as D
from reports import stats as S
from reports.loader import ReportError, RunSet
from reports.references import REFERENCE_METRICS, Reference, config_value

# metric -> (header, direction: +1 higher is better, -1 lower is better)
METRICS: Dict[str, Tuple[str, int]] = {
    "faa": ("FAA (%)", +1),
    "caa": ("CAA (%)", +1),
    "ffm": ("FFM (%)", -1),
    "ffm_prior": ("FFM prior (%)", -1),
    "coda_f": ("CODA F (%)", -1),
    "bwt": ("BWT (%)", +1),
    "tii_final": ("task-id acc. (%)", +1),
}
DEFAULT_METRICS = ("faa", "caa", "ffm")
# cost column -> (header, direction, display digits); best is decided at display precision
COST_COLUMNS: Dict[str, Tuple[str, int, int]] = {
    "added_params": ("added params", -1, 0),
    "inference_gflops": ("inference GFLOPs/img", -1, 3),
    "infer_img_s": ("inference img/s", +1, 1),
    "train_img_s": ("train img/s", +1, 1),
}


def _fmt_cost(key: str, v: float) -> str:
    return S.fmt_count(v) if key == "added_params" else S.fmt_num(v, COST_COLUMNS[key][2])
THROUGHPUT_KEYS = ("infer_img_s", "train_img_s", "peak_mem_mb")
ALWAYS_COST = ("added_params", "inference_gflops", "infer_img_s")  # shown even when empty ("—")
ARROW = {+1: "↑", -1: "↓"}


@dataclass
class Cell:
    """One display cell; ``best`` renders bold (LaTeX, HTML) / ``**...**`` (markdown)."""

    text: str
    best: bool = False


@dataclass
class Table:
    """A rendered-agnostic table: display rows for md / tex / html, a numeric frame for CSV."""

    name: str
    title: str
    columns: List[str]
    rows: List[List[Cell]]
    data: pd.DataFrame
    notes: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows


def _cells(values: Iterable[Any]) -> List[Cell]:
    return [v if isinstance(v, Cell) else Cell("—" if v is None else str(v)) for v in values]


def method_display(method: str, is_baseline: bool, upper: bool) -> str:
    """``ncm (baseline)``, ``joint (upper bound)``, ``l2p``."""
    if upper:
        return f"{method} (upper bound)"
    return f"{method} (baseline)" if is_baseline else method


# --- cost lookup ---------------------------------------------------------------------------

def _arch(name: Any) -> Optional[str]:
    """Backbone architecture without the weights tag (FLOPs do not depend on the tag)."""
    return None if not isinstance(name, str) else name.split(".")[0]


def group_cost(rows: pd.DataFrame, cost_csv: Optional[pd.DataFrame], key: str) -> Tuple[float, Optional[str]]:
    """One cost value for a (benchmark, method) group and where it came from.

    First the runs' own ``result.json`` cost block (median over seeds; the value is per method,
    so seeds agree); otherwise the ``cost.csv`` row of the same method *on the same backbone
    architecture* (and the same number of classes / tasks where cost.csv has those columns).
    Missing -> (NaN, None).
    """
    col = f"cost_{key}"
    if col in rows and rows[col].notna().any():
        return float(rows[col].median()), "runs"
    if cost_csv is None or key not in cost_csv.columns or "method" not in cost_csv.columns:
        return math.nan, None
    first = rows.iloc[0]
    sel = cost_csv[cost_csv["method"].astype(str).isin({str(first["method"]), str(first["method_name"])})]
    # throughput may be measured on another backbone than the FLOPs (bench.py cost --throughput)
    bb_col = "throughput_backbone" if key in THROUGHPUT_KEYS and "throughput_backbone" in sel.columns else "backbone"
    if bb_col in sel.columns:
        sel = sel[sel[bb_col].map(_arch) == _arch(first["backbone"])]
    for c, v in (("num_classes", first.get("num_classes")), ("num_tasks", first.get("num_tasks"))):
        if c in sel.columns and v is not None and not pd.isna(v):
            sel = sel[pd.to_numeric(sel[c], errors="coerce") == float(v)]
    vals = pd.to_numeric(sel[key], errors="coerce").dropna()
    return (float(vals.iloc[0]), "cost.csv") if len(vals) else (math.nan, None)


def _mark_best(values: Sequence[float], direction: int, eligible: Sequence[bool], digits: int) -> List[bool]:
    """True where the value equals the best eligible value at display precision (ties all marked).

    Nothing is marked when fewer than two eligible rows have a value."""
    cand = [round(v, digits) for v, ok in zip(values, eligible) if ok and np.isfinite(v)]
    if len(cand) < 2:  # nothing to compare against
        return [False] * len(values)
    best = max(cand) if direction > 0 else min(cand)
    return [bool(ok and np.isfinite(v) and round(v, digits) == best) for v, ok in zip(values, eligible)]


# --- main comparison -----------------------------------------------------------------------

def main_table(rs: RunSet, metrics: Sequence[str] = DEFAULT_METRICS, cost_csv: Optional[pd.DataFrame] = None,
               digits: int = 2) -> Table:
    """One row per (benchmark, method): mean ± std over seeds, n, cost columns; best marked."""
    for m in metrics:
        if m not in METRICS:
            raise ReportError(f"unknown metric '{m}'; choose from {', '.join(METRICS)}")
    records: List[Dict[str, Any]] = []
    for bench, method in rs.groups():
        g = rs.runs[(rs.runs.benchmark == bench) & (rs.runs.method == method)]
        first = g.iloc[0]
        rec: Dict[str, Any] = {"benchmark": bench, "method": method, "method_name": first["method_name"],
                               "is_baseline": bool(first["is_baseline"]), "is_upper_bound": bool(first["is_upper_bound"]),
                               "n_seeds": len(g), "seeds": " ".join(str(s) for s in sorted(g.seed)),
                               "backbone": first["backbone"],
                               # fp32 is the default and every reference's precision; bf16 is an opt-in
                               "precision": "/".join(sorted({str(v) for v in g["precision"] if isinstance(v, str)})) or "—"}
        # issue 22: what kind of method the row is (¹ task 1 only, ᴮ backbone, ˢ class statistics)
        first_res = rs.group_results(bench, method)[0]
        rec["traits"] = D.trait_marks((first_res.get("diagnostics") or {}).get("method_traits"))
        for m in metrics:
            mean, std, n = S.mean_std(g[m])
            rec[f"{m}_mean"], rec[f"{m}_std"], rec[f"{m}_n"] = mean, std, n
        for key in COST_COLUMNS:
            rec[key], rec[f"{key}_source"] = group_cost(g, cost_csv, key)
        records.append(rec)
    data = pd.DataFrame(records)
    cost_cols = [k for k in COST_COLUMNS if k in ALWAYS_COST or data[k].notna().any()]
    # best per benchmark section and column
    for col, direction, dig in ([(f"{m}_mean", METRICS[m][1], digits) for m in metrics]
                                + [(k, COST_COLUMNS[k][1], COST_COLUMNS[k][2]) for k in cost_cols]):
        data[col.replace("_mean", "") + "_best"] = False
        for bench, idx in data.groupby("benchmark", sort=False).groups.items():
            sub = data.loc[idx]
            flags = _mark_best(sub[col].tolist(), direction, (~sub["is_upper_bound"]).tolist(), dig)
            data.loc[idx, col.replace("_mean", "") + "_best"] = flags
    has_traits = bool(data["traits"].astype(bool).any())
    columns = (["benchmark", "method"] + (["kind"] if has_traits else []) + ["n", "precision"]
               + [f"{METRICS[m][0]} {ARROW[METRICS[m][1]]}" for m in metrics]
               + [f"{COST_COLUMNS[k][0]} {ARROW[COST_COLUMNS[k][1]]}" for k in cost_cols])
    rows: List[List[Cell]] = []
    for _, r in data.iterrows():
        row = [Cell(r["benchmark"]), Cell(method_display(r["method"], r["is_baseline"], r["is_upper_bound"]))]
        row += [Cell(r["traits"])] if has_traits else []
        row += [Cell(str(r["n_seeds"])), Cell(r["precision"])]
        row += [Cell(S.fmt_mean_std(r[f"{m}_mean"], r[f"{m}_std"], digits), bool(r[f"{m}_best"])) for m in metrics]
        row += [Cell(_fmt_cost(k, r[k]), bool(r[f"{k}_best"])) for k in cost_cols]
        rows.append(row)
    sources = sorted({s for k in cost_cols for s in data[f"{k}_source"].dropna()})
    notes = [f"mean ± sample std (ddof={S.STD_DDOF}) over the n seeds; best per benchmark in bold "
             "(↑ higher is better, ↓ lower is better; upper bounds are not ranked).",
             "FAA: final average accuracy; CAA: mean over steps of the average accuracy on seen tasks; FFM: max-based "
             "final forgetting (max includes the final step); formulas in benchmarks/metrics.py.",
             "precision: what the runs ran in (env.precision of result.json): fp32 (default, as every reference code) or "
             "bf16 autocast (opt-in, --precision bf16; its measured effect is in docs/speed.md)."]
    if has_traits:
        notes.append("kind: ¹ trains on the first task only; ᴮ trains the backbone's own weights; "
                     "ˢ keeps class statistics (prototypes, Gaussians or class sums) (diagnostics.method_traits).")
    if "cost.csv" in sources:
        notes.append("cost columns marked from cost.csv come from 'bench.py cost' for the same method and backbone "
                     "architecture, not from the runs themselves.")
    if data[[k for k in cost_cols]].isna().any().any():
        notes.append("—: not recorded in the results; a 'bench.py cost --throughput' folder for the runs' benchmark, preset "
                     "and backbone, passed with --cost, fills throughput and other missing cost columns.")
    return Table("main", "Main comparison", columns, rows, data, notes)


# --- reproduction ---------------------------------------------------------------------------

def _ours_values(rs: RunSet, ref: Reference, g: pd.DataFrame, cost_csv: Optional[pd.DataFrame]) -> Tuple[List[float], str]:
    """Per-seed values of ``ref.metric`` for one run group (or one cost value) and their source."""
    m = ref.metric
    if m in ("faa", "caa", "ffm", "ffm_prior", "coda_f", "bwt"):
        return [float(v) for v in g[m]], "runs"
    if m in ("acc_seen_final", "acc_seen_avg"):
        c = rs.curves[rs.curves.run_id.isin(g.run_id)]
        if m == "acc_seen_final":
            last = c.sort_values("step").groupby("run_id").tail(1)
            return last.seen_acc.tolist(), "runs"
        return c.groupby("run_id").seen_acc.mean().tolist(), "runs"
    key = {"added_params_m": "added_params", "train_gflops_paper": "paper_convention_gflops_train",
           "inference_gflops_paper": "paper_convention_gflops_inference"}[m]
    v, src = group_cost(g, cost_csv if not ref.match else None, key)
    if key == "added_params":
        v = v / 1e6
    return ([v] if np.isfinite(v) else []), (src or "runs")


def _matches(ref: Reference, g: pd.DataFrame, rs: RunSet) -> bool:
    first = g.iloc[0]
    if first["dataset"] != ref.benchmark or int(first["num_tasks"]) != ref.num_tasks or first["method_name"] != ref.ours:
        return False
    for rid in g.run_id:
        cfg = rs.results[rid].get("config") or {}
        for key, want in ref.match.items():
            if config_value(cfg, key) != want:
                return False
    return True


def _cost_only_rows(ref: Reference, cost_csv: Optional[pd.DataFrame]) -> Optional[Dict[str, Any]]:
    """An efficiency reference matched against cost.csv alone (no run needed)."""
    if cost_csv is None or ref.match or ref.metric not in ("added_params_m", "train_gflops_paper", "inference_gflops_paper"):
        return None
    key = {"added_params_m": "added_params", "train_gflops_paper": "paper_convention_gflops_train",
           "inference_gflops_paper": "paper_convention_gflops_inference"}[ref.metric]
    if key not in cost_csv.columns or "method" not in cost_csv.columns:
        return None
    sel = cost_csv[cost_csv["method"].astype(str) == str(ref.ours)]
    if "benchmark" in sel.columns:
        sel = sel[sel["benchmark"].astype(str) == ref.benchmark]
    if "num_tasks" in sel.columns:
        sel = sel[pd.to_numeric(sel["num_tasks"], errors="coerce") == ref.num_tasks]
    vals = pd.to_numeric(sel[key], errors="coerce").dropna()
    if not len(vals):
        return None
    v = float(vals.iloc[0]) / (1e6 if key == "added_params" else 1.0)
    bb = sel["backbone"].iloc[0] if "backbone" in sel.columns else None
    return {"value": v, "backbone": bb, "method": ref.ours}


def reproduction_table(rs: RunSet, refs: Sequence[Reference], cost_csv: Optional[pd.DataFrame] = None,
                       digits: int = 2) -> Table:
    """Paper vs ours vs delta (ours − paper) wherever the setting matches; see the module doc."""
    records: List[Dict[str, Any]] = []
    for ref in refs:
        if not ref.ours:
            continue
        matched = False
        for (bench, method), g in rs.runs.groupby(["benchmark", "method"], sort=True):
            if not _matches(ref, g, rs):
                continue
            vals, src = _ours_values(rs, ref, g, cost_csv)
            mean, std, n = S.mean_std(vals)
            if n == 0:
                continue
            matched = True
            first = g.iloc[0]
            records.append(_repro_record(ref, bench, method, mean, std if src == "runs" and ref.metric not in
                                         ("added_params_m", "train_gflops_paper", "inference_gflops_paper") else math.nan,
                                         n if src == "runs" else 0, first["backbone"], first["preset"], src))
        if not matched:
            c = _cost_only_rows(ref, cost_csv)
            if c is not None:
                records.append(_repro_record(ref, ref.benchmark, c["method"], c["value"], math.nan, 0, c["backbone"], None, "cost.csv"))
    cols = ["benchmark", "tasks", "method", "reported as", "metric", "paper", "ours", "n", "Δ (ours − paper)",
            "paper backbone", "our backbone", "source [tag]", "paper protocol / note"]
    data = pd.DataFrame(records, columns=["benchmark", "num_tasks", "method", "paper_method", "metric", "paper_value",
                                          "paper_std", "ours_mean", "ours_std", "n_seeds", "delta", "paper_backbone",
                                          "our_backbone", "backbone_differs", "our_preset", "ours_source", "tag",
                                          "std_tag", "source", "table", "protocol", "note", "file"])
    rows = []
    for _, row in data.iterrows():
        # pandas turns a None in a column that also holds numbers (e.g. no preset for a cost.csv row) into NaN
        r = {k: None if isinstance(v, float) and math.isnan(v) and k not in NUMERIC_REPRO else v for k, v in row.items()}
        mdig = 3 if r["metric"] == "added_params_m" else digits
        paper_txt = S.fmt_mean_std(r["paper_value"], r["paper_std"], mdig)
        if isinstance(r["std_tag"], str) and r["std_tag"] != r["tag"] and np.isfinite(r["paper_std"]):
            paper_txt += f" (± [{r['std_tag']}])"
        ours_txt = S.fmt_mean_std(r["ours_mean"], r["ours_std"], mdig)
        note = "; ".join(x for x in [("BACKBONE DIFFERS; " if r["backbone_differs"] else "") + (r["protocol"] or ""),
                                     r["note"] or "", f"ours from {r['ours_source']}" if r["ours_source"] != "runs" else "",
                                     f"our preset: {r['our_preset']}" if r["our_preset"] else ""] if x)
        rows.append(_cells([r["benchmark"], r["num_tasks"], r["method"], r["paper_method"], REFERENCE_METRICS[r["metric"]],
                            paper_txt, ours_txt, r["n_seeds"] or "—", _signed(r["delta"], mdig), r["paper_backbone"],
                            r["our_backbone"], ", ".join(x for x in (r["source"], r["table"]) if x) + f" [{r['tag']}]", note]))
    notes = ["Only reported numbers whose setting matches our runs are listed: same benchmark, task count and method "
             "(and the entry's `match` keys of our resolved config). Backbone and protocol are shown, not required.",
             "[V]: checked against a public copy of the source; [R]: recalled, unverified. Paper ± use the source's own "
             f"std convention (CODA / SMoPE code: ddof=0); ours: ddof={S.STD_DDOF}.",
             f"{len(refs)} reported numbers are on file in benchmarks/tables/references/."]
    return Table("reproduction", "Reproduction: reported vs ours", cols, rows, data, notes)


NUMERIC_REPRO = {"paper_value", "paper_std", "ours_mean", "ours_std", "delta"}


def _repro_record(ref: Reference, bench: str, method: str, mean: float, std: float, n: int, our_bb: Any,
                  preset: Any, src: str) -> Dict[str, Any]:
    return {"benchmark": bench, "num_tasks": ref.num_tasks, "method": method, "paper_method": ref.method,
            "metric": ref.metric, "paper_value": ref.value, "paper_std": math.nan if ref.std is None else ref.std,
            "ours_mean": mean, "ours_std": std, "n_seeds": n, "delta": mean - ref.value,
            "paper_backbone": ref.backbone, "our_backbone": our_bb,
            "backbone_differs": bool(ref.backbone and our_bb and str(ref.backbone) != str(our_bb)),
            "our_preset": preset, "ours_source": src, "tag": ref.tag, "std_tag": ref.std_tag, "source": ref.source,
            "table": ref.table, "protocol": ref.protocol, "note": ref.note, "file": ref.file}


def _signed(v: float, digits: int) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    return f"{0.0 if round(v, digits) == 0 else v:+.{digits}f}"  # no "-0.00"


# --- protocol differences ------------------------------------------------------------------

# settings that cannot change a run's outcome, or that identify the run rather than its protocol
IGNORED_CONFIG = {"seed", "method_name", "device", "quiet", "compile", "query_cache", "train.num_workers",
                  "train.eval_batch_size", "train.checkpoint_every_epochs", "benchmark.data_root"}
ENV_KEYS = ("torch", "timm", "precision", "hardware", "git.commit")
ENV_BACKBONE_KEYS = ("name", "tag", "source", "sha256", "num_params", "img_size")
SCENARIO_KEYS = ("num_classes", "train_sizes", "eval_sizes", "eval_split", "image_size", "source")
CROSS_METHOD_WORDS = ("batchwise", "vote")  # method.* keys compared across methods (batch-wise voting)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(",", ":"))


def order_fingerprint(order: Any) -> str:
    """Short hash of a class order, so two orders can be compared at a glance."""
    return hashlib.sha256(json.dumps(order).encode()).hexdigest()[:8]


HASH_CHARS = 12  # SHA-256 / git hashes shown shortened: unique enough to tell runs apart, narrow enough to read


def _short_hash(v: Any) -> str:
    return v[:HASH_CHARS] if isinstance(v, str) and len(v) > HASH_CHARS else _text(v)


def protocol_features(res: Dict[str, Any]) -> Dict[str, str]:
    """The settings of one run that a fair comparison must hold fixed, as dotted key -> text.

    Hashes (``env.backbone.sha256``, ``env.git.commit``) are shortened to :data:`HASH_CHARS` characters."""
    feats: Dict[str, str] = {}
    for k, v in _flatten(res.get("config") or {}).items():
        if k not in IGNORED_CONFIG:
            feats[k] = _text(v)
    env = res.get("env") or {}
    flat_env = _flatten(env)
    for k in ENV_KEYS:
        if k in flat_env:
            feats[f"env.{k}"] = _short_hash(flat_env[k]) if k == "git.commit" else _text(flat_env[k])
    for k in ENV_BACKBONE_KEYS:
        if k in (env.get("backbone") or {}):
            v = env["backbone"][k]
            feats[f"env.backbone.{k}"] = _short_hash(v) if k == "sha256" else _text(v)
    sc = res.get("scenario") or {}
    for k in SCENARIO_KEYS:
        if k in sc:
            feats[f"scenario.{k}"] = _text(sc[k])
    if "class_order" in sc:
        feats["scenario.class_order"] = f"seed {res.get('seed')}: {order_fingerprint(sc['class_order'])}"
    return feats


def protocol_diff(results_by_method: Dict[str, List[Dict[str, Any]]]) -> Tuple[List[str], Dict[str, Dict[str, str]]]:
    """Keys whose values differ between the methods, and the cell text per (key, method).

    A method's cell is the set of its runs' values joined by " / " (class orders per seed, seeds
    as a list). ``method.*`` keys are compared only between runs of the same method name (the
    hyper-parameters of different methods differ by design), except batch-wise voting keys, which
    are compared across every method that has them. A method without the key shows ``n/a``.
    """
    per_method: Dict[str, Dict[str, set]] = {}
    names: Dict[str, str] = {}
    for label, results in results_by_method.items():
        vals: Dict[str, set] = {}
        for r in results:
            for k, v in protocol_features(r).items():
                vals.setdefault(k, set()).add(v)
        vals["seeds"] = {", ".join(str(s) for s in sorted(r.get("seed") for r in results))}
        per_method[label] = vals
        names[label] = (results[0].get("method_name") or label.split("@")[0]) if results else label
    keys = sorted({k for v in per_method.values() for k in v})
    differing: List[str] = []
    cells: Dict[str, Dict[str, str]] = {}
    for k in keys:
        cell = {m: " / ".join(sorted(v[k])) if k in v else "n/a" for m, v in per_method.items()}
        if k.startswith("method.") and not any(w in k.split(".")[-1] for w in CROSS_METHOD_WORDS):
            scopes: Dict[str, List[str]] = {}
            for m in per_method:
                if k in per_method[m]:
                    scopes.setdefault(names[m], []).append(cell[m])
            differs = any(len(set(v)) > 1 for v in scopes.values())
        else:
            have = [cell[m] for m in per_method if k in per_method[m]]
            differs = len(set(have)) > 1 or (0 < len(have) < len(per_method) and not k.startswith("method."))
        if differs:
            differing.append(k)
            cells[k] = cell
    return differing, cells


def protocol_diff_table(rs: RunSet) -> Table:
    """Per benchmark, one row per setting in which the methods' runs differ (no silent apples-to-oranges)."""
    records, rows = [], []
    methods_all: List[str] = []
    for bench in rs.runs.benchmark.unique():
        labels = [m for b, m in rs.groups() if b == bench]
        by_method = {m: rs.group_results(bench, m) for m in labels}
        keys, cells = protocol_diff(by_method)
        for k in keys:
            records.append({"benchmark": bench, "key": k, **{m: cells[k][m] for m in labels}})
        methods_all += [m for m in labels if m not in methods_all]
    cols = ["benchmark", "setting"] + methods_all
    for r in records:
        rows.append(_cells([r["benchmark"], r["key"]] + [r.get(m, "") for m in methods_all]))
    data = pd.DataFrame(records, columns=["benchmark", "key"] + methods_all)
    notes = ["Settings in which the runs compared on a benchmark differ: resolved config, backbone identity (name, tag, "
             "SHA-256), precision, hardware, library versions, git commit, class order per seed (8-hex fingerprint) "
             "and the seeds. method.* keys are compared within one method name only, except batch-wise voting.",
             "Ignored (cannot change the outcome): " + ", ".join(sorted(IGNORED_CONFIG)) + "."]
    if not rows:
        notes.insert(0, "All compared runs share every recorded setting.")
    return Table("protocol_diff", "Protocol differences", cols, rows, data, notes)


# --- paired comparison ---------------------------------------------------------------------

def paired_tables(rs: RunSet, a: str, b: str, metrics: Sequence[str] = DEFAULT_METRICS, level: float = 0.95,
                  digits: int = 2) -> Tuple[Table, Table]:
    """Per-seed A − B and the summary with a two-sided t-interval, per benchmark and metric."""
    known = set(rs.runs.method)
    for m in (a, b):
        if m not in known:
            raise ReportError(f"--compare: no runs of method '{m}' under {rs.root}; methods found: {', '.join(sorted(known))}")
    seed_recs, sum_recs = [], []
    for bench in rs.runs.benchmark.unique():
        ga = rs.runs[(rs.runs.benchmark == bench) & (rs.runs.method == a)].set_index("seed")
        gb = rs.runs[(rs.runs.benchmark == bench) & (rs.runs.method == b)].set_index("seed")
        seeds = sorted(set(ga.index) & set(gb.index))
        if not seeds:
            continue
        for m in metrics:
            for s in seeds:
                seed_recs.append({"benchmark": bench, "metric": m, "seed": s, "a": ga.at[s, m], "b": gb.at[s, m],
                                  "diff": ga.at[s, m] - gb.at[s, m]})
            ci = S.paired_ci([ga.at[s, m] for s in seeds], [gb.at[s, m] for s in seeds], level)
            sum_recs.append({"benchmark": bench, "metric": m, "n": ci.n, "mean_diff": ci.mean, "sd_diff": ci.sd,
                             "t_crit": ci.t_crit, "ci_lo": ci.lo, "ci_hi": ci.hi,
                             "better": _better(ci, METRICS[m][1], a, b)})
    if not sum_recs:
        raise ReportError(f"--compare: '{a}' and '{b}' share no (benchmark, seed); run both with the same --seeds")
    per_seed = pd.DataFrame(seed_recs)
    summary = pd.DataFrame(sum_recs)
    t1 = Table(f"compare_{_safe(a)}_vs_{_safe(b)}_per_seed", f"Paired per-seed differences: {a} − {b}",
               ["benchmark", "metric", "seed", a, b, f"{a} − {b}"],
               [_cells([r.benchmark, METRICS[r.metric][0], r.seed, S.fmt_num(r.a, digits), S.fmt_num(r.b, digits),
                        _signed(r.diff, digits)]) for r in per_seed.itertuples()], per_seed)
    pct = int(round(level * 100))
    t2 = Table(f"compare_{_safe(a)}_vs_{_safe(b)}", f"Paired difference {a} − {b}: mean and {pct}% t-interval",
               ["benchmark", "metric", "n seeds", f"mean {a} − {b}", "sd", f"{pct}% CI", "verdict"],
               [_cells([r.benchmark, METRICS[r.metric][0], r.n, _signed(r.mean_diff, digits), S.fmt_num(r.sd_diff, digits),
                        "—" if not np.isfinite(r.ci_lo) else f"[{r.ci_lo:+.{digits}f}, {r.ci_hi:+.{digits}f}]", r.better])
                for r in summary.itertuples()], summary,
               [f"Differences over the seeds both methods ran (paired by seed: same class order). Interval: mean ± "
                f"t_(1+{level:g})/2, n−1 · sd/√n with the sample sd (ddof=1); with one seed no interval exists.",
                "verdict: the interval excludes 0 in the metric's better direction, or 'no clear difference'."])
    return t2, t1


def _better(ci: S.PairedCI, direction: int, a: str, b: str) -> str:
    if not np.isfinite(ci.lo):
        return "n < 2"
    if ci.lo > 0:
        return f"{a} better" if direction > 0 else f"{b} better"
    if ci.hi < 0:
        return f"{b} better" if direction > 0 else f"{a} better"
    return "no clear difference"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# --- cost table ----------------------------------------------------------------------------

# cost.csv column -> header (units stated); columns absent from the file are left out
COST_CSV_COLUMNS: Dict[str, str] = {
    "method": "method", "benchmark": "benchmark", "backbone": "backbone", "num_classes": "classes", "num_tasks": "tasks",
    "added_params": "added params", "allocated_params": "allocated params", "used_params": "used params",
    "trainable_params": "trainable params (last task)", "state_numbers": "stored state (numbers)",
    "inference_passes": "ViT passes / img (inference)", "train_passes": "ViT passes / img (train)",
    "inference_gmacs": "inference GMACs/img", "inference_gflops": "inference GFLOPs/img",
    "train_gmacs": "train GMACs/img (fwd+bwd)", "train_fwd_gmacs": "train forward GMACs/img",
    "paper_convention_gflops_inference": "inference 'GFLOPs' (paper convention)",
    "paper_convention_gflops_train": "train 'GFLOPs' (paper convention)",
    "infer_img_s": "inference img/s", "train_img_s": "train img/s", "peak_mem_mb": "peak memory (MB)",
    "batch_size": "batch", "precision": "precision", "hardware": "hardware",
}


def cost_table(cost_csv: pd.DataFrame) -> Table:
    """``cost.csv`` rendered with unit-bearing headers; missing cells show as ``—``."""
    cols = [c for c in COST_CSV_COLUMNS if c in cost_csv.columns]
    rows = []
    for _, r in cost_csv.iterrows():
        row = []
        for c in cols:
            v = r[c]
            if c == "method" and "is_baseline" in cost_csv.columns and bool(r["is_baseline"]):
                row.append(Cell(f"{v} (baseline)"))
            elif isinstance(v, (int, np.integer)) or (isinstance(v, float) and np.isfinite(v) and c.endswith("params")):
                row.append(Cell(S.fmt_count(float(v))))
            elif isinstance(v, float):
                row.append(Cell(S.fmt_num(v, 3 if "flops" in c or "macs" in c else 1)))
            else:
                row.append(Cell("—" if pd.isna(v) else str(v)))
        rows.append(row)
    notes = ["From 'bench.py cost' (cost.csv). GMACs count multiply-accumulates; GFLOPs = 2 × GMACs. Every forward "
             "pass a method needs (query / task-inference pass + prompted pass) and the attention products are counted.",
             "Paper convention: the 'GFLOPs' the SMoPE poster prints (one ViT-B/16 forward = 33.72)."]
    return Table("cost", "Cost (from bench.py cost)", [COST_CSV_COLUMNS[c] for c in cols], rows, cost_csv[cols], notes)
