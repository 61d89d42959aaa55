"""Defect 10: a full disk (writes under --out fail with ENOSPC after N bytes) is one sentence naming
the device and the file, exit 2; no half-written or empty file, no ``status: running``, no earlier
result or report changed, no contradicting config.yaml; a killed writer's temporary file is removed."""
from __future__ import annotations

import json
import os
import re
import stat

import pytest

import bench
from benchmarks.run.store import RunStore
from tests.faults.helpers import cli, half_written, one_sentence, run_args, run_dir, snapshot

FULL = re.compile(r"^error: no space left on \S+ \(mounted on \S+\) while writing (\S+); free some space and run the "
                  r"same command again \(nothing half-written was kept\)\.$")


def _status(d):
    p = d / "status.json"
    return json.loads(p.read_text())["status"] if p.exists() else None


@pytest.mark.parametrize("budget,file", [(0, "config.yaml"), (4000, "checkpoint.pt")], ids=["full", "fills-up"])
def test_a_fresh_run_on_a_full_disk(tmp_path, capsys, disk_quota, budget, file):
    out = tmp_path / "runs"
    q = disk_quota(out, budget)
    code, err, _ = cli(run_args(out), capsys)
    assert code == 2 and one_sentence(err), err
    m = FULL.match(err)
    assert m and m.group(1) == str(run_dir(out) / file), err
    d = run_dir(out)
    assert q.failures >= 1
    assert _status(d) in (None, "failed")  # never a false 'running'
    assert half_written(tmp_path) == [] and not (d / "result.json").exists()


def test_a_failed_overwrite_keeps_the_result_and_its_config(done_run, capsys, disk_quota):
    out, d = done_run
    before = snapshot(d)
    disk_quota(out, 2500)  # the new config.yaml and status fit, the first checkpoint does not
    code, err, _ = cli(run_args(out, "--overwrite", sets=("train.lr=0.5",)), capsys)
    assert code == 2 and FULL.match(err), err
    after = snapshot(d)
    for name in ("result.json", "result.json.sha256", "config.yaml", "checkpoint.pt"):
        assert after[d / name] == before[d / name], name  # the kept result and the config that made it
    RunStore(d).verify_checkpoint()  # the digest file still accepts the kept checkpoint
    assert _status(d) in (None, "failed") and half_written(d) == []


def test_a_failed_overwrite_for_another_reason_also_keeps_the_config(done_run, capsys):
    out, d = done_run
    before = snapshot(d)
    code, err, _ = cli(run_args(out, "--overwrite", sets=("train.lr=.inf",)), capsys)  # diverges in task 1
    assert code == 1 and "the loss became nan" in err
    after = snapshot(d)
    assert after[d / "config.yaml"] == before[d / "config.yaml"] and after[d / "result.json"] == before[d / "result.json"]
    assert _status(d) == "failed" and not (d / ".config.yaml.kept").exists()


def test_report_on_a_full_disk_keeps_the_previous_report_whole(tmp_path, capsys, disk_quota, monkeypatch):
    runs, rep = tmp_path / "runs", tmp_path / "report"
    assert bench.main(run_args(runs, method="ncm")) == 0
    assert bench.main(["report", "--runs", str(runs), "--out", str(rep)]) == 0
    (rep / "notes.txt").write_text("my notes\n")  # files of the user's in the report folder
    (rep / "tables" / "mine.txt").write_text("mine\n")
    capsys.readouterr()
    before = snapshot(rep)
    for budget in (0, 20_000, 200_000):
        q = disk_quota(tmp_path, budget)
        code, err, _ = cli(["report", "--runs", str(runs), "--out", str(rep)], capsys)
        assert code == 2 and one_sentence(err) and q.failures >= 1, err
        m = FULL.match(err)
        assert m and m.group(1) == str(rep), err
        assert snapshot(rep) == before  # no file deleted, truncated or emptied
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]  # no temporary folder left
        assert half_written(tmp_path) == []
    monkeypatch.undo()  # space again: the new report is swapped in, the user's files carried over
    (rep / "tables" / "stale.md").write_text("an old table\n")  # the report's own kind of file: replaced
    assert bench.main(["report", "--runs", str(runs), "--out", str(rep)]) == 0
    assert (rep / "notes.txt").read_text() == "my notes\n" and (rep / "tables" / "mine.txt").read_text() == "mine\n"
    assert not (rep / "tables" / "stale.md").exists() and (rep / "report.html").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(rep.stat().st_mode) == 0o777 & ~umask  # a folder's usual mode, not mkdtemp's 0700


def test_a_temporary_checkpoint_left_by_a_kill_is_removed_on_resume(unfinished, capsys):
    out, d = unfinished
    tmp = d / ".checkpoint.pt.k1ll3d.tmp"  # what SIGKILL during the checkpoint write leaves
    tmp.write_bytes((d / "checkpoint.pt").read_bytes()[:1000])
    code, err, _ = cli(run_args(out, "--resume"), capsys)
    assert code == 0, err
    assert not tmp.exists() and half_written(d) == [] and _status(d) == "done"
