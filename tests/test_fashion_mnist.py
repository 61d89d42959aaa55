"""A short continual-learning run on real images: Fashion-MNIST from Debian's package.

``.ci/run`` installs ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Without
it these tests fail with a message saying how to install it; they never skip.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.config import BenchmarkConfig
from benchmarks.data.datasets import FASHION_MNIST_DEBIAN, find_fashion_mnist, load_dataset
from conftest import make_tiny_config

INSTALL = ("Fashion-MNIST not found in /usr/share/datasets/fashion-mnist; install it with "
           "'apt-get install dataset-fashion-mnist' (.ci/run does this before the tests)")


@pytest.fixture
def empty_root(tmp_path, monkeypatch) -> Path:
    """A data root without the files, so the loader must find Debian's copy by itself."""
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    files = find_fashion_mnist(tmp_path)
    if files is None or files["train_images"].parent != FASHION_MNIST_DEBIAN:
        pytest.fail(INSTALL, pytrace=False)
    return tmp_path


def test_debian_files_are_found_and_decode_to_the_real_data(empty_root):
    train, test, info = load_dataset(BenchmarkConfig(name="fashion_mnist", data_root=str(empty_root)), 32)
    assert info.extra["data_path"] == str(FASHION_MNIST_DEBIAN)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    # the published statistics of the training images: mean 0.2860, std 0.3530 (of [0,1] pixels)
    x = train.images.float() / 255
    assert abs(x.mean().item() - 0.2860) < 5e-4 and abs(x.std().item() - 0.3530) < 5e-4


def _run(method: str, root: Path, out: Path) -> dict:
    from benchmarks.run.runner import prepare, run_prepared

    cfg = make_tiny_config(method, {
        "benchmark": {"data_root": str(root), "num_tasks": 5, "num_classes": None,
                      "train_per_class": 60, "test_per_class": 60},
        # the procedural backbone (cached once for the whole suite); the quick preset's in-domain
        # one is tested on hand-made data in tests/test_pretrain_in_domain.py
        "backbone": {"pretrained": "auto", "pretrain": "procedural"},
        "train": {"batch_size": 32, "eval_batch_size": 256},
    }, benchmark="fashion_mnist", preset="quick")
    return run_prepared(prepare(cfg), out, log_to_stdout=False)


def test_short_cl_run_on_real_images(empty_root, tmp_path, pretrained_backbone_path):
    results = {m: _run(m, empty_root, tmp_path / "runs") for m in ("finetune", "linear_probe", "ncm", "joint")}
    for m, r in results.items():
        acc = r["acc_matrix"]
        assert len(acc) == 5
        for t in range(5):
            assert all(isinstance(a, float) and 0 <= a <= 100 for a in acc[t][: t + 1]), (m, t)
            assert all(a is None or math.isnan(a) for a in acc[t][t + 1:]), (m, t)
        sc = r["scenario"]
        assert sc["data_path"] == str(FASHION_MNIST_DEBIAN) and sc["train_images"] == 600 and sc["test_images"] == 600
        assert r["env"]["backbone"]["tag"] == "synthetic_pretrain"
    faa = {m: r["metrics"]["faa"] for m, r in results.items()}
    # sequential fine-tuning forgets everything but the last task (2 of 10 classes, so FAA is at
    # most 20 plus what survives); class prototypes on the frozen pretrained features do not
    # forget and stay far above it; so does joint training on all data seen. The linear probe
    # keeps its features but trains its head task by task (softmax over the current task's
    # classes), so it beats fine-tuning only by the calibration it keeps, and stays below joint.
    # (One epoch leaves joint unconverged: it bounds the sequentially trained heads, and is not
    # compared with the prototypes here; the quick preset's 3 epochs put it above them.)
    assert faa["finetune"] < 30
    assert faa["finetune"] + 15 < faa["ncm"]
    assert faa["finetune"] + 15 < faa["joint"]
    assert faa["finetune"] < faa["linear_probe"] < faa["joint"]
