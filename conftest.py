"""Shared pytest fixtures: a micro ViT, tiny synthetic scenarios and one-call tiny runs.

Everything runs on CPU. ``tiny_config`` / ``tiny_run`` build a 3-task synthetic scenario on the
randomly initialised micro ViT (no pretraining, seconds per run); ``pretrained_backbone`` is the
suite's pretrained micro ViT (pretrained once, about a minute, then cached).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from benchmarks.config import RunConfig, deep_merge, resolve_config  # noqa: E402

TINY: Dict[str, Any] = {
    "benchmark": {"num_tasks": 3, "num_classes": 6, "train_per_class": 12, "test_per_class": 6},
    "backbone": {"name": "vit_micro_patch8_32", "pretrained": "none"},
    "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16},
    "device": "cpu",
    "quiet": True,
}


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, then restore the previous count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def micro_backbone():
    """A randomly initialised (seeded) micro PromptedViT."""
    from methods.backbones import create_backbone
    from benchmarks.config import BackboneConfig

    backbone, _ = create_backbone(BackboneConfig(name="vit_micro_patch8_32", pretrained="none"))
    return backbone


@pytest.fixture(scope="session")
def pretrained_backbone_path() -> Path:
    """The suite's pretrained micro ViT (pretrains once, then cached)."""
    from methods.pretrain import pretrained_micro_path

    return pretrained_micro_path("vit_micro_patch8_32")


def make_tiny_config(method: str, overrides: Optional[Dict[str, Any]] = None, benchmark: str = "synthetic",
                     preset: str = "quick") -> RunConfig:
    """A resolved config of ``method`` on the tiny synthetic scenario (+ overrides)."""
    return resolve_config(method, benchmark, preset, deep_merge(TINY, overrides or {}))


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    return make_tiny_config


@pytest.fixture
def tiny_run(tmp_path) -> Callable[..., Dict[str, Any]]:
    """Run ``method`` on the tiny scenario in a temporary folder and return result.json's dict."""
    from benchmarks.run.runner import prepare, run_prepared

    def run(method: str, overrides: Optional[Dict[str, Any]] = None, seed: int = 0, out: Optional[Path] = None,
            **kwargs: Any) -> Dict[str, Any]:
        cfg = make_tiny_config(method, overrides)
        cfg.seed = seed
        return run_prepared(prepare(cfg), out or tmp_path / "runs", log_to_stdout=False, **kwargs)

    return run
