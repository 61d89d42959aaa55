"""Summary statistics over seeds, used by every table and plot of the report.

**Which standard deviation.** Everywhere in the reports "± std" is the *sample* standard
deviation over seeds (``ddof=1``, :data:`STD_DDOF`): it is the unbiased variance estimate and the
one the paired t-interval needs, so one convention serves both. The CODA-Prompt and SMoPE repos
print numpy's default *population* std (``ddof=0``; CODA ``run.py``, SMoPE ``run.py``), so their
± values are smaller than ours for the same spread by a factor sqrt((n-1)/n) (0.71 for 2 seeds,
0.89 for 5). :func:`population_std_factor` converts. With one seed no std is shown.

**Confidence interval.** The paired per-seed difference d_s = metric(A, seed s) − metric(B, seed s)
gets the two-sided 95% Student-t interval mean(d) ± t_{0.975, n−1} · sd(d)/√n, with the t quantile
from :func:`scipy.stats.t.ppf` (scipy is installed with scikit-learn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import stats as _st

STD_DDOF = 1


def clean(values: Iterable[float]) -> np.ndarray:
    """Finite values only (NaN / None dropped)."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with :data:`STD_DDOF`, n) of the finite values; std is NaN for n < 2."""
    v = clean(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=STD_DDOF)) if n > STD_DDOF else math.nan, n


def population_std_factor(n: int) -> float:
    """Multiply our sample std by this to get the ddof=0 std the CODA / SMoPE code prints."""
    return math.sqrt((n - 1) / n) if n > 1 else math.nan


@dataclass
class PairedCI:
    """Paired difference A − B over common seeds with its two-sided t-interval."""

    n: int
    mean: float
    sd: float
    t_crit: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return self.hi - self.mean


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t critical value, e.g. 12.706 for level 0.95 and 1 degree of freedom."""
    return float(_st.t.ppf(0.5 + level / 2.0, dof))


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedCI:
    """t-interval of mean(a − b) for paired samples (same seeds, same order)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        return PairedCI(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    m = float(d.mean())
    if n < 2:
        return PairedCI(1, m, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    tc = t_quantile(level, n - 1)
    half = tc * sd / math.sqrt(n)
    return PairedCI(n, m, sd, tc, m - half, m + half)


def pareto_front(cost: Sequence[float], value: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points: no other point has cost ≤ and value ≥ with one strict.

    Lower cost and higher value are better. Points with a NaN coordinate are never on the front.
    """
    pts = [(c, v, i) for i, (c, v) in enumerate(zip(cost, value)) if np.isfinite(c) and np.isfinite(v)]
    front = []
    for c, v, i in pts:
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for c2, v2, _ in pts)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: cost[i])


def fmt_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``91.23 ± 0.45``; the std is left out when it is NaN (one seed); ``—`` for a missing mean."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if std is None or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_num(v: Optional[float], digits: int = 2) -> str:
    """A number with ``digits`` decimals, ``—`` when missing."""
    if v is None or not np.isfinite(v):
        return "—"
    return f"{v:.{digits}f}"


def fmt_count(v: Optional[float]) -> str:
    """Parameter counts: ``122,980`` (exact, so they can be checked against the analytic values)."""
    if v is None or not np.isfinite(v):
        return "—"
    return f"{int(round(v)):,}"
