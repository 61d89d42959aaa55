"""benchmarks/tools/feature_probe.py: NCM, the task-masked linear head and the joint head on frozen
features, checked on hand-made feature sets whose answers follow from the geometry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.tools.feature_probe import (ProbeSettings, joint_probe_accuracy, masked_probe_accuracy, ncm_accuracy,
                                      probe, scenario_features)
from conftest import make_tiny_config


def _task(points, labels, copies: int = 8):
    """``copies`` identical samples of every (point, label): exactly balanced classes."""
    x = torch.tensor(points, dtype=torch.float32).repeat_interleave(copies, 0)
    y = torch.tensor(labels).repeat_interleave(copies)
    return x, y


def _zero_head(d: int, c: int) -> nn.Linear:
    head = nn.Linear(d, c)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def test_ncm_uses_cosine_to_the_class_means():
    train = [(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), torch.tensor([0, 0, 1]))]
    # means: class 0 (1, 0.1), class 1 (0, 1). (2, 0.1) -> 0; (0.1, 1) -> 1; (1, 1.1): cosine
    # 1.11 / |(1, 0.1)| = 1.1045 beats 1.1 (both over |x|) -> 0, but labelled 1: 2 of 3 right.
    test = [(torch.tensor([[2.0, 0.1], [0.1, 1.0], [1.0, 1.1]]), torch.tensor([0, 1, 1]))]
    assert ncm_accuracy(train, test) == pytest.approx(200 / 3)


FULL_BATCH = ProbeSettings(epochs=30, lr=0.05, batch_size=1000)


def test_masked_head_is_exact_when_tasks_use_orthogonal_directions():
    # task 0 separates along x, task 1 along y. Balanced full batches give zero gradient to the
    # biases and to the other axis, so every logit of another task's class stays exactly 0
    # while the own class's logit is positive: 100 %.
    tasks = [_task([[1, 0], [-1, 0]], [0, 1]), _task([[0, 1], [0, -1]], [2, 3])]
    assert masked_probe_accuracy(tasks, tasks, 4, FULL_BATCH, head=_zero_head(2, 4)) == 100.0


def test_masked_head_loses_a_later_task_that_projects_on_an_earlier_discriminant():
    # Same tasks, but task 1's images sit at x = 10: class 0's logit there is 10 a (a: its weight
    # along x), class 2's is b (its weight along y). Each task's fresh Adam sees the same
    # geometry along its own axis, so a = b, and task 1 goes entirely to class 0 while task 0
    # stays right: exactly half of the images.
    tasks = [_task([[1, 0], [-1, 0]], [0, 1]), _task([[10, 1], [10, -1]], [2, 3])]
    assert masked_probe_accuracy(tasks, tasks, 4, FULL_BATCH, head=_zero_head(2, 4)) == 50.0
    # every class is linearly separable from the others (e.g. w_C = (1, 1), b_C = -1/2 against
    # w_A = (1, 0)), so the head trained on all classes at once gets them all
    joint = ProbeSettings(epochs=400, lr=0.05, batch_size=1000)
    assert joint_probe_accuracy(tasks, tasks, 4, joint) == 100.0


def test_masked_head_never_touches_classes_outside_the_current_task():
    head = nn.Linear(2, 4)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    masked_probe_accuracy([_task([[1, 0], [-1, 0]], [0, 1])], [_task([[1, 0]], [0])], 4, FULL_BATCH, head=head)
    assert torch.equal(head.weight[2:], before[0][2:]) and torch.equal(head.bias[2:], before[1][2:])
    assert not torch.equal(head.weight[:2], before[0][:2])


def test_scenario_features_are_the_backbone_queries_and_ncm_equals_the_ncm_baseline(tiny_run):
    cfg = make_tiny_config("linear_probe")
    train, test, n = scenario_features(cfg, "backbone")
    assert n == 6 and len(train) == len(test) == 3
    assert all(f.shape[1] == 64 for f, _ in train + test)
    pixels, _, _ = scenario_features(cfg, "pixels")
    assert pixels[0][0].shape[1] == 32 * 32 and torch.equal(pixels[0][1], train[0][1])
    # the ncm baseline classifies the same test images by cosine to the same class means, and
    # its final average accuracy over equal-sized tasks is the accuracy over all test images
    assert probe(cfg)["ncm"] == pytest.approx(tiny_run("ncm")["metrics"]["faa"], abs=1e-6)


def test_cli_error_is_one_sentence_with_status_2(capsys):
    from benchmarks.tools.feature_probe import main

    # the synthetic benchmark renders exactly the images a run uses: none is left for the MLP
    assert main(["-b", "synthetic", "--features", "indomain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "needs a real data set" in err
