"""Resume after SIGKILL and SIGTERM in the middle of a task, and NaN losses, through the CLI.

The reference is an uninterrupted run of the same config. The interrupted runs are real
``bench.py run`` subprocesses; a small wrapper script only *observes* the run (it marks when a
mid-task checkpoint exists and one more step has started, so the test knows when to send the
signal) and never changes what the run computes.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
from benchmarks.run.store import RunStore
from conftest import ROOT

RUN = ["run", "-b", "synthetic", "-m", "linear_probe", "--device", "cpu", "--quiet", "--set",
       "benchmark.num_tasks=3", "benchmark.num_classes=6", "benchmark.train_per_class=12", "benchmark.test_per_class=6",
       "backbone.pretrained=none", "train.epochs=3", "train.batch_size=8", "train.eval_batch_size=16",
       "train.checkpoint_every_epochs=1"]
# 24 training images per task, batch 8: 3 steps per epoch, 3 epochs; the synthetic quick preset's
# random crop / flip makes every step consume the RNG, so a wrong RNG restore changes the numbers.

WRAPPER = r'''
import os, sys, time
sys.path.insert(0, {root!r})
import bench
from benchmarks.run import runner
from benchmarks.run.store import RunStore
from baselines.linear_probe import LinearProbe

mode, ready = sys.argv[1], sys.argv[2]
armed, steps = [False], [0]
save = RunStore.save_checkpoint

def observed_save(self, ckpt):
    save(self, ckpt)
    pos = ckpt.get("position")
    if pos and pos["task"] == 1 and pos["epoch"] == 1 and pos["batch"] == 0:
        armed[0] = True  # the checkpoint after epoch 1 of task 2 is on disk

forward = LinearProbe.forward

def observed_forward(self, x, query=None, **kw):
    if armed[0] and self.training:
        steps[0] += 1
        if steps[0] == 2:  # second step of epoch 2 of task 2: one step past the checkpoint
            open(ready, "w").close()
            if mode == "kill":
                time.sleep(600)
            else:  # wait for the test's SIGTERM to be handled, then let the step finish
                t0 = time.time()
                while not runner.ACTIVE_STOP.requested() and time.time() - t0 < 300:
                    time.sleep(0.01)
    return forward(self, x, query, **kw)

RunStore.save_checkpoint = observed_save
LinearProbe.forward = observed_forward
sys.exit(bench.main(sys.argv[3:]))
'''


def run_dir(out: Path) -> Path:
    return out / "synthetic-3t" / "linear_probe" / "seed0"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert bench.main(RUN[:1] + ["--out", str(out)] + RUN[1:]) == 0
    return json.loads((run_dir(out) / "result.json").read_text())


def start_and_wait(tmp_path: Path, mode: str, out: Path) -> subprocess.Popen:
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(root=str(ROOT)))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(script), mode, str(ready), *RUN[:1], "--out", str(out), *RUN[1:]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.time() - t0 < 600, "the run never reached task 2"
        time.sleep(0.02)
    return proc


def resume(out: Path) -> dict:
    assert bench.main(RUN[:1] + ["--out", str(out), "--resume"] + RUN[1:]) == 0
    return json.loads((run_dir(out) / "result.json").read_text())


def test_sigkill_mid_task_then_resume_gives_the_uninterrupted_matrix(tmp_path, reference):
    out = tmp_path / "runs"
    proc = start_and_wait(tmp_path, "kill", out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    d = run_dir(out)
    store = RunStore(d)
    ckpt = store.load_checkpoint()
    # killed one step after the epoch checkpoint: task 2 (index 1) unfinished, task 1 done
    assert ckpt["task"] == 0 and (ckpt["position"]["task"], ckpt["position"]["epoch"], ckpt["position"]["batch"]) == (1, 1, 0)
    assert ckpt["acc"][0][0] is not None and ckpt["acc"][1][0] is None
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    assert ckpt["position"]["optimizer"]["state"]  # Adam moments travel with the checkpoint
    assert store.status()["status"] == "running" and not store.result_path.exists()
    assert not list(d.glob(".*.tmp"))
    resumed = resume(out)
    assert resumed["acc_matrix"] == reference["acc_matrix"]
    assert resumed["acc_seen_samples"] == reference["acc_seen_samples"]
    assert "resumed from" in (d / "log.txt").read_text()
    assert store.status()["status"] == "done"


def test_sigterm_saves_mid_epoch_exits_143_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "runs"
    proc = start_and_wait(tmp_path, "term", out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "SIGTERM received" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    store = RunStore(run_dir(out))
    st = store.status()
    assert st["status"] == "interrupted" and st["signal"] == "SIGTERM"
    pos = store.load_checkpoint()["position"]
    # the step in flight finished: 2 of the 3 batches of epoch 2 of task 2 are done
    assert (pos["task"], pos["phase"], pos["epoch"], pos["batch"]) == (1, 0, 1, 2)
    assert pos["scheduler"]["last_epoch"] == 3 + 2  # optimiser steps taken in this phase
    assert not store.result_path.exists()
    resumed = resume(out)
    assert resumed["acc_matrix"] == reference["acc_matrix"]


def test_nan_loss_stops_with_one_line_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A loss that turns NaN in task 2 (the head's weights are poisoned after task 1)."""
    from baselines.linear_probe import LinearProbe

    out = tmp_path / "runs"
    begin = LinearProbe.begin_task

    def poisoned(self, task):
        begin(self, task)
        if task.index == 1:
            with torch.no_grad():
                self.head.weight[task.class_start, 0] = float("nan")  # a class trained in task 2

    monkeypatch.setattr(LinearProbe, "begin_task", poisoned)
    code = bench.main(RUN[:1] + ["--out", str(out)] + RUN[1:])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and err.startswith("error: linear_probe: the loss became nan in task 2")
    assert "last good checkpoint is kept" in err
    store = RunStore(run_dir(out))
    st = store.status()
    assert st["status"] == "failed" and "NonFiniteLossError" in st["error"]
    ckpt = store.load_checkpoint()
    assert ckpt["task"] == 0 and ckpt["position"] is None  # the checkpoint after task 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state"].values())
    assert not store.result_path.exists()


