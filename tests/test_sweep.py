"""``bench.py sweep``: expansion, validation before launch, skipping, failures, three launchers.

The slurm launcher is tested with submitit's LocalExecutor (``--submitit-backend local``): the
same job array, pickled callable and result files as on a cluster, run as local processes.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

import bench
from benchmarks.run.store import RunStore

TINY_SET = ["benchmark.num_tasks=3", "benchmark.num_classes=6", "benchmark.train_per_class=12",
            "benchmark.test_per_class=6", "backbone.pretrained=none", "train.epochs=1", "train.batch_size=8",
            "train.eval_batch_size=16"]
DIVERGE = {"name": "linear_probe", "tag": "diverge", "set": ["train.lr=.inf"]}  # NaN loss at the 2nd step


def write_grid(path: Path, **grid) -> str:
    grid.setdefault("benchmarks", ["synthetic"])
    grid.setdefault("seeds", [0])
    grid.setdefault("set", TINY_SET)
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def run_dir(out: Path, method: str, seed: int = 0) -> Path:
    return out / "synthetic-3t" / method / f"seed{seed}"


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """One in-process sweep: ncm and linear_probe succeed, linear_probe@diverge fails."""
    tmp = tmp_path_factory.mktemp("sweep")
    grid = write_grid(tmp / "grid.yaml", methods=["ncm", "linear_probe", DIVERGE])
    out = tmp / "runs"
    code = bench.main(["sweep", "--grid", grid, "--out", str(out), "--device", "cpu", "--quiet"])
    return tmp, grid, out, code


def test_local_sweep_continues_past_a_failure_and_skips_done_runs(local_sweep, capsys):
    tmp, grid, out, code = local_sweep
    assert code == 1  # one run failed
    for m in ("ncm", "linear_probe"):
        assert RunStore(run_dir(out, m)).status()["status"] == "done"
    failed = RunStore(run_dir(out, "linear_probe@diverge"))
    st = failed.status()
    assert st["status"] == "failed" and "NonFiniteLossError" in st["error"] and not failed.result_path.exists()
    before = {m: (run_dir(out, m) / "result.json").read_bytes() for m in ("ncm", "linear_probe")}
    code = bench.main(["sweep", "--grid", grid, "--out", str(out), "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "sweep: 0 done, 1 failed, 2 skipped" in printed
    assert f"skipped      {run_dir(out, 'ncm')}" in printed
    assert f"failed       {run_dir(out, 'linear_probe@diverge')}  (NonFiniteLossError: linear_probe: the loss became" in printed
    for m, data in before.items():
        assert (run_dir(out, m) / "result.json").read_bytes() == data  # skipped, not re-run


def test_cli_flags_expand_benchmarks_methods_seeds_and_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["sweep", "-b", "synthetic", "-m", "ncm,linear_probe", "--seeds", "0", "1", "--out", str(out),
            "--device", "cpu", "--quiet", "--dry-run", "--set", *TINY_SET]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    for m in ("ncm", "linear_probe"):
        for s in (0, 1):
            assert f"start        {run_dir(out, m, s)}" in printed
    assert "4 to run, 0 already done" in printed
    assert not out.exists()


def test_slurm_launcher_through_submitit_local_executor(local_sweep, tmp_path, capsys):
    _, _, local_out, _ = local_sweep
    grid = write_grid(tmp_path / "grid.yaml", methods=["linear_probe", DIVERGE])
    out = tmp_path / "runs"
    code = bench.main(["sweep", "--grid", grid, "--out", str(out), "--device", "cpu", "--quiet",
                       "--launcher", "slurm", "--submitit-backend", "local", "--time-limit", "30"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "submitted 2 job(s) (local)" in printed and "sweep: 1 done, 1 failed, 0 skipped" in printed
    done = RunStore(run_dir(out, "linear_probe"))
    assert done.status()["pid"] != os.getpid()  # ran in a submitit job process
    # the job ran the same function on the same config as the in-process launcher
    assert done.read_result()["acc_matrix"] == RunStore(run_dir(local_out, "linear_probe")).read_result()["acc_matrix"]
    assert RunStore(run_dir(out, "linear_probe@diverge")).status()["status"] == "failed"
    assert any((out / ".submitit").rglob("*_result.pkl"))


def test_local_launcher_with_two_worker_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "runs"
    code = bench.main(["sweep", "-b", "synthetic", "-m", "ncm", "--seeds", "0", "1", "--out", str(out),
                       "--device", "cpu", "--quiet", "--gpus", "2", "--set", *TINY_SET])
    printed = capsys.readouterr().out
    assert code == 0 and "sweep: 2 done, 0 failed, 0 skipped" in printed
    status = [RunStore(run_dir(out, "ncm", s)).status() for s in (0, 1)]
    pids = {st["pid"] for st in status}
    assert len(pids) == 2 and os.getpid() not in pids
    # worker slot i sees only the i-th visible GPU (ignored on this CPU-only run, but set)
    assert sorted(st["cuda_visible_devices"] for st in status) == ["0", "1"]
    # worker logs, one per run, next to the runs
    assert sorted(p.name for p in (out / ".sweep").iterdir()) == ["synthetic-3t_ncm_seed0.log", "synthetic-3t_ncm_seed1.log"]


@pytest.mark.parametrize("grid,message", [
    ({"methods": ["ncm"], "seed": [0]}, "unknown grid key 'seed'"),
    ({"methods": ["ncm", "nope"]}, "unknown method 'nope'"),
    ({"methods": ["ncm", {"name": "linear_probe", "set": ["train.lrr=1"]}]}, "unknown setting 'train.lrr'"),
    ({"methods": ["ncm", {"name": "ncm", "set": ["train.epochs=1"]}]}, "share the folder"),
    ({"methods": ["ncm"], "seeds": ["zero"]}, "grid seeds must be integers"),
    ({"methods": ["ncm"], "set": TINY_SET + ["benchmark.num_classes=7"]}, "7 classes cannot be split evenly into 3 tasks"),
])
def test_a_bad_grid_exits_2_before_anything_runs(tmp_path, capsys, grid, message):
    path = write_grid(tmp_path / "grid.yaml", **grid)
    code = bench.main(["sweep", "--grid", path, "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_done_run_with_another_config_stops_the_sweep_before_launch(local_sweep, capsys):
    """Validation covers the run folders too: nothing runs, nothing changes."""
    tmp, _, out, _ = local_sweep
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = bench.main(["sweep", "-b", "synthetic", "-m", "ncm,linear_probe", "--out", str(out), "--device", "cpu",
                       "--quiet", "--set", *TINY_SET, "train.lr=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "were made by a different method or config; use --overwrite or another --out" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_slurm_launcher_off_a_cluster_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import submitit.slurm.slurm as slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no srun, whatever this machine has
    out = tmp_path / "runs"
    code = bench.main(["sweep", "-b", "synthetic", "-m", "ncm", "--out", str(out), "--device", "cpu", "--quiet",
                       "--launcher", "slurm", "--set", *TINY_SET])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --launcher slurm needs a SLURM cluster (Could not detect \"srun\"")
    assert not out.exists()
