r"""Continual-learning metrics from the accuracy matrix, one documented formula each.

``A`` is the T×T accuracy matrix in percent: ``A[t][j]`` is the accuracy on task j's evaluation
images after training task t (class-incremental: argmax over all seen classes, no task id);
entries with j > t are NaN. Indices are 0-based, so the last row is ``A[T-1]``.

=================  ===========================================================================
name               formula
=================  ===========================================================================
``faa``            final average accuracy  = (1/T) Σ_j A[T-1][j]
``caa``            cumulative average acc. = (1/T) Σ_t (1/(t+1)) Σ_{j≤t} A[t][j]
``ffm``            final forgetting (max-based, as the L2P / DualPrompt / HiDe-Prompt code:
                   the max includes the final step, so no task contributes a negative value)
                   = (1/(T-1)) Σ_{j<T-1} ( max_{j≤t≤T-1} A[t][j] − A[T-1][j] )
``ffm_prior``      max over the steps *before* the last one (CODA-Prompt / SMoPE repos'
                   ``summarize_fr``; can be negative under backward transfer)
                   = (1/(T-1)) Σ_{j<T-1} ( max_{j≤t≤T-2} A[t][j] − A[T-1][j] )
``coda_f``         CODA-Prompt's step-wise forgetting (``utils/calc_forgetting.py``): the mean
                   one-step drop = (1/(T-1)) Σ_{t=1}^{T-1} (1/t) Σ_{j<t} ( A[t-1][j] − A[t][j] )
``bwt``            backward transfer (Lopez-Paz & Ranzato) = (1/(T-1)) Σ_{j<T-1} ( A[T-1][j] − A[j][j] )
=================  ===========================================================================

``ffm`` and ``ffm_prior`` agree unless some task ends at its best accuracy. CODA's ``coda_f``
values (about 1.6–2 on Split CIFAR-100) are not comparable with the max-based ones (about 4–8).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def as_matrix(A: Matrix) -> np.ndarray:
    """Validate and convert to a float array; entries above the diagonal become NaN."""
    M = np.array([[np.nan if v is None else float(v) for v in row] for row in A], dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be T×T with T ≥ 1, got shape {M.shape}")
    T = M.shape[0]
    for t in range(T):
        if np.isnan(M[t, : t + 1]).any():
            raise ValueError(f"accuracy matrix row {t} has NaN at or below the diagonal")
    M[np.triu_indices(T, 1)] = np.nan
    return M


def avg_acc_curve(A: Matrix) -> List[float]:
    """Average accuracy over the seen tasks after each task: (1/(t+1)) Σ_{j≤t} A[t][j]."""
    M = as_matrix(A)
    return [float(np.mean(M[t, : t + 1])) for t in range(M.shape[0])]


def faa(A: Matrix) -> float:
    """Final average accuracy: (1/T) Σ_j A[T-1][j]."""
    return avg_acc_curve(A)[-1]


def caa(A: Matrix) -> float:
    """Cumulative average accuracy: mean over t of the average accuracy after task t."""
    return float(np.mean(avg_acc_curve(A)))


def forgetting_per_task(A: Matrix, include_final: bool = True) -> List[float]:
    """max_{j≤t≤T-1 (or T-2)} A[t][j] − A[T-1][j] for each task j < T-1."""
    M = as_matrix(A)
    T = M.shape[0]
    last = T if include_final else T - 1
    return [float(np.max(M[j:last, j]) - M[T - 1, j]) for j in range(T - 1)]


def ffm(A: Matrix) -> float:
    """Max-based final forgetting, max including the final step (L2P/DualPrompt/HiDe code)."""
    f = forgetting_per_task(A, include_final=True)
    return float(np.mean(f)) if f else math.nan


def ffm_prior(A: Matrix) -> float:
    """Max-based final forgetting, max over the steps before the final one (CODA/SMoPE repos)."""
    f = forgetting_per_task(A, include_final=False)
    return float(np.mean(f)) if f else math.nan


def coda_f(A: Matrix) -> float:
    """CODA-Prompt's forgetting: average over steps of the mean one-step accuracy drop."""
    M = as_matrix(A)
    T = M.shape[0]
    if T < 2:
        return math.nan
    steps = [float(np.mean(M[t - 1, :t] - M[t, :t])) for t in range(1, T)]
    return float(np.mean(steps))


def bwt(A: Matrix) -> float:
    """Backward transfer: (1/(T-1)) Σ_{j<T-1} (A[T-1][j] − A[j][j]); negative means forgetting."""
    M = as_matrix(A)
    T = M.shape[0]
    if T < 2:
        return math.nan
    return float(np.mean([M[T - 1, j] - M[j, j] for j in range(T - 1)]))


def summarize(A: Matrix) -> Dict[str, object]:
    """Every metric of this module, for result.json."""
    return {
        "faa": faa(A),
        "caa": caa(A),
        "ffm": ffm(A),
        "ffm_prior": ffm_prior(A),
        "coda_f": coda_f(A),
        "bwt": bwt(A),
        "avg_acc_curve": avg_acc_curve(A),
        "forgetting_per_task": forgetting_per_task(A),
    }
