"""The shared protocol: masks, lr rules and schedules, determinism, batch-size independence,
the query cache, frozen weights, non-finite losses."""
import math
from dataclasses import replace

import pytest
import torch

from benchmarks.config import TrainConfig
from benchmarks.run.protocol import (
    NonFiniteLossError,
    QueryCache,
    RunContext,
    evaluate,
    logit_mask,
    scaled_lr,
    schedule_factor,
    train_phase,
)
from benchmarks.run.runner import prepare, run_prepared
from benchmarks.data.scenarios import build_scenario
from methods.base import Phase, Task
from conftest import make_tiny_config


def test_logit_masks():
    task = Task(1, 3, 2, 4, [0, 2, 4, 6])
    cur = logit_mask(task, 6, "current", torch.device("cpu"))
    seen = logit_mask(task, 6, "seen", torch.device("cpu"))
    assert cur.tolist() == [False, False, True, True, False, False]
    assert seen.tolist() == [True, True, True, True, False, False]
    assert logit_mask(task, 6, "none", torch.device("cpu")) is None


def test_task_of_class():
    task = Task(0, 3, 0, 2, [0, 2, 4, 6])
    assert task.task_of_class(torch.tensor([0, 1, 2, 3, 4, 5])).tolist() == [0, 0, 1, 1, 2, 2]


def test_lr_batch_scaling_rule():
    # l2p-pytorch: lr 0.03 at batch 16 with the /256 rule -> 0.001875
    assert scaled_lr(TrainConfig(lr=0.03, batch_size=16, lr_scale_batch=256)) == pytest.approx(0.001875)
    assert scaled_lr(TrainConfig(lr=0.03, batch_size=16)) == 0.03


def test_coda_cosine_schedule_matches_the_reference_loop():
    """CODA-Prompt's CosineSchedule (utils/schedulers.py) calls step(0) in its constructor (lr =
    base·cos(0)) and then sets last_epoch = -1; learners/default.py steps it at the start of every
    epoch e > 0, so epoch e runs with last_epoch = e - 1 for e >= 1 and at the base lr for e = 0.
    K = 4 epochs, denominator 200·(K-1) = 600, by hand:
      e=0: base; e=1: last_epoch 0 -> cos(0) = 1; e=2: cos(99π/600) = cos(29.7°);
      e=3: cos(198π/600) = cos(59.4°)."""
    t = TrainConfig(schedule="coda_cosine", epochs=4)
    expect = [1.0, 1.0, math.cos(math.radians(29.7)), math.cos(math.radians(59.4))]
    for e, want in enumerate(expect):
        for it in (e * 10, e * 10 + 9):  # constant within the epoch
            assert schedule_factor(t, it, 10, 1e-3) == pytest.approx(want, rel=1e-12)
    assert expect[2] == pytest.approx(0.86863, abs=1e-5) and expect[3] == pytest.approx(0.50904, abs=1e-5)

    # K = 20: the last epoch (19) runs at cos(99π·18/3800) = cos(84.4105°) ≈ 9.74% of the base lr
    # (the suite before this fix used e instead of e - 1 and ended at cos(99π·19/3800) ≈ 1.6%)
    t20 = TrainConfig(schedule="coda_cosine", epochs=20)
    assert schedule_factor(t20, 19 * 10, 10, 1e-3) == pytest.approx(math.cos(math.radians(99 * 18 * 180 / 3800)), rel=1e-12)
    assert schedule_factor(t20, 19 * 10, 10, 1e-3) == pytest.approx(0.0974, abs=1e-4)
    assert schedule_factor(t20, 10, 10, 1e-3) == 1.0  # epoch 1 still at the base lr

    # one epoch: the reference never steps; the denominator would be 0
    assert schedule_factor(TrainConfig(schedule="coda_cosine", epochs=1), 3, 10, 1e-3) == 1.0


