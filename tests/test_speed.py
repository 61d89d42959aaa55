"""Speed features that must not change results: frozen weights get no gradient, the query cache
gives the same accuracy matrix and one pass per image, precision / compile are wired and recorded.

Timings are not tested here (they are benchmarks: ``pytest tests/perf --benchmark-only``).
"""
import json

import pytest
import torch

import bench
from benchmarks.config import TrainConfig
from benchmarks.run.protocol import (loader_options, QueryCache, RunContext, derive_seed, evaluate, make_loader, resolve_precision,
                                 seed_everything, train_phase)
from benchmarks.run.runner import prepare
from benchmarks.run.speed import (InferBatch, PassCounter, TrainStep, apply_run_options, compile_backbone, is_compiled)
from conftest import make_tiny_config
from methods.registry import list_methods
from test_cli import TINY_SET

# Baselines whose backbone is trained on purpose: for them the check is the opposite one (the
# backbone *does* get gradients), so they are not skipped but tested for what they promise.
TRAINABLE_BACKBONE = {"finetune": {}, "joint": {"method": {"finetune_backbone": True}}, "slca": {}}  # slca: issue 22


def _context(cfg, p):
    return RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True))


@pytest.mark.parametrize("method", list_methods())
def test_frozen_backbone_gets_no_gradient_in_any_training_phase(method):
    """After a real training step of every phase of task 1 (the protocol's train_phase), frozen
    backbone weights have requires_grad False and .grad None, while the phase's own parameters
    received a gradient. Methods with no training phase (NCM) are checked to leave no gradient."""
    cfg = make_tiny_config(method, {"train": {"epochs": 1}})
    p = prepare(cfg)
    run = _context(cfg, p)
    task = p.scenario.tasks[1]
    for t in p.scenario.tasks[:2]:
        p.method.begin_task(t)
    backbone = list(p.method.backbone.parameters())
    trainable_backbone = method in TRAINABLE_BACKBONE
    assert all(w.requires_grad == trainable_backbone for w in backbone)
    phases = p.method.phases(task)
    for i, ph in enumerate(phases):
        stats = train_phase(p.method, run, task, ph, i)
        assert stats["steps"] >= 1
        groups = ph.param_groups if ph.param_groups is not None else p.method.param_groups()
        own = [w for g in groups for w in g["params"] if w.requires_grad]
        assert any(w.grad is not None and bool(w.grad.abs().sum() > 0) for w in own), f"{method}/{ph.name}: no gradient"
        if trainable_backbone:
            assert any(w.grad is not None for w in backbone), f"{method} fine-tunes its backbone"
        else:
            assert all(w.grad is None for w in backbone), f"{method}/{ph.name}: a frozen backbone weight has a .grad"
    if not phases:
        assert all(w.grad is None for w in p.method.parameters())


def test_joint_linear_probe_variant_keeps_the_backbone_frozen():
    cfg = make_tiny_config("joint", {"method": {"finetune_backbone": False}})
    p = prepare(cfg)
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    train_phase(p.method, _context(cfg, p), task, p.method.phases(task)[0], 0)
    assert all(w.grad is None and not w.requires_grad for w in p.method.backbone.parameters())
    assert p.method.head.weight.grad is not None


def _run_cli(tmp_path, capsys, *extra):
    code = bench.main(["run", "-b", "synthetic", "-m", "l2p", "--out", str(tmp_path), "--device", "cpu", "--quiet",
                       *extra, "--set", *TINY_SET])
    capsys.readouterr()
    assert code == 0
    return json.loads((tmp_path / "synthetic-3t" / "l2p" / "seed0" / "result.json").read_text())


