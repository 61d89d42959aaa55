"""Conformance: every registered method and baseline passes the same checks, by registering.

Parametrised over ``methods.registry.list_methods()``, so a new file in ``methods/`` or
``baselines/`` is covered without editing this test (docs/adding-a-method.md). Each method runs
through the real runner (``benchmarks.run.runner.prepare`` / ``run_prepared``) on a tiny synthetic
scenario (2 tasks × 3 classes, 12 training and 6 test images per class, ``conftest.TINY``) on the
randomly initialised micro ViT, with its own ``quick`` preset underneath. Checked:

* it runs two tasks: a 2×2 accuracy matrix, NaN above the diagonal, FAA = mean of the last row;
* it is deterministic: a second run with the same seed gives the same accuracy matrix and
  bit-identical saved state;
* its checkpoint round-trips: the saved ``checkpoint.pt`` loaded into a freshly prepared method
  after replaying ``begin_task`` (the resume contract of ``benchmarks/run/runner.py``) gives the same
  logits, predictions and accuracies as the trained method, and the run's last accuracy row;
* it reports its cost: parameters counted independently here, state, and MACs per image that
  cover at least its backbone passes (closed form of the micro ViT);
* evaluation does not depend on the batch size: batch 1 and batch 64 give the same predictions,
  accuracies and per-sample diagnostics.

One pair of runs per method is shared by all checks (module-scoped fixture). The minimal example
of docs/adding-a-method.md (the code block after its ``conformance-example`` marker) is registered
for its own runs only and goes through the same checks, so the documented example stays correct.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from benchmarks.config import RunConfig
from benchmarks.run.protocol import QueryCache, RunContext, derive_seed, evaluate, seed_everything
from benchmarks.run.runner import Prepared, prepare, run_path, run_prepared
from benchmarks.run.store import RunStore
from conftest import ROOT, make_tiny_config
from methods import registry
from methods.base import ContinualMethod
from methods.registry import list_methods

NUM_TASKS = 2
DOC = ROOT / "docs" / "adding-a-method.md"
EXAMPLE_MARK = "<!-- conformance-example:"


def doc_example() -> Tuple[str, str]:
    """(registered name, code) of the python block after the marker in docs/adding-a-method.md."""
    text = DOC.read_text()
    at = text.index(EXAMPLE_MARK)
    name = text[at + len(EXAMPLE_MARK):].split("-->", 1)[0].strip()
    start = text.index("```python\n", at) + len("```python\n")
    return name, text[start:text.index("\n```", start)]


EXAMPLE = doc_example()[0]
METHODS = list_methods() + [f"{EXAMPLE}(docs)"]

# Budget only (the file must stay near two minutes on two cores): settings that make a method's
# quick preset heavier than the tiny scenario needs. Each keeps every stage of the method running.
BUDGET_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "hide_prompt": {"method": {"n_centroids": 2, "tii_epochs": 1, "tii_align_epochs": 2, "tap_epochs": 2}},
    "norga": {"method": {"tii_epochs": 1, "tii_align_epochs": 2, "tap_epochs": 2}},
    "smope": {"method": {"ca_epochs": 3}},
    "vq_prompt": {"method": {"ca_epochs": 3}},
}


@dataclass
class Trained:
    name: str
    cfg: RunConfig
    prepared: Prepared  # the method after the first run (trained on both tasks)
    result: Dict[str, Any]
    result_again: Dict[str, Any]
    path: Path
    path_again: Path

    @property
    def method(self) -> ContinualMethod:
        return self.prepared.method


def conformance_config(name: str) -> RunConfig:
    overrides = {"benchmark": {"num_tasks": NUM_TASKS}, **BUDGET_OVERRIDES.get(name, {})}
    return make_tiny_config(name, overrides)


def register_doc_example(request) -> str:
    """Register the docs example for the runs of this fixture instance; removed at teardown so that
    no other test sees an extra method."""
    name, code = doc_example()
    assert name not in list_methods(), f"the docs example '{name}' would shadow a registered method"
    module = types.ModuleType(f"docs_example_{name}")
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)

    def remove() -> None:
        registry._REGISTRY.pop(name, None)  # the registry has no public unregister: test-only
        sys.modules.pop(module.__name__, None)

    request.addfinalizer(remove)
    return name


@pytest.fixture(scope="module", params=METHODS)
def trained(request, tmp_path_factory) -> Trained:
    name = register_doc_example(request) if request.param.endswith("(docs)") else request.param
    cfg = conformance_config(name)
    out = tmp_path_factory.mktemp(f"conformance-{name}")
    first = prepare(cfg)
    result = run_prepared(first, out / "a", log_to_stdout=False)
    again = prepare(cfg)
    result_again = run_prepared(again, out / "b", log_to_stdout=False)
    return Trained(name, cfg, first, result, result_again, run_path(cfg, out / "a"), run_path(cfg, out / "b"))


# --- helpers ----------------------------------------------------------------------------------

def run_context(t: Trained) -> RunContext:
    """A fresh context on the run's scenario; no query cache, so every evaluation computes its own."""
    return RunContext(t.cfg, t.prepared.scenario, torch.device("cpu"), None, QueryCache(enabled=False), log=lambda m: None)


def eval_images(t: Trained) -> List[torch.Tensor]:
    """The evaluation images of every task, one tensor per task."""
    return [torch.stack([ds[i][0] for i in range(len(ds))]) for ds in t.prepared.scenario.test_sets]