def test_signal_between_tasks_stops_after_the_task_checkpoint(tmp_path):
    """SIGINT that arrives during a task's evaluation: the task checkpoint is written, then the
    run stops (exit 130 from the CLI), and --resume continues with the next task."""
    from benchmarks.run.runner import RunInterrupted, prepare, run_prepared
    from conftest import make_tiny_config

    cfg = make_tiny_config("ncm")
    before = signal.getsignal(signal.SIGINT)
    p = prepare(cfg)
    end = p.method.end_task

    def end_then_signal(task, ctx):
        end(task, ctx)
        if task.index == 0:
            os.kill(os.getpid(), signal.SIGINT)

    p.method.end_task = end_then_signal
    with pytest.raises(RunInterrupted) as ei:
        run_prepared(p, tmp_path, log_to_stdout=False)
    assert ei.value.exit_code == 130
    store = RunStore(tmp_path / "synthetic-3t" / "ncm" / "seed0")
    assert store.status()["status"] == "interrupted" and store.load_checkpoint()["task"] == 0
    full = run_prepared(prepare(cfg), tmp_path / "full", log_to_stdout=False)
    resumed = run_prepared(prepare(cfg), tmp_path, resume=True, log_to_stdout=False)
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert signal.getsignal(signal.SIGINT) is before  # the run's handlers are removed again


def test_sigusr2_hands_over_to_a_previous_handler_after_the_checkpoint(tmp_path):
    """The submitit path: submitit installs its checkpoint-and-requeue handler for SIGUSR2 before
    the job runs; the run must save its checkpoint first, then call that handler (which requeues
    and exits with SystemExit), leaving status 'interrupted'."""
    from baselines.linear_probe import LinearProbe
    from benchmarks.run.runner import prepare, run_prepared
    from conftest import make_tiny_config

    store = RunStore(tmp_path / "synthetic-3t" / "linear_probe" / "seed0")
    seen = []

    def requeue(signum, frame):  # stands in for submitit's SignalHandler.checkpoint_and_try_requeue
        ckpt = store.load_checkpoint()
        seen.append((signum, ckpt["position"]["task"], ckpt["position"]["batch"], store.status()["status"]))
        raise SystemExit(-1)

    cfg = make_tiny_config("linear_probe", {"train": {"epochs": 2}})
    p = prepare(cfg)
    calls = [0]
    forward = p.method.forward

    def forward_then_signal(x, query=None, **kw):
        if p.method.training and p.method.current_task.index == 1:
            calls[0] += 1
            if calls[0] == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
        return forward(x, query, **kw)

    p.method.forward = forward_then_signal
    old = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit):
            run_prepared(p, tmp_path, log_to_stdout=False)
    finally:
        assert signal.getsignal(signal.SIGUSR2) is requeue  # ours was removed again
        signal.signal(signal.SIGUSR2, old)
    # called once, after the checkpoint at the end of the step in flight (task 2, batch 1)
    assert seen == [(signal.SIGUSR2, 1, 1, "interrupted")]
    assert store.status()["signal"] == "SIGUSR2"
