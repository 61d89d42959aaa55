"""Fixtures of the fault suite (the helpers they use are in tests/faults/helpers.py)."""
from __future__ import annotations

import pytest

import bench
from conftest import run_stopped_at_task_3
from tests.faults.helpers import DiskQuota, run_args, run_dir


@pytest.fixture
def disk_quota(monkeypatch):
    return lambda root, budget: DiskQuota(monkeypatch, root, budget)


@pytest.fixture
def unfinished(tmp_path, monkeypatch, capsys):
    """A linear_probe run stopped (Ctrl-C) at the start of task 3: checkpoint after task 2, no result."""
    out = tmp_path / "runs"
    assert run_stopped_at_task_3(monkeypatch, run_args(out)) == 130
    capsys.readouterr()
    d = run_dir(out)
    assert (d / "checkpoint.pt").exists() and not (d / "result.json").exists()
    return out, d


@pytest.fixture
def done_run(tmp_path, capsys):
    """A finished linear_probe run: (out, run folder)."""
    out = tmp_path / "runs"
    assert bench.main(run_args(out)) == 0
    capsys.readouterr()
    return out, run_dir(out)