def test_query_cache_gives_the_same_accuracy_matrix_end_to_end(tmp_path, capsys):
    """A 2-pass method (L2P) run with and without --no-query-cache: identical matrices; the cached
    run computed each test image's query once (misses = test images) and reused it in every later
    evaluation (hits = Σ_t Σ_{j<t} n_j), the uncached one recomputed it every time."""
    cached = _run_cli(tmp_path / "a", capsys)
    uncached = _run_cli(tmp_path / "b", capsys, "--no-query-cache")
    assert cached["acc_matrix"] == uncached["acc_matrix"]
    assert cached["config"]["query_cache"] is True and uncached["config"]["query_cache"] is False
    for r in (cached, uncached):  # defaults: fp32 (the presets' precision), no torch.compile
        assert r["config"]["precision"] == "fp32" and r["env"]["precision"] == "fp32"
        assert r["config"]["compile"] is False
    n = [6 * 2] * 3  # test images per task: 6 per class, 2 classes per task (TINY_SET)
    hits = sum(sum(n[:t]) for t in range(3))
    evals = sum(sum(n[: t + 1]) for t in range(3))
    # the tiny scenario's train transform is random, so training queries are not cacheable
    assert cached["diagnostics"]["query_cache"] == {"hits": hits, "misses": sum(n)}
    assert uncached["diagnostics"]["query_cache"] == {"hits": 0, "misses": evals}


@pytest.mark.parametrize("method", ["l2p", "coda_prompt"])
def test_second_evaluation_of_a_two_pass_method_costs_one_pass_per_image(method):
    cfg = make_tiny_config(method)
    p = prepare(cfg)
    run = _context(cfg, p)
    task = p.scenario.tasks[1]
    for t in p.scenario.tasks[:2]:
        p.method.begin_task(t)
    n = sum(len(p.scenario.test_sets[j]) for j in range(2))
    count = PassCounter(p.method.backbone)
    first = evaluate(p.method, run, task)
    assert (count.query, count.prompted) == (n, n)  # first evaluation: query + prompted pass
    second = evaluate(p.method, run, task)
    assert (count.query, count.prompted) == (n, 2 * n)  # second: cache hits, one pass per image
    run.cache = QueryCache(enabled=False)
    third = evaluate(p.method, run, task)
    assert (count.query, count.prompted) == (2 * n, 3 * n)
    assert first.acc == second.acc == third.acc and first.correct == second.correct == third.correct


def test_training_queries_are_cached_only_without_random_augmentation():
    """train_transform none: each training image's query is computed in the first epoch and reused
    in the second (misses = hits = n), and training ends in exactly the parameters of an uncached
    run; with a random transform the cache is not even consulted for training images."""
    cfg = make_tiny_config("l2p", {"benchmark": {"train_transform": "none"}, "train": {"epochs": 2}})
    params = {}
    for cached in (True, False):
        p = prepare(cfg)
        run = RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(cached), train_deterministic=True)
        task = p.scenario.tasks[0]
        p.method.begin_task(task)
        train_phase(p.method, run, task, p.method.phases(task)[0], 0)
        n = len(p.scenario.train_sets[0])
        assert (run.cache.hits, run.cache.misses) == ((n, n) if cached else (0, 2 * n))
        params[cached] = [w.detach().clone() for w in p.method.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params[True], params[False]))
    random_cfg = make_tiny_config("l2p", {"train": {"epochs": 2}})
    p = prepare(random_cfg)
    run = RunContext(random_cfg, p.scenario, torch.device("cpu"), None, QueryCache(True), train_deterministic=False)
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    train_phase(p.method, run, task, p.method.phases(task)[0], 0)
    assert (run.cache.hits, run.cache.misses, run.cache.store) == (0, 0, {})


