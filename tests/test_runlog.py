"""What a run reports while it trains: metrics.jsonl, rounded log lines, TensorBoard, throughput."""
from __future__ import annotations

import json
import math
import re

import pytest

import bench
from benchmarks.tools import demo
from conftest import TINY
from test_cli import TINY_SET


def test_sig4_rounds_to_four_significant_digits():
    from benchmarks.run.runlog import sig4

    assert sig4(0.16035379469394684) == "0.1604"
    assert sig4(95.254) == "95.25" and sig4(100.0) == "100" and sig4(3.0) == "3"
    assert sig4(0.000123456) == "0.0001235" and sig4(None) == "n/a"


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = bench.main(["run", "-b", "synthetic", "-m", "finetune", "--out", str(out), "--device", "cpu", "--quiet",
                       "--set", *TINY_SET, "train.epochs=2"])
    assert code == 0
    return out / "synthetic-3t" / "finetune" / "seed0"


def test_metrics_file_has_one_row_per_epoch_and_per_evaluation(tiny_run_dir):
    rows = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((tiny_run_dir / "result.json").read_text())
    epochs = [r for r in rows if r["event"] == "epoch"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(rows) == len(epochs) + len(evals)
    # 3 tasks x 2 epochs; 2 classes x 12 images per task in batches of 8 -> 3 steps per epoch
    assert [(r["task"], r["epoch"], r["epochs"]) for r in epochs] == [(t, e, 2) for t in (1, 2, 3) for e in (1, 2)]
    assert all(r["steps"] == 3 and r["phase"] == "train" for r in epochs)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["epoch_seconds"] >= 0 for r in epochs)
    assert all(r["lr"] == pytest.approx(result["config"]["train"]["lr"]) for r in epochs)  # constant schedule (quick)
    A = result["acc_matrix"]
    assert [r["task"] for r in evals] == [1, 2, 3]
    for r in evals:
        t = r["task"] - 1
        assert r["acc"] == pytest.approx(A[t][: t + 1])
        assert r["avg_acc"] == pytest.approx(sum(A[t][: t + 1]) / (t + 1))
        assert r["acc_seen_samples"] == pytest.approx(result["acc_seen_samples"][t])
    elapsed = [r["elapsed_seconds"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def _significant_digits(number: str) -> int:
    digits = number.replace(".", "").replace("-", "").lstrip("0")
    return len(digits.rstrip("0")) if "." not in number else len(digits)


def test_log_lines_carry_elapsed_time_task_epoch_and_rounded_numbers(tiny_run_dir):
    lines = (tiny_run_dir / "log.txt").read_text().splitlines()
    epoch_re = re.compile(r"^\S+ \[\s*\d+\.\ds\] task (\d)/3 train epoch (\d)/2: loss (\S+) \(last step (\S+)\), "
                          r"lr (\S+), 3 steps, \d+\.\ds$")
    eval_re = re.compile(r"^\S+ \[\s*\d+\.\ds\] task (\d)/3 eval: acc ([\d. ]+) \| avg (\S+)$")
    ep = [m for m in map(epoch_re.match, lines) if m]
    ev = [m for m in map(eval_re.match, lines) if m]
    assert [(m.group(1), m.group(2)) for m in ep] == [(str(t), str(e)) for t in (1, 2, 3) for e in (1, 2)]
    assert [m.group(1) for m in ev] == ["1", "2", "3"]
    numbers = [m.group(k) for m in ep for k in (3, 4, 5)] + [v for m in ev for v in m.group(2).split() + [m.group(3)]]
    assert numbers and all(_significant_digits(n) <= 4 for n in numbers)
    rows = [json.loads(x) for x in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]  # the log shows the file's number, rounded
    assert float(ep[0].group(3)) == pytest.approx(first["loss"], rel=5e-4)
    # the per-phase summary line rounds too
    summary = [ln for ln in lines if "phase train:" in ln]
    assert len(summary) == 3 and all(_significant_digits(ln.split("loss ")[1].split(",")[0]) <= 4 for ln in summary)


def test_result_records_measured_throughput_with_device_and_precision(tiny_run_dir):
    cost = json.loads((tiny_run_dir / "result.json").read_text())["cost"]
    assert cost["infer_img_s"] > 0 and cost["train_img_s"] > 0
    tp = cost["throughput"]
    assert tp["precision"] == "fp32" and tp["batch_size"] == 8 and "logical cores" in tp["device"]


def test_tensorboard_missing_is_one_sentence_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import sys

    from benchmarks.run.runlog import TENSORBOARD_MISSING

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # "import" raises ImportError
    code = bench.main(["run", "-b", "synthetic", "-m", "finetune", "--out", str(tmp_path), "--device", "cpu", "--quiet",
                       "--tensorboard", "--set", *TINY_SET])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {TENSORBOARD_MISSING}."
    assert err.count("\n") == 1 and not any(tmp_path.iterdir())


def test_tensorboard_writer_receives_the_epoch_and_eval_scalars(tmp_path):
    from benchmarks.run.runlog import RunMetrics
    from methods.base import Task

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir, self.scalars, self.closed = log_dir, [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    lines = []
    m = RunMetrics(tmp_path, lines.append, tensorboard=True, writer_class=FakeWriter)
    w = m.writer
    task = Task(1, 3, 2, 4, [0, 2, 4, 6])
    m.epoch(task, "train", 0, 2, loss=0.5, last_loss=0.4, steps=3, lr=0.01, seconds=1.0)
    m.epoch(task, "train", 1, 2, loss=0.25, last_loss=0.2, steps=3, lr=0.01, seconds=1.0)
    m.evaluation(1, 3, [80.0, 60.0], seen_samples=70.0)
    m.close()
    assert w.log_dir == str(tmp_path / "tensorboard") and w.closed
    assert w.scalars == [("train/loss", 0.5, 1), ("train/lr", 0.01, 1), ("train/loss", 0.25, 2), ("train/lr", 0.01, 2),
                         ("eval/avg_acc", 70.0, 2), ("eval/acc_task1", 80.0, 2), ("eval/acc_task2", 60.0, 2)]
    assert lines[-1] == "task 2/3 eval: acc 80 60 | avg 70"


def test_demo_says_which_benchmark_and_why(tmp_path, monkeypatch):
    import benchmarks.data.datasets as D
    from test_pretrain_in_domain import _fake_fashion

    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    bench_name, why = demo.demo_benchmark("auto", str(tmp_path / "empty"))
    assert bench_name == "synthetic"
    assert "apt-get install dataset-fashion-mnist" in why and "PROMPTCL_OFFLINE" in why and why.count(". ") == 0
    with pytest.raises(bench.UsageError, match="apt-get install dataset-fashion-mnist"):
        demo.demo_benchmark("fashion_mnist", str(tmp_path / "empty"))
    root = _fake_fashion(tmp_path / "fm")
    assert demo.demo_benchmark("auto", str(root)) == ("fashion_mnist", f"Fashion-MNIST, because its files are in {root}")
    assert demo.demo_benchmark("synthetic", str(root))[0] == "synthetic"


def test_demo_summary_checks_each_prompt_method_against_finetune_and_joint(tmp_path):
    from methods.registry import list_methods

    faa = {"finetune": (20.0, 30.0), "joint": (80.0, 90.0), "dualprompt": (90.0, 91.0), "l2p": (20.0, 30.0)}
    tp = {"device": "CPU X (2 logical cores, 1 torch threads)", "precision": "fp32", "batch_size": 32}
    for m in list_methods():
        for s, v in zip((0, 1), faa.get(m, (50.0, 60.0))):
            d = tmp_path / "fashion_mnist" / m / f"seed{s}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps({"metrics": {"faa": v}, "cost": {"throughput": tp}}))
    lines = demo.demo_summary(tmp_path, "fashion_mnist", [0, 1])
    assert lines[0] == "throughput (img/s): measured at the end of each run on CPU X (2 logical cores, 1 torch threads), fp32, batch 32"
    from methods.registry import get_method_class

    not_prompt = [m for m in list_methods("method") if not get_method_class(m).prompt_based]
    assert sorted(not_prompt) == ["aper", "ease", "ranpac", "slca"]
    n = len(list_methods("method")) - len(not_prompt)
    # means: finetune 25, joint 85; dualprompt 90.5 lies above joint, l2p 25 equals finetune (not strictly above)
    assert lines[1].startswith(f"mean FAA over seeds 0 1: finetune 25.00 < prompt method < joint 85.00 holds for {n - 2}/{n} prompt methods: ")
    assert "dualprompt 90.50 (outside)" in lines[1] and "l2p 25.00 (outside)" in lines[1] and "smope 55.00," in lines[1] + ","
    assert "aper" not in lines[1]
    assert lines[2] == ("not prompt methods (first-session adaptation / backbone training, issue 22): "
                        + ", ".join(f"{m} 55.00" for m in list_methods("method") if m in not_prompt))
