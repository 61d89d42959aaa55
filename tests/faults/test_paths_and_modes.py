"""Defect 4: nothing is written outside --out (tags are plain names, also in a grid; log.txt is not
written through a symlink) and every output file gets one mode: 0666 less the user's umask."""
from __future__ import annotations

import os
import stat

import pytest
import yaml

from tests.faults.helpers import TINY_SET, cli, one_sentence, run_args, run_dir


@pytest.mark.parametrize("tag", ["../../x", "a/b", "..", "/abs"])
def test_a_tag_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, capsys, tag):
    out = tmp_path / "a" / "runs"
    code, err, _ = cli(run_args(out, "--tag", tag), capsys)
    assert code == 2 and one_sentence(err), err
    assert f"tag {tag!r} is not a plain name" in err
    assert list(tmp_path.rglob("*")) == []  # nothing, inside --out or outside it


def test_a_grid_tag_that_is_a_path_is_refused_before_anything_runs(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"benchmarks": ["synthetic"], "seeds": [0], "set": TINY_SET,
                                    "methods": ["ncm", {"name": "linear_probe", "tag": "../../evil"}]}))
    out = tmp_path / "runs"
    code, err, _ = cli(["sweep", "--grid", str(grid), "--out", str(out), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and one_sentence(err) and "tag '../../evil' is not a plain name" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["grid.yaml"]


def test_log_txt_planted_as_a_symlink_is_not_written_through(tmp_path, capsys):
    out = tmp_path / "runs"
    d = run_dir(out)
    d.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (d / "log.txt").symlink_to(victim)
    code, err, _ = cli(run_args(out), capsys)
    assert code == 2 and one_sentence(err), err
    assert f"{d / 'log.txt'} is a symbolic link" in err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in d.iterdir()) == [".lock", "log.txt"]  # no config, status or checkpoint


def test_metrics_jsonl_planted_as_a_symlink_is_replaced_not_written_through(tmp_path, capsys):
    """A new run starts its own metrics.jsonl: the planted link is removed (unlink never follows a
    link), the victim is untouched, and the run's rows land in a plain file."""
    out = tmp_path / "runs"
    d = run_dir(out)
    d.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (d / "metrics.jsonl").symlink_to(victim)
    code, err, _ = cli(run_args(out), capsys)
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    m = d / "metrics.jsonl"
    assert m.is_file() and not m.is_symlink()
    # TINY_SET: 3 tasks x 1 epoch, one evaluation after each task
    events = [yaml.safe_load(line)["event"] for line in m.read_text().splitlines()]
    assert events.count("epoch") == 3


def test_an_overwritten_run_starts_a_fresh_metrics_jsonl(tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli(run_args(out), capsys)[0] == 0
    first = (run_dir(out) / "metrics.jsonl").read_text().splitlines()
    assert cli(run_args(out, "--overwrite"), capsys)[0] == 0
    again = (run_dir(out) / "metrics.jsonl").read_text().splitlines()
    assert len(again) == len(first)  # not the old rows plus the new ones


def test_every_output_file_has_the_umask_mode(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, err, _ = cli(run_args(tmp_path / "runs"), capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    d = run_dir(tmp_path / "runs")
    names = {"config.yaml", "status.json", "log.txt", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.sha256",
             "result.json", "result.json.sha256", ".lock"}
    assert {p.name for p in d.iterdir()} == names
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert modes == {n: 0o640 for n in names}, modes  # 0666 & ~0027, the same for every file
