"""diagnostics.prompt_usage / task_id_accuracy / method_traits in result.json, on a hand-derived case."""
from typing import Any, List

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from benchmarks import diagnostics as D
from benchmarks.run.runner import prepare, run_prepared
from conftest import make_tiny_config
from methods.base import ContinualMethod, MethodOutput, Phase


class LabelImages(Dataset):
    """The scenario's test set with each image replaced by a constant image holding its label."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y, idx = self.base[i]
        return torch.full_like(x, float(y)), y, idx


class Oracle(ContinualMethod):
    """Reads the label from the image; selection layer 0 = y % 3, layer 1 = 0; task guess y // 2 for
    even labels, 0 for odd ones."""

    selection_size = 3

    def phases(self, task) -> List[Phase]:
        return []

    def forward(self, x, query=None, **kw: Any) -> MethodOutput:
        y = x[:, 0, 0, 0].round().long()
        sel = torch.stack([y % 3, torch.zeros_like(y)], dim=1).unsqueeze(-1)  # (B, 2 layers, 1)
        task = torch.where(y % 2 == 0, y // 2, torch.zeros_like(y))
        return MethodOutput(logits=F.one_hot(y, self.num_classes).float(), features=x.flatten(1)[:, :4],
                            diagnostics={"selection": sel, "task_pred": task})


def test_result_json_diagnostics_hand_derived(tmp_path):
    # tiny scenario: 3 tasks of 2 classes (labels 2j, 2j+1), 6 test images per class
    cfg = make_tiny_config("ncm")
    p = prepare(cfg)
    p.method = Oracle(p.method.backbone, p.scenario.num_classes, None)
    p.scenario.test_sets = [LabelImages(d) for d in p.scenario.test_sets]
    res = run_prepared(p, tmp_path / "runs", log_to_stdout=False)
    d = res["diagnostics"]
    # task 0: labels 0, 1 -> layer 0 picks ids 0 and 1 six times each, layer 1 id 0 twelve times
    # task 1: labels 2, 3 -> 2 % 3 = 2, 3 % 3 = 0;  task 2: labels 4, 5 -> 1, 2
    assert d["prompt_usage"] == {"selection_size": 3,
                                 "per_task": {"0": [18, 6, 0], "1": [18, 0, 6], "2": [12, 6, 6]}}
    # task guesses: task 0 all right (even -> 0, odd -> 0); tasks 1, 2: only the even label
    tia = d["task_id_accuracy"]
    assert tia["final"] == {"0": 100.0, "1": 50.0, "2": 50.0}
    assert tia["diagonal"] == {"0": 100.0, "1": 50.0, "2": 50.0}
    assert tia["final_mean"] == pytest.approx(200.0 / 3)
    assert d["method_traits"] == {"first_task_only": False, "trains_backbone": False, "class_statistics": False}
    assert res["metrics"]["faa"] == pytest.approx(100.0)


def test_summaries_absent_without_signal():
    assert D.prompt_usage({"final": {}, "diagonal": {}}, None) is None
    assert D.task_id_accuracy([[None, None], [None, None]]) is None
    # per-layer-and-head histograms (2 layers x 2 heads x 3 ids) are summed to one per task
    sel = {"final": {"0": [[[1, 0, 2], [0, 0, 1]], [[3, 0, 0], [0, 1, 0]]]}}
    assert D.prompt_usage(sel, 3) == {"selection_size": 3, "per_task": {"0": [4, 1, 3]}}


@pytest.mark.parametrize("name,expected", [
    ("aper", {"first_task_only": True, "trains_backbone": False, "class_statistics": True}),
    ("ranpac", {"first_task_only": True, "trains_backbone": False, "class_statistics": True}),
    ("ncm", {"first_task_only": False, "trains_backbone": False, "class_statistics": True}),
    ("finetune", {"first_task_only": False, "trains_backbone": True, "class_statistics": False}),
    ("l2p", {"first_task_only": False, "trains_backbone": False, "class_statistics": False}),
])
def test_method_traits(name, expected):
    p = prepare(make_tiny_config(name))
    assert D.method_traits(p.method, p.scenario.tasks) == expected
    marks = D.trait_marks(expected)
    assert ("¹" in marks, "ᴮ" in marks, "ˢ" in marks) == tuple(expected.values())