def test_coda_cosine_schedule_equals_a_stand_in_of_the_reference_scheduler():
    """The reference's scheduler semantics, written out: constructor sets lr(last_epoch=0) and
    resets last_epoch to -1; the learner calls step() (last_epoch += 1) before epochs 1..K-1."""
    k = 7
    last_epoch = 0
    lrs = []
    for epoch in range(k):
        if epoch == 0:
            lr = math.cos(99 * math.pi * 0 / (200 * (k - 1)))  # set in the constructor
            last_epoch = -1
        else:
            last_epoch += 1
            lr = math.cos(99 * math.pi * last_epoch / (200 * (k - 1)))
        lrs.append(lr)
    t = TrainConfig(schedule="coda_cosine", epochs=k)
    assert [schedule_factor(t, e * 3, 3, 1.0) for e in range(k)] == pytest.approx(lrs, rel=1e-12)


def test_coswm_schedule_freeze_then_cosine_with_assumed_iter_step():
    base = 0.005
    t = TrainConfig(schedule="coswm", epochs=20, freeze_iters=80, iter_step=40, min_lr=1e-6)
    floor = 1e-6 / base
    # the reference scheduler is built at the base lr and steps after each update: update 0 runs
    # at the base lr, update i >= 1 at schedule entry i - 1 (SMoPE utils/schedulers.py)
    assert schedule_factor(t, 0, 39, base) == pytest.approx(1.0)
    assert schedule_factor(t, 1, 39, base) == pytest.approx(floor)
    assert schedule_factor(t, 80, 39, base) == pytest.approx(floor)
    assert schedule_factor(t, 81, 39, base) == pytest.approx(1.0)
    total = 40 * 20 - 80  # cosine length uses iter_step, not the real 39 iterations per epoch
    mid = 81 + total // 2
    assert schedule_factor(t, mid, 39, base) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (total // 2) / total)))
    # the real run has 39·20 = 780 iterations < 800: the cosine never quite reaches the floor
    assert schedule_factor(t, 779, 39, base) > floor
    assert schedule_factor(t, 10_000, 39, base) == pytest.approx(floor)


def test_step_and_cosine_schedules():
    t = TrainConfig(schedule="step", epochs=50, milestones=[30], gamma=0.1)
    assert schedule_factor(t, 29 * 4, 4, 1.0) == 1.0 and schedule_factor(t, 30 * 4, 4, 1.0) == pytest.approx(0.1)
    c = TrainConfig(schedule="cosine", epochs=2, min_lr=0.0)
    assert schedule_factor(c, 0, 5, 1.0) == 1.0 and schedule_factor(c, 5, 5, 1.0) == pytest.approx(0.5)


def test_same_seed_gives_identical_results_and_other_seed_differs(tiny_run, tmp_path):
    r1 = tiny_run("finetune", out=tmp_path / "a")
    r2 = tiny_run("finetune", out=tmp_path / "b")
    r3 = tiny_run("finetune", seed=1, out=tmp_path / "c")
    assert r1["acc_matrix"] == r2["acc_matrix"]
    assert r1["scenario"]["class_order"] != r3["scenario"]["class_order"]


def _trained_context(method_name, overrides=None):
    cfg = make_tiny_config(method_name, overrides)
    p = prepare(cfg)
    run = RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True))
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    for i, ph in enumerate(p.method.phases(task)):
        train_phase(p.method, run, task, ph, i)
    return p, run, task


@pytest.mark.parametrize("method", ["linear_probe", "finetune"])
def test_evaluation_does_not_depend_on_batch_size(method):
    p, run, _ = _trained_context(method)
    task = p.scenario.tasks[1]
    p.method.begin_task(task)
    a = evaluate(p.method, run, task, batch_size=1)
    b = evaluate(p.method, run, task, batch_size=64)
    c = evaluate(p.method, run, task, batch_size=5)
    assert a.acc == b.acc == c.acc
    assert a.correct == b.correct


def test_query_cache_gives_identical_results_and_computes_each_image_once():
    p, run, task = _trained_context("linear_probe")
    cached = evaluate(p.method, run, task)
    n = len(p.scenario.test_sets[0])
    assert run.cache.misses >= n
    misses = run.cache.misses
    again = evaluate(p.method, run, task)
    assert run.cache.misses == misses and run.cache.hits >= n  # second evaluation: all hits
    run.cache = QueryCache(enabled=False)
    uncached = evaluate(p.method, run, task)
    assert cached.acc == again.acc == uncached.acc


