"""Defects 8 and 9: ``--set train.lr=1e-3`` is a number; a value that parses but means nothing is
refused in one sentence before anything is written, by run and by the sweep's up-front check."""
from __future__ import annotations

import pytest
import yaml

from benchmarks.config import parse_set
from tests.faults.helpers import TINY_SET, cli, one_sentence, run_args, run_dir


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("3e-4", 0.0003), ("1.0e6", 1000000.0), ("-2E-5", -2e-05),
                                        ("1_000", 1000), ("0.5", 0.5), ("7", 7)])
def test_set_reads_numbers_as_python_does(text, value):
    got = parse_set([f"train.x={text}"])["train"]["x"]
    assert got == value and type(got) is type(value)
    assert parse_set(["method.name=e5"])["method"]["name"] == "e5"  # not a number: stays a string


def test_set_lr_1e_3_runs_and_the_config_says_0_001(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err, _ = cli(run_args(out, sets=("train.lr=1e-3", "train.weight_decay=1e-4")), capsys)
    assert code == 0, err
    cfg = yaml.safe_load((run_dir(out) / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["weight_decay"] == 0.0001


BAD = [
    ("train.epochs=-1", "train.epochs=-1 is out of range; it must be at least 1 (0 only for a method that trains "
                        "nothing, such as ncm)"),
    ("train.epochs=0", "train.epochs=0: linear_probe trains, so it needs at least 1 epoch"),
    ("train.lr=-1", "train.lr=-1.0 is out of range; it must be at least 0"),
    ("benchmark.train_per_class=0", "benchmark.train_per_class=0 is out of range; it must be at least 1"),
    ("benchmark.train_per_class=-3", "benchmark.train_per_class=-3 is out of range; it must be at least 1"),
    ("benchmark.num_classes=0", "benchmark.num_classes=0 is out of range; it must be at least 1"),
    ("train.batch_size=0", "train.batch_size=0 is out of range; it must be at least 1"),
    ("train.eval_batch_size=-1", "train.eval_batch_size=-1 is out of range; it must be at least 1"),
    ("train.optimizer=adamx", "unknown train.optimizer 'adamx'; use adam, adamw, sgd"),
    ("train.schedule=linear", "unknown train.schedule 'linear'; use constant, cosine, cosine_epoch, coda_cosine, coswm, step, timm_cosine"),
    ("train.train_mask=past", "unknown train.train_mask 'past'; use current, seen, none"),
]


@pytest.mark.parametrize("setting,message", BAD, ids=[b[0] for b in BAD])
def test_a_meaningless_value_is_refused_before_anything_is_written(tmp_path, capsys, setting, message):
    out = tmp_path / "runs"
    code, err, _ = cli(run_args(out, sets=(setting,)), capsys)
    assert code == 2 and one_sentence(err), err
    assert err == f"error: {message}.", err
    assert not out.exists()


def test_ncm_keeps_its_zero_epochs(tmp_path, capsys):
    code, err, _ = cli(run_args(tmp_path / "runs", method="ncm", sets=("train.epochs=0",)), capsys)
    assert code == 0, err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine\n")
    for out in (f, f / "runs"):
        code, err, _ = cli(run_args(out), capsys)
        assert code == 2 and one_sentence(err), err
        assert "is a file, not a folder; pass a folder" in err and str(f) in err
    assert f.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


@pytest.mark.parametrize("setting,message", [BAD[8], BAD[10], BAD[7]], ids=["optimizer", "train_mask", "eval_batch"])
def test_the_sweeps_up_front_check_catches_them_and_launches_nothing(tmp_path, capsys, setting, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"benchmarks": ["synthetic"], "seeds": [0, 1], "set": TINY_SET,
                                    "methods": ["ncm", {"name": "linear_probe", "tag": "v", "set": [setting]}]}))
    out = tmp_path / "runs"
    code, err, _ = cli(["sweep", "--grid", str(grid), "--out", str(out), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and err == f"error: {message}.", err
    assert not out.exists()


def test_every_schedule_the_validator_accepts_is_one_the_protocol_runs_and_no_other():
    """The up-front check and the protocol's schedule factory must list the same names (they drifted once)."""
    import dataclasses

    from benchmarks.config import SCHEDULES, ConfigError, TrainConfig
    from benchmarks.run.protocol import schedule_factor

    for name in SCHEDULES:
        tcfg = dataclasses.replace(TrainConfig(), schedule=name, epochs=4, lr=0.1)
        # epoch 0, iteration 0 of a 4-epoch run: every schedule starts at a positive factor
        assert schedule_factor(tcfg, 0, 10, 0.1) > 0
    with pytest.raises(ConfigError):
        schedule_factor(dataclasses.replace(TrainConfig(), schedule="linear", epochs=4), 0, 10, 0.1)
