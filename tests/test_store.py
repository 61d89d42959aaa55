"""Run store: atomic writes, status, failures never replace a good result, task-boundary resume."""
import json

import pytest
import torch

from benchmarks.run.runner import prepare, run_prepared
from benchmarks.run.store import RunStore, atomic_write_json, config_hash
from conftest import make_tiny_config


def test_atomic_json_is_strict_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "a" / "r.json"
    atomic_write_json(p, {"x": float("nan"), "y": [1.5, float("inf")], "t": torch.tensor([1, 2])})
    assert json.loads(p.read_text()) == {"x": None, "y": [1.5, None], "t": [1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_previous_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"ok": 1})

    class Bad:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": Bad()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_config_hash_ignores_device_and_worker_settings():
    a = make_tiny_config("ncm").to_dict()
    b = dict(a, device="cuda", quiet=False)
    b["train"] = dict(a["train"], num_workers=8, eval_batch_size=999)
    c = dict(a, seed=1)
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_a_failing_rerun_records_failure_and_keeps_the_good_result(tmp_path):
    cfg = make_tiny_config("linear_probe")
    good = run_prepared(prepare(cfg), tmp_path, log_to_stdout=False)
    store = RunStore(tmp_path / "synthetic-3t" / "linear_probe" / "seed0")
    before = store.result_path.read_text()
    p = prepare(cfg)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    p.method.end_task = boom
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_prepared(p, tmp_path, overwrite=True, log_to_stdout=False)
    st = store.status()
    assert st["status"] == "failed" and "disk on fire" in st["error"]
    assert store.result_path.read_text() == before
    assert good["acc_matrix"] == json.loads(before)["acc_matrix"]


def test_resume_from_a_task_checkpoint_gives_the_uninterrupted_result(tmp_path):
    cfg = make_tiny_config("linear_probe")
    full = run_prepared(prepare(cfg), tmp_path / "full", log_to_stdout=False)

    # interrupted run: stop right after the checkpoint of task 2 (index 1)
    p = prepare(cfg)
    store = RunStore(tmp_path / "cut" / "synthetic-3t" / "linear_probe" / "seed0")
    orig = p.method.begin_task

    def stop_at_task_3(task):
        if task.index == 2:
            raise KeyboardInterrupt
        orig(task)

    p.method.begin_task = stop_at_task_3
    with pytest.raises(KeyboardInterrupt):
        run_prepared(p, tmp_path / "cut", log_to_stdout=False)
    assert store.load_checkpoint()["task"] == 1 and not store.result_path.exists()
    resumed = run_prepared(prepare(cfg), tmp_path / "cut", resume=True, log_to_stdout=False)
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert "resumed from" in (store.path / "log.txt").read_text()


def test_resume_with_a_different_config_is_refused(tmp_path):
    from benchmarks.run.runner import RunError

    cfg = make_tiny_config("linear_probe")
    run_prepared(prepare(cfg), tmp_path, log_to_stdout=False)
    other = make_tiny_config("linear_probe", {"train": {"lr": 0.5}})
    with pytest.raises(RunError, match="different method or config"):
        run_prepared(prepare(other), tmp_path, resume=True, log_to_stdout=False)
