"""The report's figures (matplotlib / seaborn), each saved as PNG and PDF.

Readable in grayscale: every method keeps one line style, marker, hatch and colour in every
figure (:func:`method_styles`), the colour palette is seaborn's ``colorblind`` and heatmaps use
``viridis`` (monotone lightness). Markers never hide each other: curve points are dodged
horizontally per method, line ends and scatter points carry direct labels that are spread apart
vertically (:func:`spread_labels`).

Figures (one per benchmark unless noted):

* ``curves_<bench>``: average accuracy on the seen tasks after each task, mean over seeds with a
  ± sample-std band;
* ``heatmap_<bench>``: the accuracy matrix (mean over seeds) of every method;
* ``forgetting_<bench>``: max-based forgetting of each task after the last one (bars, ± std);
* ``pareto_<bench>``: FAA against inference GFLOPs and against added parameters, Pareto front
  marked (lower cost, higher accuracy);
* ``growth``: added (and used) parameters against the number of tasks (``growth.csv``);
* ``usage_<bench>_<method>``: prompt / expert usage per test task (``selection_hist``), one panel
  per layer for per-layer pools (SMoPE), summed over heads and seeds;
* ``taskid_<bench>``: FAA beside the task-identity accuracy (``diagnostics.task_id_accuracy``) of
  every method that infers a task, and that accuracy per test task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports import stats as S  # noqa: E402
from reports.loader import RunSet  # noqa: E402

LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 2, 1, 2, 1, 2)), (0, (8, 2))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||", "OO", "///"]
DPI = 110


@dataclass
class Style:
    color: Any
    linestyle: Any
    marker: str
    hatch: str


def method_styles(methods: Sequence[str]) -> Dict[str, Style]:
    """One fixed style per method (sorted by name, so the same method looks the same everywhere)."""
    names = sorted(set(methods))
    # colorblind palette, with its light colours (yellow, sky blue) darkened so they stay visible in grayscale
    pal = [tuple(c * 0.7 for c in col) if 0.299 * col[0] + 0.587 * col[1] + 0.114 * col[2] > 0.6 else col
           for col in sns.color_palette("colorblind", max(len(names), 1))]
    return {m: Style(pal[i % len(pal)], LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)], HATCHES[i % len(HATCHES)])
            for i, m in enumerate(names)}


def spread_labels(ys: Sequence[float], min_gap: float) -> List[float]:
    """Label positions near ``ys`` (same order) with at least ``min_gap`` between neighbours."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [float(ys[i]) for i in order]
    for k in range(1, len(pos)):
        pos[k] = max(pos[k], pos[k - 1] + min_gap)
    # re-centre so the block of labels stays around the data
    shift = (np.mean([ys[i] for i in order]) - np.mean(pos)) if pos else 0.0
    out = [0.0] * len(ys)
    for k, i in enumerate(order):
        out[i] = pos[k] + shift
    return out


def place_labels(px: Sequence[float], py: Sequence[float], height: float = 11.0, width: float = 90.0) -> List[float]:
    """Label heights (display pixels) for labels drawn right of points (px, py): a label that would
    overlap an already placed one (closer than ``height`` vertically and ``width`` horizontally)
    moves up until it is free. Labels of points far apart stay at their point."""
    out = [0.0] * len(px)
    placed: List[Tuple[float, float]] = []
    for i in sorted(range(len(px)), key=lambda k: py[k]):
        y = float(py[i])
        while True:
            hits = [yj for xj, yj in placed if abs(y - yj) < height and abs(px[i] - xj) < width]
            if not hits:
                break
            y = max(hits) + height
        placed.append((float(px[i]), y))
        out[i] = y
    return out


