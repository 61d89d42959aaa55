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


def run_stopped_at_task_3(monkeypatch, argv) -> int:
    """``bench.py`` with ``argv`` (a linear_probe run), stopped by Ctrl-C at the start of task 3:
    the checkpoint after task 2 is written, no result. Returns the exit status (130)."""
    import bench
    from baselines.linear_probe import LinearProbe

    begin = LinearProbe.begin_task

    def stop_at_task_3(self, task):
        if task.index == 2:
            raise KeyboardInterrupt
        begin(self, task)

    with monkeypatch.context() as m:
        m.setattr(LinearProbe, "begin_task", stop_at_task_3)
        return bench.main(argv)


def write_cub_layout(root: Path, jpeg: Callable[[int, int], bytes]) -> Path:
    """The official CUB-200-2011 layout under ``root``: 200 classes x 3 images (k = 0, 1 train,
    k = 2 test); ``jpeg(i, c)`` gives the bytes of image number ``i`` (1-based) of class ``c``."""
    folder = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    i = 0
    for c in range(1, 201):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        (folder / "images" / name).mkdir(parents=True)
        for k in range(3):
            i += 1
            rel = f"{name}/Bird_{c}_{k:04d}.jpg"
            (folder / "images" / rel).write_bytes(jpeg(i, c))
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            split.append(f"{i} {0 if k == 2 else 1}")
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split), ("classes.txt", classes)):
        (folder / fname).write_text("\n".join(lines) + "\n")
    return root