def test_precision_default_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("fp32", torch.device("cuda")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_result_records_bf16_precision_end_to_end(tiny_run):
    """--precision bf16 on CPU: the run trains and evaluates under bf16 autocast and says so (the
    fp32 default is checked on the L2P runs above)."""
    r = tiny_run("linear_probe", {"precision": "bf16"})
    assert r["env"]["precision"] == "bf16" and r["config"]["precision"] == "bf16"


def test_compile_flag_is_off_by_default_and_wires_the_backbone_lazily():
    """--compile reaches RunConfig.compile and prepare() compiles both backbone passes in place
    (lazily: nothing is compiled before the first call, so this test does not pay for it).
    Whether compiled outputs match eager is checked in docs/speed.md, not here: inductor needs
    about 7 minutes to compile the micro ViT on the 2-core CI machine."""
    args = bench.build_parser().parse_args(["run", "-b", "synthetic", "-m", "l2p"])
    assert "compile" not in bench.cli_overrides(args)
    args = bench.build_parser().parse_args(["run", "-b", "synthetic", "-m", "l2p", "--compile", "--precision", "fp32"])
    over = bench.cli_overrides(args)
    assert over["compile"] is True and over["precision"] == "fp32"
    plain = prepare(make_tiny_config("l2p"))
    assert not is_compiled(plain.method.backbone)
    compiled = prepare(make_tiny_config("l2p", {"compile": True}))
    bb = compiled.method.backbone
    assert is_compiled(bb)
    assert "forward_features" in vars(bb) and "forward_features" in vars(bb.vit)  # instance-level wrappers
    assert set(compiled.method.state_dict()) == set(plain.method.state_dict())  # checkpoints unchanged
    compile_backbone(bb)  # idempotent
    assert vars(bb)["forward_features"] is compiled.method.backbone.forward_features


def test_loader_options_pin_memory_only_on_cuda():
    tcfg = TrainConfig(num_workers=3)
    assert loader_options(tcfg, torch.device("cuda")) == {"num_workers": 3, "pin_memory": True, "persistent_workers": False}
    assert loader_options(tcfg, torch.device("cpu"))["pin_memory"] is False
    assert loader_options(TrainConfig(), None) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}


def test_train_step_matches_the_protocol_step():
    """The perf suite's TrainStep is the protocol's step: same parameters after one step on the
    same batch, from the same starting state (L2P: query pass, pull loss, clipping, Adam)."""
    cfg = make_tiny_config("l2p", {"train": {"batch_size": 24, "clip_grad": 1.0}})
    a, b = prepare(cfg), prepare(cfg)
    task = a.scenario.tasks[0]
    a.method.begin_task(task)
    b.method.begin_task(task)
    ds = a.scenario.train_sets[0]
    assert len(ds) == 24  # one full batch, so train_phase makes exactly one step on all of it
    run = _context(cfg, a)
    train_phase(a.method, run, task, a.method.phases(task)[0], 0)
    # the train transform is random: redraw the protocol's batch from its seed
    seed = derive_seed(cfg.seed, task.index, 0, 0)
    seed_everything(seed)
    x, y, _ = next(iter(make_loader(ds, 24, True, seed, cfg.train)))
    step = TrainStep(b.method, task, x, torch.as_tensor(y), cfg.train)
    step()
    for (name, wa), wb in zip(a.method.named_parameters(), b.method.parameters()):
        assert torch.allclose(wa, wb, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(InferBatch(a.method, x)(), InferBatch(b.method, x)(), atol=1e-5)


def test_refcompare_grad_audit_counts_gradients_of_weights_no_optimiser_updates():
    """The side-by-side harness's audit: a 3x4 weight (+4 bias) that requires grad but is not
    optimised is counted as wasted gradient; a frozen one (requires_grad False) is not."""
    from benchmarks.tools.refcompare import Side, grad_audit, load_vit_weights

    frozen, wasted, head = torch.nn.Linear(2, 3), torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(frozen, wasted, head)
    model(torch.ones(2, 2)).sum().backward()
    side = Side(lambda: None, lambda: None, list(head.parameters()), list(model.parameters()))
    assert grad_audit(side) == {"optimised": 4 * 5 + 5, "with_grad": 3 * 4 + 4 + 4 * 5 + 5, "grad_not_optimised": 16}
    # weights are shared by name and shape only: 2 of the 6 tensors of `model` match `donor`
    donor = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 7))
    assert load_vit_weights(model, donor) == 2
    assert torch.equal(model[0].weight, donor[0].weight) and not torch.equal(model[1].bias[:3], donor[1].bias[:3])
