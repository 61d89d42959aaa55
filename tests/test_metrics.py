"""Golden tests of every metric on hand-made accuracy matrices, including the known traps."""
import math

import numpy as np
import pytest

from benchmarks import metrics as M

NaN = float("nan")

# 3 tasks. Row t = after training task t.
A3 = [
    [90.0, NaN, NaN],
    [80.0, 85.0, NaN],
    [70.0, 75.0, 95.0],
]


def test_faa_caa_by_hand():
    assert M.faa(A3) == pytest.approx((70 + 75 + 95) / 3)
    # CAA: mean of 90, (80+85)/2, (70+75+95)/3
    assert M.caa(A3) == pytest.approx((90 + 82.5 + 80) / 3)
    assert M.avg_acc_curve(A3) == pytest.approx([90, 82.5, 80])


def test_ffm_by_hand_and_off_by_one_trap():
    # task 0: best 90 -> final 70: 20; task 1: best 85 -> 75: 10. The last task is excluded
    # from the average (denominator T-1 = 2, not T = 3: the EvoPrompt#2 trap).
    assert M.ffm(A3) == pytest.approx((20 + 10) / 2)
    assert M.forgetting_per_task(A3) == pytest.approx([20, 10])


def test_ffm_variants_differ_only_under_backward_transfer():
    # Task 0 improves at the end: 60 -> 50 -> 65.
    A = [[60.0, NaN, NaN], [50.0, 80.0, NaN], [65.0, 70.0, 90.0]]
    # max including the final step (L2P/DualPrompt/HiDe code): task 0 contributes 65-65 = 0
    assert M.ffm(A) == pytest.approx((0 + 10) / 2)
    # max over the steps before the last one (CODA/SMoPE repos): 60-65 = -5
    assert M.ffm_prior(A) == pytest.approx((-5 + 10) / 2)
    # and on A3, where no task ends at its best, both agree
    assert M.ffm_prior(A3) == pytest.approx(M.ffm(A3))


def test_max_runs_over_all_steps_not_only_the_diagonal():
    # The max for task 0 is at step 1 (after the diagonal): 50 -> 70 -> 40.
    A = [[50.0, NaN, NaN], [70.0, 60.0, NaN], [40.0, 60.0, 80.0]]
    assert M.forgetting_per_task(A) == pytest.approx([30.0, 0.0])
    # BWT uses the diagonal instead: (40-50 + 60-60) / 2
    assert M.bwt(A) == pytest.approx(-5.0)


def test_coda_stepwise_forgetting_by_hand():
    # step 1: drop on task 0 = 90-80 = 10, mean over 1 task = 10
    # step 2: drops on tasks 0,1 = 80-70, 85-75 -> mean 10
    assert M.coda_f(A3) == pytest.approx(10.0)
    A = [[90.0, NaN, NaN], [84.0, 80.0, NaN], [81.0, 70.0, 99.0]]
    # step 1: 6 ; step 2: (3 + 10)/2 = 6.5 ; average over steps = 6.25
    assert M.coda_f(A) == pytest.approx(6.25)


def test_bwt_by_hand():
    assert M.bwt(A3) == pytest.approx(((70 - 90) + (75 - 85)) / 2)


def test_single_task_has_no_forgetting():
    A = [[77.0]]
    assert M.faa(A) == 77.0 and M.caa(A) == 77.0
    assert math.isnan(M.ffm(A)) and math.isnan(M.bwt(A)) and math.isnan(M.coda_f(A))


def test_upper_triangle_is_ignored_and_none_accepted():
    A = [[90.0, 12.0, None], [80.0, 85.0, 33.0], [70.0, 75.0, 95.0]]
    assert M.faa(A) == M.faa(A3) and M.caa(A) == M.caa(A3) and M.ffm(A) == M.ffm(A3)


def test_invalid_matrices_are_rejected():
    with pytest.raises(ValueError):
        M.faa([[1.0, 2.0]])
    with pytest.raises(ValueError):
        M.faa([[90.0, NaN], [NaN, 80.0]])  # NaN at/below the diagonal


def test_summarize_matches_individual_functions_on_random_matrix():
    rng = np.random.default_rng(0)
    T = 6
    A = np.tril(rng.uniform(0, 100, (T, T))) + np.triu(np.full((T, T), np.nan), 1)
    s = M.summarize(A.tolist())
    # independent vectorised recomputation
    last = A[T - 1]
    assert s["faa"] == pytest.approx(last.mean())
    assert s["caa"] == pytest.approx(np.mean([A[t, : t + 1].mean() for t in range(T)]))
    assert s["ffm"] == pytest.approx(np.mean([np.nanmax(A[:, j]) - last[j] for j in range(T - 1)]))
    assert s["bwt"] == pytest.approx(np.mean([last[j] - A[j, j] for j in range(T - 1)]))