def save(fig: plt.Figure, folder: Path, name: str) -> Dict[str, Path]:
    """``<name>.png`` and ``<name>.pdf`` under ``folder``; closes the figure."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"png": folder / f"{name}.png", "pdf": folder / f"{name}.pdf"}
    # the tight box is computed once and reused: bbox_inches="tight" would draw the figure twice per file
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.08)
    fig.savefig(paths["png"], dpi=DPI, bbox_inches=box)
    fig.savefig(paths["pdf"], bbox_inches=box)
    plt.close(fig)
    return paths


def symlog_axis(ax: plt.Axes, values: Sequence[float], axis: str = "x") -> None:
    """Symmetric-log scale with decade ticks, so that 0 (a method adding no parameters) stays on the axis."""
    pos = [float(v) for v in values if np.isfinite(v) and v > 0]
    lin = max(1.0, min(pos) / 2) if pos else 1.0
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=lin)
    if not pos:
        return
    has_zero = any(np.isfinite(v) and v <= 0 for v in values)
    decades = range(int(math.ceil(math.log10(lin))), int(math.ceil(math.log10(max(pos) * 4))))
    ticks = ([0.0] if has_zero else []) + [10.0 ** d for d in decades]
    labels = ["0" if t == 0 else f"$10^{{{int(math.log10(t))}}}$" for t in ticks]
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xlim if axis == "x" else ax.set_ylim)(-0.5 * lin if has_zero else None, max(pos) * 4)
    target.set_ticks(ticks)
    target.set_ticklabels(labels)
    target.set_minor_locator(matplotlib.ticker.NullLocator())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def _benchmarks(rs: RunSet) -> List[str]:
    return list(dict.fromkeys(b for b, _ in rs.groups()))


def _methods(rs: RunSet, bench: str) -> List[str]:
    return [m for b, m in rs.groups() if b == bench]


# --- accuracy curves -----------------------------------------------------------------------

def plot_curves(rs: RunSet, bench: str, styles: Dict[str, Style]) -> plt.Figure:
    """Average accuracy on seen tasks after each task; band = ± sample std over seeds."""
    methods = _methods(rs, bench)
    c = rs.curves[rs.curves.benchmark == bench]
    T = int(c.tasks_seen.max())
    fig, ax = plt.subplots(figsize=(6.4 + 0.15 * T, 4.2))
    dodge = min(0.25, 0.5 / max(len(methods), 1))
    ends: List[Tuple[str, float, float]] = []
    for i, m in enumerate(methods):
        g = c[c.method == m].groupby("tasks_seen").avg_acc
        mean = g.mean()
        std = g.std(ddof=S.STD_DDOF).fillna(0.0) if g.size().max() > 1 else mean * 0
        x = mean.index.to_numpy(dtype=float) + (i - (len(methods) - 1) / 2) * dodge
        st = styles[m]
        ax.plot(x, mean.values, color=st.color, linestyle=st.linestyle, marker=st.marker, markersize=5,
                markerfacecolor="white", markeredgewidth=1.3, linewidth=1.6, label=m)
        ax.fill_between(x, (mean - std).values, (mean + std).values, color=st.color, alpha=0.12, linewidth=0)
        ends.append((m, x[-1], float(mean.values[-1])))
    ylo, yhi = ax.get_ylim()
    for (m, x, _), y in zip(ends, spread_labels([e[2] for e in ends], (yhi - ylo) * 0.045)):
        ax.annotate(m, xy=(x, next(e[2] for e in ends if e[0] == m)), xytext=(x + 0.25, y), fontsize=8,
                    va="center", color="black", arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6))
    ax.set_xlim(0.5, T + 1.3 + 0.06 * T)
    ax.set_xticks(range(1, T + 1))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    n = rs.runs[rs.runs.benchmark == bench].groupby("method").size()
    ax.set_title(f"{bench}: accuracy after each task (mean ± std over {n.min()}–{n.max()} seeds)" if n.min() != n.max()
                 else f"{bench}: accuracy after each task (mean ± std over {n.min()} seed{'s' if n.min() > 1 else ''})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=min(5, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return fig


# --- heatmaps ------------------------------------------------------------------------------

def _matrix_panel(ax: plt.Axes, M: np.ndarray, vmax: float, annotate: bool, fmt: str, xlabels, ylabels) -> Any:
    """imshow of ``M`` (NaN cells blank) with optional value annotations; returns the image.

    Plain imshow + text instead of seaborn.heatmap: same picture, a fraction of the drawing time
    (reports are regenerated often and must stay fast on a 2-core CPU).
    """
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    if annotate:
        for (i, j), v in np.ndenumerate(M):
            if np.isfinite(v):
                # light text on the dark end of viridis, dark text on the light end
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6.5,
                        color="white" if v < 0.55 * vmax else "black")
    ax.set_xticks(range(M.shape[1]))
    ax.set_xticklabels(xlabels)
    ax.set_yticks(range(M.shape[0]))
    ax.set_yticklabels(ylabels)
    ax.tick_params(labelsize=7, length=2)
    for sp in ax.spines.values():
        sp.set_visible(False)
    return im


def plot_heatmaps(rs: RunSet, bench: str) -> plt.Figure:
    """Mean accuracy matrix per method (rows: after training task t; columns: evaluated task j)."""
    methods = _methods(rs, bench)
    a = rs.acc[rs.acc.benchmark == bench]
    T = int(a.step.max()) + 1
    ncol = min(3, len(methods))
    nrow = math.ceil(len(methods) / ncol)
    size = 1.3 + 0.36 * T
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol + 1.2, size * nrow + 0.5), squeeze=False)
    im = None
    for k, m in enumerate(methods):
        ax = axes[k // ncol][k % ncol]
        M = np.full((T, T), np.nan)
        for (t, j), v in a[a.method == m].groupby(["step", "task"]).acc.mean().items():
            M[t, j] = v
        im = _matrix_panel(ax, M, 100.0, T <= 12, ".0f", range(1, T + 1), range(1, T + 1))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("evaluated task j", fontsize=8)
        ax.set_ylabel("after training task t", fontsize=8)
    for k in range(len(methods), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"{bench}: accuracy matrix (mean over seeds)", fontsize=10)
    return fig


# --- forgetting bars -----------------------------------------------------------------------

def plot_forgetting(rs: RunSet, bench: str, styles: Dict[str, Style]) -> Optional[plt.Figure]:
    """Max-based forgetting of each task after the last task, grouped bars per method (± std)."""
    f = rs.forgetting[rs.forgetting.benchmark == bench] if not rs.forgetting.empty else rs.forgetting
    if f.empty:
        return None
    methods = _methods(rs, bench)
    tasks = sorted(f.task.unique())
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(methods)) * 0.35 + 3), 4.0))
    for i, m in enumerate(methods):
        g = f[f.method == m].groupby("task").forgetting
        mean = g.mean().reindex(tasks)
        std = g.std(ddof=S.STD_DDOF).reindex(tasks) if g.size().max() > 1 else None
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        st = styles[m]
        ax.bar(x, mean.values, width=width * 0.95, color=st.color, hatch=st.hatch, edgecolor="black", linewidth=0.6,
               yerr=None if std is None else std.fillna(0).values, capsize=2, error_kw={"linewidth": 0.8}, label=m)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels([str(t + 1) for t in tasks])
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting after the last task (pp)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"{bench}: forgetting per task, max over steps − final (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


# --- Pareto scatter ------------------------------------------------------------------------

def dodge_x(xs: Sequence[float], ys: Sequence[float], log: bool, y_span: float) -> List[float]:
    """Nudge points that share an x and nearly share a y sideways, so no marker hides another.

    Only the drawn position moves (by 6% of a decade in log scale, or 1.5% of the x-span); the
    direct label still names the method, and the CSV tables keep the exact values.
    """
    out = list(map(float, xs))
    finite = [x for x in out if np.isfinite(x)]
    span = (max(finite) - min(finite)) if finite else 0.0
    step = 0.015 * (span if span > 0 else (abs(finite[0]) if finite and finite[0] else 1.0))
    for i in range(len(out)):
        k = sum(1 for j in range(i) if math.isclose(xs[j], xs[i], rel_tol=1e-3, abs_tol=1e-12)
                and abs(ys[j] - ys[i]) < 0.04 * y_span)
        if k:
            out[i] = out[i] * (1.06 ** k) if log and out[i] > 0 else out[i] + k * step
    return out


def plot_pareto(points: pd.DataFrame, bench: str, styles: Dict[str, Style], gflops_label: str) -> plt.Figure:
    """FAA vs inference GFLOPs (left) and vs added parameters (right); Pareto front dashed.

    ``points``: one row per method with ``method``, ``faa_mean``, ``faa_std``, ``gflops``, ``params``
    and ``upper`` (upper bounds are drawn in grey and left out of the front).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for ax, col, label, log in ((axes[0], "gflops", gflops_label, False), (axes[1], "params", "added parameters (symlog scale)", True)):
        p = points[np.isfinite(points[col].astype(float)) & np.isfinite(points["faa_mean"].astype(float))].reset_index(drop=True)
        if p.empty:
            ax.text(0.5, 0.5, f"no {label.split(' (')[0].split(' / ')[0]} recorded for these runs", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
            continue
        upper = p.get("upper", pd.Series(False, index=p.index)).fillna(False).astype(bool)
        xs_true = p[col].astype(float).tolist()
        ys = p.faa_mean.astype(float).tolist()
        y_span = (max(ys) - min(ys)) or 1.0
        xs = dodge_x(xs_true, ys, log, y_span)
        comp = [i for i in range(len(p)) if not upper[i]]
        front = [comp[k] for k in S.pareto_front([xs_true[i] for i in comp], [ys[i] for i in comp])]
        for i, r in p.iterrows():
            st = styles[r.method]
            on_front = i in front
            color = "0.55" if upper[i] else st.color
            ax.errorbar(xs[i], ys[i], yerr=r.faa_std if np.isfinite(r.faa_std) else None, color=color,
                        marker=st.marker, markersize=8 if on_front else 6, markerfacecolor=color if on_front else "white",
                        markeredgecolor="black" if on_front else color, markeredgewidth=1.2, capsize=3, linestyle="none", zorder=3)
        if len(front) > 1:
            ax.step([xs_true[i] for i in front], [ys[i] for i in front], where="post", color="0.3", linestyle="--",
                    linewidth=1.0, zorder=2, label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
        if log:
            symlog_axis(ax, xs_true, "x")
        else:
            lo, hi = min(xs_true), max(xs_true)
            pad = 0.08 * (hi - lo) if hi > lo else 0.1 * (abs(hi) or 1.0)
            ax.set_xlim(lo - pad, hi + 3 * pad)
        pix = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
        ylab = place_labels([q[0] for q in pix], [q[1] for q in pix])
        for i, r in p.iterrows():
            # label offset in points: 8 to the right, and up to its free position
            dy_px = ylab[i] - pix[i][1]
            text = r.method + (" (upper bound)" if upper[i] else "") + (" *" if i in front else "")
            lift = 7 if i in front and len(front) > 1 else 0  # above the front's horizontal segment, not struck by it
            ax.annotate(text, xy=(xs[i], ys[i]), xytext=(8, dy_px * 72 / fig.dpi + lift), textcoords="offset points", fontsize=8,
                        va="center", arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6) if abs(dy_px) > 1 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("FAA (%)")
        ax.grid(True, alpha=0.3, which="both")
    fig.suptitle(f"{bench}: accuracy vs cost (filled and * = Pareto front: no other method is both cheaper and more accurate)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# --- parameter growth ----------------------------------------------------------------------

def plot_growth(growth: pd.DataFrame, styles: Dict[str, Style]) -> Optional[plt.Figure]:
    """Added (and used) parameters against the number of tasks, from ``growth.csv``."""
    if growth is None or growth.empty or not {"method", "num_tasks", "added_params"} <= set(growth.columns):
        return None
    where = ""
    if "benchmark" in growth.columns and growth["benchmark"].nunique() > 1:
        first = growth["benchmark"].iloc[0]  # class counts differ per benchmark: one benchmark per figure
        growth, where = growth[growth["benchmark"] == first], f", {first}"
    elif "benchmark" in growth.columns and len(growth):
        where = f", {growth['benchmark'].iloc[0]}"
    cols = [c for c in ("added_params", "used_params") if c in growth.columns and growth[c].notna().any()]
    fig, axes = plt.subplots(1, len(cols), figsize=(6.0 * len(cols), 4.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        ends = []
        groups = list(growth.groupby("method", sort=True))
        dodge = 0.12 * min(np.diff(sorted(growth.num_tasks.unique())), default=1)  # methods with equal counts stay visible
        for i, (m, g) in enumerate(groups):
            g = g.sort_values("num_tasks")
            st = styles.get(m) or method_styles([m])[m]
            x = g.num_tasks.to_numpy(dtype=float) + (i - (len(groups) - 1) / 2) * dodge / max(len(groups) - 1, 1)
            ax.plot(x, g[col], color=st.color, linestyle=st.linestyle, marker=st.marker, markerfacecolor="white",
                    markeredgewidth=1.2, label=m)
            ends.append((m, float(x[-1]), float(g[col].iloc[-1])))
        symlog_axis(ax, growth[col].astype(float).tolist(), "y")
        # direct labels spread in display space (the scale is logarithmic above the linear threshold)
        disp = [ax.transData.transform((x, y))[1] for _, x, y in ends]
        for (m, x, y), d, ly in zip(ends, disp, spread_labels(disp, 11.0)):
            ax.annotate(m, xy=(x, y), xytext=(10, (ly - d) * 72 / fig.dpi), textcoords="offset points", fontsize=8,
                        va="center", arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6))
        ax.set_xlabel("number of tasks")
        ax.set_ylabel(f"{col.replace('_', ' ')} (symlog scale)")
        ax.set_xticks(sorted(growth.num_tasks.unique()))
        ax.set_xlim(ax.get_xlim()[0], ax.get_xlim()[1] * 1.25)
        ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=min(5, len(labels)), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    bb = f", {growth['backbone'].iloc[0]}" if "backbone" in growth.columns else ""
    fig.suptitle(f"Parameters vs number of tasks (bench.py cost, growth.csv{where}{bb})", fontsize=10)
    fig.tight_layout()
    return fig


# --- prompt / expert usage -----------------------------------------------------------------

def usage_arrays(results: Sequence[Dict[str, Any]], which: str = "final") -> Optional[Dict[int, np.ndarray]]:
    """Per test task, the usage counts summed over seeds, shaped (groups, ids).

    A 1-D histogram (one pool, e.g. L2P) becomes one group; (layers, ..., ids) histograms (per-layer
    pools, e.g. SMoPE layers × heads) are summed over the middle dimensions to one group per layer.
    """
    acc: Dict[int, np.ndarray] = {}
    for r in results:
        sel = ((r.get("diagnostics") or {}).get("selection_hist") or {})
        hist = sel.get(which) or (sel.get("diagonal") if which == "final" else None)
        if not hist:
            continue
        for j, h in hist.items():
            a = np.asarray(h, dtype=float)
            if a.ndim == 0:
                continue
            a = a[None, :] if a.ndim == 1 else a.reshape(a.shape[0], -1, a.shape[-1]).sum(axis=1)
            acc[int(j)] = acc[int(j)] + a if int(j) in acc and acc[int(j)].shape == a.shape else a
    return acc or None


def plot_usage(usage: Dict[int, np.ndarray], bench: str, method: str, n_seeds: int) -> plt.Figure:
    """Heatmap per group (layer): rows = test task, columns = prompt / expert id, share of selections."""
    tasks = sorted(usage)
    groups, ids = usage[tasks[0]].shape
    ncol = min(3, groups)
    nrow = math.ceil(groups / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(3.0, 0.3 * ids + 1.4) * ncol + 1.0, (0.3 * len(tasks) + 1.3) * nrow + 0.4),
                             squeeze=False)
    shares = []
    for gi in range(groups):
        M = np.stack([usage[j][gi] for j in tasks])
        rows = M.sum(axis=1, keepdims=True)
        shares.append(np.divide(M, rows, out=np.zeros_like(M), where=rows > 0))
    vmax = max(float(max(sh.max() for sh in shares)), 1e-9)
    im = None
    for gi, share in enumerate(shares):
        ax = axes[gi // ncol][gi % ncol]
        im = _matrix_panel(ax, share, vmax, groups == 1 and ids <= 12 and len(tasks) <= 12, ".2f", range(ids),
                           [str(j + 1) for j in tasks])
        ax.set_title("prompt pool" if groups == 1 else f"layer {gi}", fontsize=9)
        ax.set_xlabel("prompt / expert id", fontsize=8)
        ax.set_ylabel("test task", fontsize=8)
    for k in range(groups, nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.subplots_adjust(wspace=0.3, hspace=0.6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of selections")
    fig.suptitle(f"{bench} / {method}: prompt / expert usage per test task after the last task "
                 f"(summed over {'heads and ' if groups > 1 else ''}{n_seeds} seed{'s' if n_seeds > 1 else ''})", fontsize=10)
    return fig


def task_identity_points(rs: RunSet, bench: str) -> List[Tuple[str, float, float, List[float]]]:
    """(method, mean FAA, mean final task-identity accuracy, per-task final accuracies averaged over
    seeds) for every method of ``bench`` whose results carry ``diagnostics.task_id_accuracy``."""
    out = []
    for method in _methods(rs, bench):
        res = rs.group_results(bench, method)
        tia = [((r.get("diagnostics") or {}).get("task_id_accuracy") or {}) for r in res]
        tia = [t for t in tia if t.get("final")]
        if not tia:
            continue
        per_task = np.mean([[t["final"][j] for j in sorted(t["final"], key=int)] for t in tia], axis=0)
        faa = float(rs.runs[(rs.runs.benchmark == bench) & (rs.runs.method == method)].faa.mean())
        out.append((method, faa, float(np.mean([t["final_mean"] for t in tia])), [float(v) for v in per_task]))
    return out


def plot_task_identity(rs: RunSet, bench: str, styles: Dict[str, Style]) -> Optional[plt.Figure]:
    """Left: FAA beside the mean task-identity accuracy per method; right: task-identity accuracy
    per test task after the last task. None when no method of ``bench`` infers a task identity."""
    pts = task_identity_points(rs, bench)
    if not pts:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = np.arange(len(pts))
    ax.bar(xs - 0.2, [p[1] for p in pts], 0.4, label="FAA", color="#4c72b0")
    ax.bar(xs + 0.2, [p[2] for p in pts], 0.4, label="task-identity accuracy", color="#dd8452")
    for x, p in zip(xs, pts):
        ax.text(x - 0.2, p[1] + 1, f"{p[1]:.1f}", ha="center", fontsize=7)
        ax.text(x + 0.2, p[2] + 1, f"{p[2]:.1f}", ha="center", fontsize=7)
    ax.set_xticks(xs, [p[0] for p in pts], rotation=20, fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("% (after the last task)")
    ax.legend(fontsize=8, loc="lower right")
    for method, _, _, per in pts:
        st = styles.get(method)
        ax2.plot(range(1, len(per) + 1), per, marker=st.marker if st else "o", color=st.color if st else None, label=method)
    ax2.set_xticks(range(1, max(len(p[3]) for p in pts) + 1))
    ax2.set_xlabel("test task")
    ax2.set_ylabel("task-identity accuracy (%)")
    ax2.set_ylim(0, 105)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{bench}: inferred task identity vs final accuracy (mean over seeds)", fontsize=10)
    fig.tight_layout()
    return fig
