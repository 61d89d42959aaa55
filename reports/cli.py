"""``bench.py report``: tables, plots and ``report.html`` from stored results (no training).

::

    python bench.py report --runs R --out O [--cost C] [--compare A B] [--metrics faa,caa,ffm,coda_f]
                           [--references DIR]

Writes under ``O``: ``report.html`` (self-contained), ``report.md`` (every table),
``tables/<name>.{md,tex,csv}``, ``plots/<name>.{png,pdf}``, and the tidy data ``runs.csv``,
``acc_long.csv`` (one row per run, step, task) and ``curves.csv``. Bad input (no runs, an unknown
method in --compare, ...) raises :class:`reports.loader.ReportError`, which the CLI prints as one
sentence with exit status 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from reports import html as H
from reports import plots as P
from reports import render as R
from reports import tables as T
from reports.loader import ReportError, RunSet, load_cost, load_runs
from reports.references import REFERENCE_DIR, load_references
from reports.stats import fmt_num

OWNED_EXTENSIONS = (".md", ".tex", ".csv", ".png", ".pdf")


@dataclass
class ReportOutput:
    """What :func:`build_report` wrote."""

    out: Path
    html: Path
    main: T.Table
    tables: Dict[str, T.Table] = field(default_factory=dict)
    table_files: Dict[str, Dict[str, Path]] = field(default_factory=dict)
    plots: Dict[str, Dict[str, Path]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def main_markdown(self) -> str:
        return R.to_markdown(self.main)


def parse_metrics(text: Optional[str | Sequence[str]]) -> List[str]:
    """``"faa,caa,ffm"`` (or a list) -> metric names, validated."""
    if not text:
        return list(T.DEFAULT_METRICS)
    items = text if not isinstance(text, str) else [text]
    names = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    for n in names:
        if n not in T.METRICS:
            raise ReportError(f"unknown metric '{n}' in --metrics; choose from {', '.join(T.METRICS)}")
    return names


def build_report(runs: str | Path, out: str | Path, cost: Optional[str | Path] = None,
                 compare: Optional[Sequence[str]] = None, metrics: Sequence[str] = T.DEFAULT_METRICS,
                 references: str | Path = REFERENCE_DIR) -> ReportOutput:
    """Load, tabulate, plot and write everything; see the module docstring for the layout."""
    t0 = time.time()
    from benchmarks.run.store import check_out_folder

    check_out_folder(out)
    rs = load_runs(runs)
    cost_frames = load_cost(cost)
    cost_csv = cost_frames.get("cost")
    refs = load_references(references)
    if compare is not None:
        if len(compare) != 2:
            raise ReportError("--compare takes exactly two method names")
        for m in compare:
            if m not in set(rs.runs.method):
                raise ReportError(f"--compare: no runs of method '{m}' under {runs}; methods found: "
                                  f"{', '.join(sorted(set(rs.runs.method)))}")
    # every table is built (and every input error raised) before anything is written
    main = T.main_table(rs, metrics, cost_csv)
    tables: Dict[str, T.Table] = {"main": main,
                                  "reproduction": T.reproduction_table(rs, refs, cost_csv),
                                  "protocol_diff": T.protocol_diff_table(rs)}
    if compare:
        summary, per_seed = T.paired_tables(rs, compare[0], compare[1], metrics)
        tables["compare"], tables["compare_per_seed"] = summary, per_seed
    if cost_csv is not None and not cost_csv.empty:
        tables["cost"] = T.cost_table(cost_csv)
    tables["runs"] = runs_table(rs, metrics)
    if rs.skipped:  # every output says how many results it does not show
        for t in tables.values():
            t.notes.append(f"{len(rs.skipped)} result file{'s' if len(rs.skipped) > 1 else ''} skipped as unreadable "
                           f"(named in report.md, report.html and skipped.csv).")
    final = Path(out)
    # everything is written into a temporary folder beside the report, then swapped in: a failure
    # (a full disk) leaves the previous report whole and no half-written file
    work = _work_folder(final)
    try:
        out = work
        tdir, pdir = out / "tables", out / "plots"
        files = {k: R.write_table(t, tdir) for k, t in tables.items()}
        rs.runs.to_csv(out / "runs.csv", index=False)
        rs.acc.to_csv(out / "acc_long.csv", index=False)
        rs.curves.to_csv(out / "curves.csv", index=False)
        if rs.skipped:
            import pandas as pd

            pd.DataFrame({"skipped": rs.skipped}).to_csv(out / "skipped.csv", index=False)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="matplotlib")  # layout chatter (tight_layout with colorbars)
            warnings.filterwarnings("ignore", module="seaborn")
            plots, captions = make_plots(rs, main, cost_frames, pdir)
        (out / "report.md").write_text(R.markdown_document("PromptCL-Bench report", list(tables.values()), _meta(rs, runs, cost)))
        (out / "report.html").write_text(_html(rs, runs, cost, tables, plots, captions, out))
        _swap_in(work, final)
    except BaseException as e:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        if _disk_full(e):
            from benchmarks.run.store import disk_full_error

            raise disk_full_error(final) from None
        raise
    moved = lambda d: {k: final / v.relative_to(work) for k, v in d.items()}  # noqa: E731
    files = {k: moved(v) for k, v in files.items()}
    plots = {k: moved(v) for k, v in plots.items()}
    return ReportOutput(final, final / "report.html", main, tables, files, plots, time.time() - t0)


def _disk_full(e: BaseException) -> bool:
    from benchmarks.run.store import is_disk_full

    seen = 0
    while e is not None and seen < 10:
        if is_disk_full(e) or "No space left" in str(e):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def _work_folder(final: Path) -> Path:
    import tempfile

    from benchmarks.run.store import disk_full_error, file_mode, is_disk_full

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        work.chmod(file_mode() | ((file_mode() & 0o444) >> 2))  # a folder's mode under the umask (mkdtemp: 0700)
        return work
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(final) from None
        raise


def _swap_in(work: Path, final: Path) -> None:
    """Replace ``final`` by ``work`` with renames (no new space needed); files of the old folder that the
    report does not own (anything but its outputs, and in tables/ and plots/ anything but
    OWNED_EXTENSIONS) are carried over."""
    import os
    import shutil

    if not final.is_dir():
        os.replace(work, final)
        return
    for child in final.iterdir():
        if child.name in ("tables", "plots") and child.is_dir():
            (work / child.name).mkdir(exist_ok=True)
            for f in child.iterdir():
                if not (f.is_file() and f.suffix in OWNED_EXTENSIONS) and not (work / child.name / f.name).exists():
                    os.replace(f, work / child.name / f.name)
        elif not (work / child.name).exists() and child.name not in ("skipped.csv",):
            os.replace(child, work / child.name)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def runs_table(rs: RunSet, metrics: Sequence[str]) -> T.Table:
    """Every run: benchmark, method, seed, metrics, wall-clock and config hash (for spotting outliers)."""
    cols = ["benchmark", "method", "seed"] + list(metrics) + ["total_seconds", "backbone", "config_hash", "run_id"]
    data = rs.runs[cols].copy()
    rows = [T._cells([r.benchmark, r.method, r.seed] + [fmt_num(getattr(r, m)) for m in metrics]
                     + [fmt_num(r.total_seconds, 1), r.backbone, r.config_hash, r.run_id]) for r in data.itertuples()]
    return T.Table("runs", "Runs", ["benchmark", "method", "seed"] + [T.METRICS[m][0] for m in metrics]
                   + ["seconds", "backbone", "config hash", "run folder"], rows, data)


def make_plots(rs: RunSet, main: T.Table, cost_frames: Dict, pdir: Path):
    """Every figure; returns ({name: {png, pdf}}, {name: caption})."""
    growth = cost_frames.get("growth")
    growth_methods = list(growth["method"].astype(str)) if growth is not None and "method" in growth.columns else []
    styles = P.method_styles(list(rs.runs.method.unique()) + growth_methods)
    plots: Dict[str, Dict[str, Path]] = {}
    captions: Dict[str, str] = {}
    cost_csv = cost_frames.get("cost")
    for bench in dict.fromkeys(b for b, _ in rs.groups()):
        sb = P._safe(bench)
        plots[f"curves_{sb}"] = P.save(P.plot_curves(rs, bench, styles), pdir, f"curves_{sb}")
        captions[f"curves_{sb}"] = f"{bench}: average accuracy on the seen tasks after each task; band: ± sample std over seeds."
        plots[f"heatmap_{sb}"] = P.save(P.plot_heatmaps(rs, bench), pdir, f"heatmap_{sb}")
        captions[f"heatmap_{sb}"] = f"{bench}: accuracy matrix A[t][j] per method, mean over seeds."
        fig = P.plot_forgetting(rs, bench, styles)
        if fig is not None:
            plots[f"forgetting_{sb}"] = P.save(fig, pdir, f"forgetting_{sb}")
            captions[f"forgetting_{sb}"] = f"{bench}: forgetting of each task after the last one (max over steps − final)."
        pts, label = pareto_points(main.data[main.data.benchmark == bench], cost_csv, rs)
        plots[f"pareto_{sb}"] = P.save(P.plot_pareto(pts, bench, styles, label), pdir, f"pareto_{sb}")
        captions[f"pareto_{sb}"] = f"{bench}: FAA vs {label} and vs added parameters; filled markers and * are Pareto-optimal."
        fig = P.plot_task_identity(rs, bench, styles)
        if fig is not None:
            plots[f"taskid_{sb}"] = P.save(fig, pdir, f"taskid_{sb}")
            captions[f"taskid_{sb}"] = (f"{bench}: FAA beside the accuracy of the inferred task identity (after the last "
                                        "task), and that accuracy per test task; only methods that infer a task.")
        for method in [m for b, m in rs.groups() if b == bench]:
            res = rs.group_results(bench, method)
            usage = P.usage_arrays(res)
            if usage:
                name = f"usage_{sb}_{P._safe(method)}"
                plots[name] = P.save(P.plot_usage(usage, bench, method, len(res)), pdir, name)
                captions[name] = f"{bench} / {method}: share of test samples of each task that selected each prompt / expert."
    fig = P.plot_growth(cost_frames.get("growth"), styles)
    if fig is not None:
        plots["growth"] = P.save(fig, pdir, "growth")
        captions["growth"] = "Added and used parameters vs the number of tasks (bench.py cost, growth.csv)."
    return plots, captions


def pareto_points(data, cost_csv, rs: RunSet):
    """(points frame, x label) for the Pareto plot of one benchmark.

    GFLOPs come from the runs' own cost block when present. Otherwise, when a cost.csv is given,
    the method's GFLOPs on cost.csv's backbone are used and the axis label says so (the FLOPs of a
    method on another backbone: a structural cost, not the runs' own).
    """
    import numpy as np
    import pandas as pd

    pts = pd.DataFrame({"method": data["method"], "faa_mean": data.get("faa_mean", np.nan), "faa_std": data.get("faa_std", np.nan),
                        "gflops": data["inference_gflops"], "params": data["added_params"],
                        "upper": data["is_upper_bound"]}).reset_index(drop=True)
    label = "inference GFLOPs / image (runs' backbone)"
    if "faa_mean" not in data:
        g = rs.runs[rs.runs.benchmark == data.benchmark.iloc[0]].groupby("method").faa
        pts["faa_mean"] = pts.method.map(g.mean())
        pts["faa_std"] = pts.method.map(g.std(ddof=1))
    if not np.isfinite(pts.gflops.astype(float)).any() and cost_csv is not None and \
            {"method", "inference_gflops"} <= set(cost_csv.columns):
        names = dict(zip(data["method"], data["method_name"]))
        lookup = dict(zip(cost_csv["method"].astype(str), pd.to_numeric(cost_csv["inference_gflops"], errors="coerce")))
        pts["gflops"] = [lookup.get(m, lookup.get(names.get(m), np.nan)) for m in pts.method]
        bb = cost_csv["backbone"].iloc[0] if "backbone" in cost_csv.columns and len(cost_csv) else "cost.csv's backbone"
        label = f"inference GFLOPs / image on {bb} (cost.csv; not the runs' backbone)"
    return pts, label


def _meta(rs: RunSet, runs, cost) -> List[str]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    benches = ", ".join(dict.fromkeys(rs.runs.benchmark))
    meta = [f"Generated {now} from {len(rs.runs)} stored results under {runs} (benchmarks: {benches}); nothing was re-run.",
            f"Cost folder: {cost}" if cost else "Cost folder: none (pass --cost with a 'bench.py cost' output folder).",
            "± is the sample standard deviation over seeds (ddof=1)."]
    if rs.skipped:
        meta.append(f"Skipped {len(rs.skipped)} unreadable result file{'s' if len(rs.skipped) > 1 else ''}: "
                    + "; ".join(rs.skipped))
    return meta


def _html(rs: RunSet, runs, cost, tables: Dict[str, T.Table], plots, captions, out: Path) -> str:
    def figs(prefix: str) -> List[str]:
        return [H.figure_html(p, captions[n], out) for n, p in plots.items() if n.startswith(prefix)]

    growth_note = [] if "growth" in plots else ["<p><em>No growth.csv: pass --cost with a 'bench.py cost' folder.</em></p>"]
    sections = [
        ("main", "Main comparison", H.table_fragments([tables["main"]])),
        ("curves", "Accuracy after each task", figs("curves_")),
        ("heatmaps", "Accuracy matrices", figs("heatmap_")),
        ("forgetting", "Forgetting per task", figs("forgetting_")),
        ("pareto", "Accuracy vs cost", figs("pareto_")),
        ("growth", "Parameters vs number of tasks", figs("growth") or growth_note),
        ("usage", "Prompt / expert usage", figs("usage_") or ["<p><em>No method recorded prompt / expert selections.</em></p>"]),
        ("taskid", "Task-identity accuracy", figs("taskid_") or ["<p><em>No method inferred a task identity.</em></p>"]),
        ("reproduction", "Reproduction", H.table_fragments([tables["reproduction"]])),
        ("protocol", "Protocol differences", H.table_fragments([tables["protocol_diff"]])),
        ("compare", "Paired comparison", H.table_fragments([tables.get("compare"), tables.get("compare_per_seed")])
         or ["<p><em>Pass --compare A B for per-seed differences of two methods with a 95% t-interval.</em></p>"]),
        ("cost", "Cost", H.table_fragments([tables.get("cost")])),
        ("runs", "Runs", H.table_fragments([tables["runs"]])),
    ]
    return H.page("PromptCL-Bench report", _meta(rs, runs, cost), sections, rs.skipped, out)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bench.py report``: build the report, print the main table and the page's path."""
    res = build_report(args.runs, args.out, getattr(args, "cost", None), getattr(args, "compare", None),
                       parse_metrics(getattr(args, "metrics", None)), getattr(args, "references", None) or REFERENCE_DIR)
    skipped = [s for s in res.tables["runs"].notes if "skipped as unreadable" in s]
    if skipped:
        import sys

        print(f"report: {skipped[0]}", file=sys.stderr, flush=True)
    if not getattr(args, "quiet_report", False):
        print(res.main_markdown)
        if "compare" in res.tables:
            print(R.to_markdown(res.tables["compare"]))
        print(f"report written in {res.seconds:.1f}s: {res.html.resolve()}")
    return 0
