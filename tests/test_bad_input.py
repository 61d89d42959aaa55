"""Bad input: one clear sentence, exit status 2, nothing written (or nothing changed).

Unknown method / benchmark / preset / backbone names, unknown ``--set`` keys, wrong types, a class
count the task count does not divide and a missing backbone checkpoint file are covered in
tests/test_cli.py; bad sweep grids in tests/test_sweep.py; a batch size the process count does not
divide in tests/test_ddp.py. This file holds the rest: top-K larger than the pool, missing data,
and run folders whose state does not fit the command (incompatible, unreadable or unfinished
checkpoints).
"""
import dataclasses
import shutil
from pathlib import Path

import pytest

import bench
from conftest import run_stopped_at_task_3
from methods.registry import get_method_class, list_methods

TINY_SET = ["benchmark.num_tasks=3", "benchmark.num_classes=6", "benchmark.train_per_class=12",
            "benchmark.test_per_class=6", "backbone.pretrained=none", "train.epochs=1", "train.batch_size=8",
            "train.eval_batch_size=16"]

# (settings with top-K > pool, the keys the message must name) per method with a top-K choice.
TOP_K = {
    "l2p": (["method.pool_size=4", "method.top_k=5"], ("method.top_k", "method.pool_size")),
    "dualprompt": (["method.pool_size=4", "method.top_k=5"], ("method.top_k", "method.pool_size")),
    "smope": (["method.num_experts=4", "method.topk=5"], ("method.topk", "method.num_experts")),
}


def run_cli(args, capsys):
    code = bench.main(args)
    return code, capsys.readouterr().err.strip()


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_every_registered_method_with_a_top_k_setting_is_checked_here():
    for name in list_methods():
        fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
        if fields & {"top_k", "topk", "e_top_k", "g_top_k"}:
            assert name in TOP_K, f"add {name} to TOP_K"


@pytest.mark.parametrize("method", [m for m in TOP_K if m in list_methods()])
def test_top_k_larger_than_the_pool_is_refused(tmp_path, capsys, method):
    settings, keys = TOP_K[method]
    code, err = run_cli(["run", "-b", "synthetic", "-m", method, "--out", str(tmp_path / "runs"), "--device", "cpu",
                         "--quiet", "--set", *TINY_SET, *settings], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert all(k in err for k in keys), err
    assert not (tmp_path / "runs").exists()


def test_hide_prompt_pool_smaller_than_the_tasks_is_refused_before_writing(tmp_path, capsys):
    code, err = run_cli(["run", "-b", "synthetic", "-m", "hide_prompt", "--out", str(tmp_path / "runs"), "--device", "cpu",
                         "--quiet", "--set", *TINY_SET, "method.pool_size=2"], capsys)
    assert code == 2 and err == "error: method.pool_size=2 is smaller than the 3 tasks; HiDe-Prompt needs one prompt per task."
    assert not (tmp_path / "runs").exists()


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")  # no download attempt: the folder is simply empty
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["run", "-b", "cifar100", "-m", "ncm", "--data-root", str(tmp_path / "empty"),
                         "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet", "--set", "backbone.pretrained=none"],
                        capsys)
    assert code == 2 and err.startswith("error: CIFAR-100 not found") and "\n" not in err
    assert str(tmp_path / "empty") in err
    assert not (tmp_path / "runs").exists()


def test_wrong_type_of_a_method_setting(tmp_path, capsys):
    code, err = run_cli(["run", "-b", "synthetic", "-m", "finetune", "--out", str(tmp_path / "runs"), "--device", "cpu",
                         "--quiet", "--set", *TINY_SET, "method.head_lr_mult=fast"], capsys)
    assert code == 2 and "method.head_lr_mult expects a number, got 'fast'" in err
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def unfinished(tmp_path, monkeypatch, capsys):
    """A linear_probe run stopped (Ctrl-C) at the start of task 3: checkpoint after task 2, no result."""
    out = tmp_path / "runs"
    assert run_stopped_at_task_3(monkeypatch, ["run", "-b", "synthetic", "-m", "linear_probe", "--out", str(out),
                                               "--device", "cpu", "--quiet", "--set", *TINY_SET]) == 130
    capsys.readouterr()
    d = out / "synthetic-3t" / "linear_probe" / "seed0"
    assert (d / "checkpoint.pt").exists() and not (d / "result.json").exists()
    return out, d


def _run(out, *extra, method="linear_probe", sets=()):
    return ["run", "-b", "synthetic", "-m", method, "--out", str(out), "--device", "cpu", "--quiet", *extra,
            "--set", *TINY_SET, *sets]


@pytest.mark.parametrize("case,message", [
    ("other config", "was made by a different method or config; remove it or drop --resume"),
    ("other method", "was made by a different method or config; remove it or drop --resume"),
    ("truncated", "checkpoint.pt is unreadable"),
    ("no --resume", "holds the checkpoint of an unfinished run; pass --resume to continue it or --overwrite"),
])
def test_run_folder_state_that_does_not_fit_the_command(unfinished, capsys, case, message):
    out, d = unfinished
    args = _run(out, "--resume")
    if case == "other config":
        args = _run(out, "--resume", sets=["train.lr=0.5"])
    elif case == "other method":  # an ncm checkpoint where the linear_probe one was
        assert bench.main(_run(out / "ncm", method="ncm")) == 0
        shutil.copy(out / "ncm" / "synthetic-3t" / "ncm" / "seed0" / "checkpoint.pt", d / "checkpoint.pt")
    elif case == "truncated":
        data = (d / "checkpoint.pt").read_bytes()
        (d / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif case == "no --resume":
        args = _run(out)
    before = snapshot(d)
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err and err.startswith("error: ") and "\n" not in err, err
    assert snapshot(d) == before  # not a byte changed


def test_resume_without_a_checkpoint_starts_and_resume_of_a_done_run_skips(tmp_path, capsys):
    out = tmp_path / "runs"
    assert bench.main(_run(out, "--resume", method="ncm")) == 0  # nothing to resume: a fresh run
    d = out / "synthetic-3t" / "ncm" / "seed0"
    before = snapshot(d)
    assert bench.main(_run(out, "--resume", method="ncm")) == 0
    assert snapshot(d) == before  # done with the same config: skipped, not a byte changed
