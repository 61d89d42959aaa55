"""Class orders, task splits, label remapping, validation split, synthetic determinism."""
import random

import numpy as np
import pytest
import torch

from benchmarks.config import BenchmarkConfig, ConfigError
from benchmarks.data.scenarios import build_scenario, class_order
from benchmarks.data.synthetic import make_synthetic


def test_seeded_order_is_python_random_shuffle_as_in_smope_and_coda():
    expected = list(range(100))
    random.seed(3)  # the reference codes' procedure: random.seed(seed); random.shuffle(order)
    random.shuffle(expected)
    assert class_order(100, "seeded", 3) == expected


def test_coda_order_is_natural_for_seed_zero_only():
    assert class_order(10, "coda", 0) == list(range(10))
    assert class_order(10, "coda", 1) == class_order(10, "seeded", 1) != list(range(10))


def test_numpy_order_matches_pycil():
    np.random.seed(1993)
    assert class_order(20, "numpy", 1993) == list(np.random.permutation(20))


def test_unknown_order_is_an_error():
    with pytest.raises(ConfigError, match="unknown class_order"):
        class_order(5, "random", 0)


def small_cfg(**kw):
    base = dict(name="synthetic", num_tasks=3, num_classes=6, train_per_class=5, test_per_class=3)
    base.update(kw)
    return BenchmarkConfig(**base)


def test_tasks_are_contiguous_chunks_with_remapped_labels():
    sc = build_scenario(small_cfg(), seed=7, image_size=32)
    order = class_order(6, "seeded", 7)
    assert sc.order == order
    for t, task in enumerate(sc.tasks):
        assert (task.class_start, task.class_end) == (2 * t, 2 * t + 2)
        labels = set(sc.train_sets[t].labels.tolist())
        assert labels == {2 * t, 2 * t + 1}
        # the original class of remapped label l is order[l]
        orig = set(int(sc.train_sets[t].split.targets[i]) for i in sc.train_sets[t].indices)
        assert orig == {order[2 * t], order[2 * t + 1]}
        assert len(sc.train_sets[t]) == 10 and len(sc.test_sets[t]) == 6
    x, y, idx = sc.test_sets[1][4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y in (2, 3) and idx == 4


def test_same_order_for_every_method_and_different_per_seed():
    a = build_scenario(small_cfg(), seed=1, image_size=32).order
    b = build_scenario(small_cfg(), seed=1, image_size=32).order
    c = build_scenario(small_cfg(), seed=2, image_size=32).order
    assert a == b and a != c


def test_uneven_split_is_a_config_error():
    with pytest.raises(ConfigError, match="7 classes cannot be split evenly into 3 tasks"):
        build_scenario(small_cfg(num_classes=7), seed=0, image_size=32)


def test_validation_split_is_carved_from_train():
    sc = build_scenario(small_cfg(train_per_class=10, val_fraction=0.2), seed=0, image_size=32)
    assert sc.eval_split == "val"
    for t in range(3):
        tr, va = set(sc.train_sets[t].indices.tolist()), set(sc.test_sets[t].indices.tolist())
        assert not tr & va and len(va) == 2 * 2 and len(tr) == 2 * 8
        assert sc.test_sets[t].split is sc.train_sets[t].split


def test_synthetic_is_deterministic_and_classes_are_namespaced():
    x1, y1 = make_synthetic([0, 1], 4, 32, "cl", "train")
    x2, _ = make_synthetic([0, 1], 4, 32, "cl", "train")
    x3, _ = make_synthetic([0, 1], 4, 32, "pretrain", "train")
    xt, _ = make_synthetic([0, 1], 4, 32, "cl", "test")
    assert torch.equal(x1, x2) and not torch.equal(x1, x3) and not torch.equal(x1, xt)
    assert y1.tolist() == [0] * 4 + [1] * 4 and x1.dtype == torch.uint8
    # a class's recipe does not depend on which other classes are generated
    xa, _ = make_synthetic([5], 4, 32, "cl", "train")
    xb, _ = make_synthetic([0, 5], 4, 32, "cl", "train")
    assert torch.equal(xa, xb[4:])
