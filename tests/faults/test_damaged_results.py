"""Defect 7: a damaged result.json (not JSON, not matching its SHA-256, a malformed field) is named
and skipped everywhere, with a count in every output; run and --resume refuse it in one sentence."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import bench
from tests.faults.helpers import TINY_SET, cli, one_sentence, run_args, run_dir, snapshot


def _truncate(p):
    p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize("damage", ["truncated", "edited"])
@pytest.mark.parametrize("extra", [(), ("--resume",)], ids=["run", "resume"])
def test_run_and_resume_refuse_a_damaged_result_naming_it(done_run, capsys, damage, extra):
    out, d = done_run
    res = d / "result.json"
    if damage == "truncated":
        _truncate(res)
        why = "is damaged (not valid JSON"
    else:  # still valid JSON, one number changed: only the digest tells
        res.write_text(res.read_text().replace('"seed": 0', '"seed": 1'))
        why = "is damaged: its SHA-256 does not match result.json.sha256"
    before = snapshot(out)
    code, err, _ = cli(run_args(out, *extra), capsys)
    assert code == 2 and one_sentence(err), err
    assert err.startswith(f"error: {res} {why}") and err.endswith("; remove it or pass --overwrite to run again."), err
    assert snapshot(out) == before


def test_a_damaged_result_in_a_later_run_stops_the_command_before_the_first_run(done_run, capsys):
    out, d = done_run
    _truncate(d / "result.json")
    before = snapshot(out)
    code, err, _ = cli(["run", "-b", "synthetic", "-m", "ncm,linear_probe", "--out", str(out), "--device", "cpu",
                        "--quiet", "--set", *TINY_SET], capsys)
    assert code == 2 and one_sentence(err) and f"{d / 'result.json'} is damaged (not valid JSON" in err, err
    assert snapshot(out) == before and not run_dir(out, "ncm").exists()  # ncm (first) did not run


def test_sweep_dry_run_names_and_counts_a_damaged_result(done_run, capsys):
    out, d = done_run
    assert bench.main(run_args(out, method="ncm")) == 0
    _truncate(d / "result.json")
    capsys.readouterr()
    before = snapshot(out)
    code, err, stdout = cli(["sweep", "-b", "synthetic", "-m", "linear_probe,ncm", "--out", str(out), "--device", "cpu",
                             "--dry-run", "--set", *TINY_SET], capsys)
    assert code == 1
    assert err == "sweep: 1 damaged result.json skipped (named below); remove them or pass --overwrite"
    lines = stdout.splitlines()
    assert lines[0].startswith(f"  damaged      {d}  ({d / 'result.json'} is damaged (not valid JSON")
    assert lines[1] == f"  skip (done)  {run_dir(out, 'ncm')}"
    assert lines[2] == "sweep (dry run): 0 to run, 1 already done, 1 damaged"
    assert snapshot(out) == before


@pytest.mark.filterwarnings("ignore:skipped unreadable result")
def test_report_skips_names_and_counts_damaged_results_everywhere(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        assert bench.main(run_args(runs, "--seeds", str(seed), method="ncm")) == 0
    assert bench.main(run_args(runs, method="linear_probe")) == 0
    good = json.loads((run_dir(runs, "ncm", 0) / "result.json").read_text())

    def plant(name: str, res) -> None:
        d = runs / "planted" / name
        d.mkdir(parents=True)
        (d / "result.json").write_text(res if isinstance(res, str) else json.dumps(res))

    plant("not_json", "{\"acc_matrix\": [[50.0")
    plant("seed_zero", {**good, "seed": "zero"})
    plant("metric_text", {**good, "seed": 7, "metrics": {**good["metrics"], "faa": "high"}})
    old = {k: v for k, v in good.items() if k != "is_baseline"}  # written before results carried is_baseline
    plant("old_ncm", {**old, "seed": 5})
    plant("old_unknown", {**old, "seed": 6, "method": "gone", "method_name": "gone",
                          "config": {**good["config"], "method_name": "gone"}})
    edited = run_dir(runs, "ncm", 1) / "result.json"  # valid JSON, but no longer what was written
    edited.write_text(edited.read_text().replace('"faa": ', '"faa": 1', 1))
    capsys.readouterr()

    out = tmp_path / "report"
    code = bench.main(["report", "--runs", str(runs), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0
    bad = {"not_json": "is damaged (not valid JSON", "seed_zero": "field 'seed' is 'zero', not an integer",
           "metric_text": "field 'metrics.faa' is 'high', not a number",
           "old_unknown": "field 'is_baseline' is missing and method 'gone' is not registered"}
    note = "5 result files skipped as unreadable (named in report.md, report.html and skipped.csv)."
    assert f"report: {note}" in err
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    skipped = pd.read_csv(out / "skipped.csv")["skipped"].tolist()
    assert len(skipped) == 5 and any(str(edited) in s and "SHA-256 does not match" in s for s in skipped)
    for name, why in bad.items():
        path = str(runs / "planted" / name / "result.json")
        assert any(s.startswith(path) and why in s for s in skipped), (name, skipped)
        assert path in md and path in html
    assert "Skipped 5 unreadable result files" in md
    for f in (out / "tables").glob("*.md"):
        assert note in f.read_text(), f.name
    for f in (out / "tables").glob("*.tex"):
        assert "5 result files skipped as unreadable" in f.read_text(), f.name
    runs_csv = pd.read_csv(out / "runs.csv")
    ncm = runs_csv[runs_csv.method == "ncm"]
    assert sorted(ncm.seed) == [0, 5] and ncm.is_baseline.all()  # the old result is still a baseline
    assert len(runs_csv) == 3  # ncm seeds 0 and 5, linear_probe seed 0
