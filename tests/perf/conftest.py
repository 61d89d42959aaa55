"""The perf suite runs only when asked for: ``pytest tests/perf --benchmark-only`` (``make perf``).

pytest.ini puts ``--benchmark-disable`` in ``addopts`` so that the default ``pytest -q`` never
times anything; here ``--benchmark-only`` (or ``--benchmark-enable``) switches benchmarking back
on, and without either of them the files of this folder are not even collected, so the default
run builds no ViT-B/16 and pays nothing for this folder.
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

FIGURES: List[Dict[str, Any]] = []  # filled by the benchmarks, printed in the terminal summary


def perf_requested(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


DEFAULT_TIMER = "time.perf_counter"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own configure, which refuses --benchmark-only together with
    # the --benchmark-disable of addopts.
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True
    config.addinivalue_line("markers", "perf_cuda: ViT-B/16 benchmark on a CUDA GPU (not collected without one)")
    config.addinivalue_line("markers", "perf_compile: torch.compile benchmark (collected with PROMPTCL_PERF_COMPILE=1)")
    # On CPU the suite runs single-threaded (test_perf.py) and times the process's CPU seconds:
    # on a shared machine wall-clock mostly measures how long other processes held the cores.
    # On CUDA, or with an explicit --benchmark-timer, the timer is left alone.
    if perf_requested(config) and not cuda_present() and str(config.option.benchmark_timer) == DEFAULT_TIMER:
        config.option.benchmark_timer = "time.process_time"


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


DESELECTED: List[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Benchmarks that need hardware or time this run does not have are not collected (rather than
    collected and skipped): GPU benchmarks without CUDA, compile benchmarks without
    ``PROMPTCL_PERF_COMPILE=1``. The terminal summary names what was left out and why."""
    import os

    import torch

    reasons = {"perf_cuda": None if torch.cuda.is_available() else "no CUDA device",
               "perf_compile": None if os.environ.get("PROMPTCL_PERF_COMPILE") == "1" else "PROMPTCL_PERF_COMPILE=1 not set"}
    keep, drop = [], []
    for item in items:
        why = next((r for m, r in reasons.items() if r and item.get_closest_marker(m)), None)
        (drop if why else keep).append(item)
        if why:
            DESELECTED.append(f"{item.name}: {why}")
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_ignore_collect(collection_path, config: pytest.Config):
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_") and not perf_requested(config):
        return True
    return None


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    tr = terminalreporter
    if DESELECTED:
        tr.section("PromptCL-Bench perf: not collected")
        for line in DESELECTED:
            tr.write_line(line)
    if not FIGURES:
        return

    timer = str(config.option.benchmark_timer)
    clock = "process CPU time" if timer.endswith("process_time") else "wall-clock"
    tr.section(f"PromptCL-Bench perf figures (median over rounds, {clock})")
    keys = ["bench", "method", "backbone", "device", "precision", "batch", "img_s", "note"]
    rows = [[str(f.get(k, "")) if not isinstance(f.get(k), float) else f"{f[k]:.1f}" for k in keys] for f in FIGURES]
    widths = [max(len(k), *(len(r[i]) for r in rows)) for i, k in enumerate(keys)]
    tr.write_line("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        tr.write_line("  ".join(v.ljust(w) for v, w in zip(r, widths)))