@torch.no_grad()
def outputs(method: ContinualMethod, x: torch.Tensor, batch_size: int) -> Dict[str, torch.Tensor]:
    """Logits (masked to the seen classes, as the protocol scores them) and diagnostics, in chunks."""
    method.eval()
    seen = method.current_task.num_seen
    logits, diags = [], {}
    for chunk in x.split(batch_size):
        out = method(chunk)
        logits.append(out.logits.float()[:, :seen])
        for k, v in out.diagnostics.items():
            diags.setdefault(k, []).append(v)
    res = {"logits": torch.cat(logits)}
    res.update({k: torch.cat(v) for k, v in diags.items()})
    return res


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality of checkpoint states (tensors bit-identical, other values equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def plain_pass_macs(method: ContinualMethod) -> int:
    """Closed-form multiply-adds of one un-prompted pass of the backbone: patch embedding, and per
    block the qkv, q·kᵀ, attn·v, output projection and MLP products (norms, softmax and GELU are
    not multiply-adds)."""
    bb = method.backbone
    vit = bb.vit
    n, d = bb.num_tokens, bb.embed_dim
    proj = vit.patch_embed.proj
    patch = vit.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * d
    hidden = vit.blocks[0].mlp.fc1.out_features
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    return patch + bb.depth * block


# --- the checks -------------------------------------------------------------------------------

def test_runs_two_tasks(trained: Trained):
    acc = trained.result["acc_matrix"]
    assert len(acc) == NUM_TASKS and all(len(row) == NUM_TASKS for row in acc)
    assert acc[0][1] is None or math.isnan(acc[0][1])  # task 1 not yet seen after task 0
    for t in range(NUM_TASKS):
        for j in range(t + 1):
            assert 0.0 <= acc[t][j] <= 100.0
    assert trained.result["metrics"]["faa"] == pytest.approx(sum(acc[-1]) / NUM_TASKS)
    assert trained.method.current_task.index == NUM_TASKS - 1
    ckpt = RunStore(trained.path).load_checkpoint()
    assert ckpt["task"] == NUM_TASKS - 1 and ckpt["method"] == trained.name


def test_is_deterministic(trained: Trained):
    assert trained.result_again["acc_matrix"] == trained.result["acc_matrix"]
    a = RunStore(trained.path).load_checkpoint()["state"]
    b = RunStore(trained.path_again).load_checkpoint()["state"]
    assert_same_state(a, b)


def test_checkpoint_round_trip(trained: Trained):
    state = RunStore(trained.path).load_checkpoint()["state"]
    fresh = prepare(trained.cfg)
    # the resume contract (benchmarks/run/runner.py run_prepared): replay begin_task, then load
    for task in fresh.scenario.tasks[:NUM_TASKS]:
        seed_everything(derive_seed(trained.cfg.seed, task.index, "begin"))
        fresh.method.begin_task(task)
    fresh.method.load_checkpoint_state(state)
    for x in eval_images(trained):
        ref = outputs(trained.method, x, 64)
        got = outputs(fresh.method, x, 64)
        assert torch.equal(got["logits"].argmax(1), ref["logits"].argmax(1))
        assert torch.allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
        assert set(got) == set(ref)
        for k in ref:
            if k != "logits":
                assert torch.equal(got[k], ref[k]), f"diagnostic '{k}' differs after reloading"
    last = fresh.scenario.tasks[NUM_TASKS - 1]
    ev = evaluate(fresh.method, run_context(trained), last)
    assert ev.acc == pytest.approx(trained.result["acc_matrix"][-1], abs=1e-9)


def test_reports_cost(trained: Trained):
    cost = trained.result["cost"]
    m = trained.method
    assert "flops_error" not in cost, cost.get("flops_error")
    # parameters, counted here independently of benchmarks/cost/engine.py
    own = {id(p): p.numel() for n, p in m.named_parameters() if not n.startswith("backbone.")}
    assert cost["added_params"] == sum(own.values())
    assert cost["backbone_params"] == sum(p.numel() for p in m.backbone.parameters())
    assert 0 <= cost["used_params"] <= cost["added_params"]
    # a continual learner keeps something: parameters or stored state (NCM: its prototypes)
    assert cost["added_params"] > 0 or cost["state_numbers"] > 0
    if m.phases(m.current_task):  # it trains: something is handed to the optimiser
        assert cost["trainable_params"] > 0
        assert cost["train_gmacs"] > 0
    # MACs per image: at least one full backbone pass per pass the method reports
    assert cost["inference_passes"] >= 1
    assert cost["inference_gmacs"] * 1e9 >= cost["inference_passes"] * plain_pass_macs(m) * (1 - 1e-9)
    assert cost["inference_gflops"] == pytest.approx(2 * cost["inference_gmacs"])
    assert cost["query_pass"] == bool(m.uses_query)


def test_evaluation_does_not_depend_on_batch_size(trained: Trained):
    m = trained.method
    last = trained.prepared.scenario.tasks[NUM_TASKS - 1]
    one = evaluate(m, run_context(trained), last, batch_size=1)
    many = evaluate(m, run_context(trained), last, batch_size=64)
    assert one.correct == many.correct and one.total == many.total
    assert one.task_acc == many.task_acc
    assert many.acc == pytest.approx(trained.result["acc_matrix"][-1], abs=1e-9)  # the run used batch 16
    for j in one.selection:
        assert torch.equal(one.selection[j], many.selection[j])
    for x in eval_images(trained):
        a, b = outputs(m, x, 1), outputs(m, x, 64)
        assert torch.equal(a["logits"].argmax(1), b["logits"].argmax(1))
        assert torch.allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)
        for k in b:
            if k != "logits":
                assert torch.equal(a[k], b[k]), f"diagnostic '{k}' depends on the batch size"
