"""Defect 1: one run folder has one writer; a killed writer's ``status: running`` is recognised as stale."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.run.store import RunStore
from tests.faults.helpers import TINY_SET, cli, one_sentence, run_args, run_dir, snapshot

ROOT = Path(__file__).resolve().parents[2]

# A real `bench.py run` in a second process that holds task 2 until the test kills it.
SLOW_WRITER = """
import sys, time, pathlib
sys.path.insert(0, {root!r})
import bench
from baselines.linear_probe import LinearProbe
begin = LinearProbe.begin_task
def held(self, task):
    if task.index == 1:
        pathlib.Path({ready!r}).write_text("ready")
        time.sleep(120)
    begin(self, task)
LinearProbe.begin_task = held
sys.exit(bench.main({args!r}))
"""


@pytest.fixture
def live_writer(tmp_path):
    out = tmp_path / "runs"
    ready = tmp_path / "ready"
    code = SLOW_WRITER.format(root=str(ROOT), ready=str(ready), args=run_args(out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 120, "the first writer did not reach task 2"
        time.sleep(0.1)
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_live_pid_and_a_killed_one_is_stale(live_writer, capsys):
    out, proc = live_writer
    d = run_dir(out)
    before = snapshot(d)
    assert json.loads((d / "status.json").read_text())["status"] == "running"

    # the same command, an --overwrite with another config, and a --resume: all refused while A lives
    for extra, sets in (((), ()), (("--overwrite",), ("train.epochs=2",)), (("--resume",), ())):
        code, err, _ = cli(run_args(out, *extra, sets=sets), capsys)
        assert code == 2 and one_sentence(err), err
        assert f"is being written by process {proc.pid} " in err and str(d) in err, err
        assert snapshot(d) == before  # not a byte changed, no log line written twice
    assert RunStore(d).writer().startswith(f"process {proc.pid} ")

    proc.send_signal(signal.SIGKILL)  # node failure: the status stays 'running'
    proc.wait()
    store = RunStore(d)
    assert store.status()["status"] == "running" and store.writer() is None and store.is_stale()

    code, err, out_text = cli(["sweep", "-b", "synthetic", "-m", "linear_probe", "--out", str(out), "--device", "cpu",
                               "--dry-run", "--set", *TINY_SET], capsys)
    assert code == 0 and "its process was killed" in out_text, out_text

    code, err, _ = cli(run_args(out, "--resume"), capsys)
    assert code == 0, err
    assert store.status()["status"] == "done" and store.status()["pid"] == os.getpid()
    log = (d / "log.txt").read_text()
    assert f"process {proc.pid} on " in log and "no longer holds the folder (it was killed)" in log
    assert log.count("task 1/3 eval") == 1  # one writer: no line written twice