def test_frozen_backbone_has_no_grad_after_a_training_step():
    p, run, _ = _trained_context("linear_probe")
    assert all(w.grad is None for w in p.method.backbone.parameters())
    assert p.method.head.weight.grad is not None


def test_current_task_mask_leaves_other_head_rows_untouched():
    cfg = make_tiny_config("linear_probe")
    p = prepare(cfg)
    before = p.method.head.weight.detach().clone()
    run = RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True))
    task = p.scenario.tasks[1]
    p.method.begin_task(task)
    train_phase(p.method, run, task, Phase("train"), 0)
    changed = (p.method.head.weight.detach() - before).abs().sum(1) > 0
    assert changed.tolist() == [False, False, True, True, False, False]


def test_non_finite_loss_stops_with_a_clear_error():
    cfg = make_tiny_config("linear_probe", {"train": {"lr": 1e38, "optimizer": "sgd", "momentum": 0.0, "epochs": 3}})
    p = prepare(cfg)
    run = RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True))
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    with torch.no_grad():
        p.method.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss became nan in task 1"):
        train_phase(p.method, run, task, Phase("train"), 0)


def test_features_only_phase_reads_no_image_once_the_queries_are_cached(monkeypatch):
    """HiDe's TII phase (Phase.needs_images False) with a deterministic train transform: epoch 0
    loads every training image once (filling the query cache); epochs 1 and 2 load none. The
    trained TII network equals the one trained from images (same sampler seed, same batches)."""
    from dataclasses import replace as dc_replace

    from benchmarks.data.scenarios import TaskDataset

    loads = {"n": 0}
    orig = TaskDataset.__getitem__

    def counting(self, i):
        loads["n"] += 1
        return orig(self, i)

    monkeypatch.setattr(TaskDataset, "__getitem__", counting)
    over = {"benchmark": {"train_transform": "none"},
            "method": {"tii_epochs": 3, "prompt_length": 2, "n_centroids": 1}}
    params = []
    for needs_images in (False, True):
        cfg = make_tiny_config("hide_prompt", over)
        p = prepare(cfg)
        run = RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True), train_deterministic=True)
        task = p.scenario.tasks[0]
        p.method.begin_task(task)
        tii = dc_replace(p.method.phases(task)[0], needs_images=needs_images)
        assert tii.name == "tii" and tii.train["epochs"] == 3
        loads["n"] = 0
        train_phase(p.method, run, task, tii, 0)
        n = len(p.scenario.train_sets[0])
        assert loads["n"] == (n if not needs_images else 3 * n)
        params.append([t.detach().clone() for t in p.method.tii_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_timm_cosine_follows_timm_cosine_lr_scheduler_stepped_after_each_epoch():
    """HiDe-Prompt / NoRGa ImageNet-R: timm's CosineLRScheduler(t_initial=K, lr_min) with
    ``lr_scheduler.step(epoch)`` after epoch ``epoch`` (their engines). The expected lr of each epoch
    is read off timm's own scheduler driven by that loop, not from the suite's formula."""
    from timm.scheduler import CosineLRScheduler

    from benchmarks.config import TrainConfig
    from benchmarks.run.protocol import schedule_factor

    base, min_lr, k, steps = 0.03, 1e-5, 6, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=k, lr_min=min_lr)
    expected = []
    for epoch in range(k):
        expected.append(opt.param_groups[0]["lr"])  # the lr this epoch trains with
        sched.step(epoch)
    tcfg = TrainConfig(schedule="timm_cosine", epochs=k, lr=base, min_lr=min_lr)
    for epoch in range(k):
        for it in range(epoch * steps, (epoch + 1) * steps):  # constant within an epoch
            assert base * schedule_factor(tcfg, it, steps, base) == pytest.approx(expected[epoch], rel=1e-9)
    assert expected[0] == expected[1] == base  # epochs 0 and 1 both at the base lr


def test_hide_prompt_imagenet_r_paper_preset_uses_the_per_epoch_timm_cosine():
    from benchmarks.config import resolve_config

    cfg = resolve_config("hide_prompt", "imagenet_r", "paper", {})
    assert (cfg.train.schedule, cfg.train.epochs, cfg.train.min_lr) == ("timm_cosine", 150, 1e-5)
