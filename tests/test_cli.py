"""The command line: list, run (complete result.json), bad input -> exit 2 with nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench
from conftest import ROOT, TINY

TINY_SET = [
    "benchmark.num_tasks=3", "benchmark.num_classes=6", "benchmark.train_per_class=12", "benchmark.test_per_class=6",
    "backbone.pretrained=none", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16",
]


def run_cli(args, capsys):
    code = bench.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_names_every_registered_method_and_benchmark(capsys):
    from methods.registry import list_methods
    from benchmarks.data.datasets import list_datasets

    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for name in list_methods() + list_datasets() + ["quick", "paper"]:
        assert f"  {name}" in out


def test_run_writes_complete_results_for_the_baselines(tmp_path, capsys):
    code, out, _ = run_cli(["run", "-b", "synthetic", "-m", "linear_probe,ncm,finetune,joint", "--out", str(tmp_path),
                            "--device", "cpu", "--quiet", "--set", *TINY_SET], capsys)
    assert code == 0
    for m in ("linear_probe", "ncm", "finetune", "joint"):
        d = tmp_path / "synthetic-3t" / m / "seed0"
        r = json.loads((d / "result.json").read_text())
        A = r["acc_matrix"]
        assert len(A) == 3 and all(len(row) == 3 for row in A)
        for t in range(3):
            assert all(0 <= A[t][j] <= 100 for j in range(t + 1))
            assert all(A[t][j] is None for j in range(t + 1, 3))
        # metrics recomputed independently from the stored matrix
        last = A[2]
        assert r["metrics"]["faa"] == pytest.approx(np.mean(last))
        assert r["metrics"]["caa"] == pytest.approx(np.mean([np.mean(A[t][: t + 1]) for t in range(3)]))
        assert r["metrics"]["ffm"] == pytest.approx(np.mean([max(A[t][j] for t in range(j, 3)) - last[j] for j in range(2)]))
        for key in ("config", "env", "cost", "scenario", "config_hash"):
            assert key in r
        assert r["env"]["backbone"]["name"] == "vit_micro_patch8_32" and r["env"]["torch"]
        assert r["config"]["method_name"] == m and r["method"] == m
        assert json.loads((d / "status.json").read_text())["status"] == "done"
        assert (d / "config.yaml").exists() and (d / "checkpoint.pt").exists() and (d / "log.txt").exists()
        assert not list(d.glob(".*.tmp"))
        assert f"{m}" in out


def test_second_run_is_skipped_and_different_config_is_refused(tmp_path, capsys):
    args = ["run", "-b", "synthetic", "-m", "ncm", "--out", str(tmp_path), "--device", "cpu", "--quiet", "--set", *TINY_SET]
    assert run_cli(args, capsys)[0] == 0
    path = tmp_path / "synthetic-3t" / "ncm" / "seed0" / "result.json"
    first = path.read_text()
    assert run_cli(args, capsys)[0] == 0
    assert path.read_text() == first
    code, _, err = run_cli(args[:-1] + ["train.eval_mask=none"], capsys)
    assert code == 2 and "holds a result with a different config" in err
    assert path.read_text() == first


@pytest.mark.parametrize("args,message", [
    (["-m", "nope"], "unknown method 'nope'; registered methods:"),
    (["-m", "ncm", "-b", "mnist"], "unknown benchmark 'mnist'"),
    (["-m", "ncm", "--set", "train.lrr=1"], "unknown setting 'train.lrr'"),
    (["-m", "ncm", "--set", "train.epochs=two"], "train.epochs expects an integer"),
    (["-m", "ncm", "--set", "benchmark.num_classes=7"], "7 classes cannot be split evenly into 3 tasks"),
    (["-m", "ncm", "--preset", "fast"], "unknown preset 'fast'"),
    (["-m", "ncm", "--backbone", "resnet50"], "unknown backbone 'resnet50'"),
    # TINY_SET's backbone.pretrained=none would ignore --checkpoint; 'file' is what --checkpoint implies
    (["-m", "ncm", "--checkpoint", "/nonexistent/ckpt.pth", "--set", "backbone.pretrained=file"], "checkpoint file not found"),
])
def test_bad_input_exits_2_with_one_sentence_and_no_run_dir(tmp_path, capsys, args, message):
    base = ["run", "-b", "synthetic", "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet", "--set", *TINY_SET]
    argv = base[:3] + args + base[3:] if "-b" not in args else ["run"] + args + base[3:]
    # keep --set items last so that a second --set in args extends the list
    if "--set" in args:
        i = argv.index("--set")
        extra = argv[i + 1]
        argv = [a for k, a in enumerate(argv) if k not in (i, i + 1)] + [extra]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert err.strip().startswith("error: ") and err.strip().count("\n") == 0
    assert not (tmp_path / "runs").exists()


def test_cli_subprocess_exit_status():
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "run", "-b", "synthetic", "-m", "nope"], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 2 and "unknown method 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_methods_is_an_alias_of_method_for_run_cost_and_sweep():
    """Issue 16's command line: `bench.py run --methods ovor,norga` means `-m ovor,norga`."""
    parser = bench.build_parser()
    for cmd in (["run", "-b", "synthetic"], ["cost", "-b", "synthetic"]):
        a = parser.parse_args(cmd + ["--methods", "ovor,norga"])
        b = parser.parse_args(cmd + ["-m", "ovor,norga"])
        assert a.method == b.method == ["ovor,norga"]
        assert bench.expand_methods(bench.split_names(a.method)) == ["ovor", "norga"]
