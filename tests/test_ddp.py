"""Data-parallel runs: ``torchrun --nproc_per_node=2 bench.py run`` on CPU (gloo) against one process.

Tolerance: the two-process run sums the same per-sample gradients in another order (per-rank
partial sums, then an all-reduce), so gradients agree to float32 rounding, not bit for bit. Adam
divides by sqrt(v), so an entry whose gradient is ~0 can move by up to ~lr per step in one run
and not the other: measured on this scenario, linear_probe's head agrees to 1.5e-8 and 0.1 % of
finetune's 314k backbone entries differ by more than 1e-6 (max 8.5e-5, lr 3e-4). The test allows
1e-3 per entry, 1e-6 for 99 % of the entries, and one test sample per accuracy cell (a sample on a
decision boundary may flip; 100 / 15 points here). The accuracy matrices were identical when
measured.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import bench
from benchmarks.config import ConfigError
from benchmarks.run.distributed import DistContext, ShardedBatchSampler, global_batch_sampler, shard_bounds
from benchmarks.run.store import RunStore
from conftest import ROOT, make_tiny_config

SET = ["benchmark.num_tasks=3", "benchmark.num_classes=9", "benchmark.train_per_class=7", "benchmark.test_per_class=5",
       "benchmark.train_transform=none", "backbone.pretrained=none", "train.epochs=2", "train.batch_size=10",
       "train.eval_batch_size=4"]
# 21 training images per task, global batch 10: batches of 10, 10 and 1, so the last batch leaves
# rank 1 with a placeholder (zero weight); 15 test images per task: eval shards of 8 and 7.
METHODS = "linear_probe,finetune,ncm"  # a trainable head, a trainable backbone, end_task statistics only


def test_shards_reassemble_the_single_process_batches():
    n, bs, seed = 21, 10, 1234
    single = [b[2].tolist() for b in DataLoader(list(zip(range(n), range(n), range(n))), batch_size=bs, shuffle=True,
                                                generator=torch.Generator().manual_seed(seed))]
    shards = []
    for rank in range(2):
        g = torch.Generator().manual_seed(seed)
        sampler = ShardedBatchSampler(global_batch_sampler(n, bs, True, g, False), rank, 2)
        loader = DataLoader(list(range(n)), batch_sampler=sampler, generator=g)
        shards.append([b.tolist() for b in loader])
    assert [len(s) for s in shards] == [3, 3]  # equal step counts on both ranks
    for i, batch in enumerate(single):
        lo, hi = shard_bounds(len(batch), 2, 1)
        rank1 = shards[1][i] if hi > lo else []  # an empty share comes as a placeholder
        assert shards[0][i] + rank1 == batch
    assert len(shards[1][2]) == 1 and shards[1][2] == shards[0][2]  # placeholder = the batch's first index
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_a_batch_size_the_process_count_does_not_divide_is_a_config_error():
    from benchmarks.run.protocol import QueryCache, RunContext, train_phase
    from benchmarks.run.runner import prepare
    from methods.base import Phase

    p = prepare(make_tiny_config("linear_probe"))
    run = RunContext(p.cfg, p.scenario, torch.device("cpu"), None, QueryCache(True), dist=DistContext(0, 3))
    with pytest.raises(ConfigError, match="train.batch_size=8 cannot be split evenly over 3 processes"):
        train_phase(p.method, run, p.scenario.tasks[0], Phase("train"), 0)


def test_torchrun_two_processes_match_one_process(tmp_path, capsys):
    args = ["run", "-b", "synthetic", "-m", METHODS, "--device", "cpu", "--quiet"]
    assert bench.main(args + ["--out", str(tmp_path / "one"), "--set", *SET]) == 0
    capsys.readouterr()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "bench.py"), *args, "--out", str(tmp_path / "two"), "--set", *SET],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FAA") == 3  # the summary lines come from rank 0 only
    for m in METHODS.split(","):
        one = RunStore(tmp_path / "one" / "synthetic-3t" / m / "seed0")
        two = RunStore(tmp_path / "two" / "synthetic-3t" / m / "seed0")
        a, b = one.read_result(), two.read_result()
        for t in range(3):
            for j in range(t + 1):
                assert abs(a["acc_matrix"][t][j] - b["acc_matrix"][t][j]) <= 100 / 15 + 1e-9, (m, t, j)
        assert b["config_hash"] == a["config_hash"]
        s1, s2 = one.load_checkpoint()["state"], two.load_checkpoint()["state"]
        assert s1.keys() == s2.keys()
        diff = torch.cat([(s1[k].double() - s2[k].double()).abs().flatten() for k in s1])
        assert diff.max() <= 1e-3 and (diff > 1e-6).double().mean() <= 0.01, (m, diff.max())
        st = two.status()
        assert st["status"] == "done" and st["world_size"] == 2
        log = (two.path / "log.txt").read_text()
        assert log.count("task 1/3 eval") == 1  # one writer: rank 0
        assert json.loads((two.path / "result.json").read_text())["env"]["hostname"]
