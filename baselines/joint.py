"""Joint (cumulative) training: the upper bound.

After task t the model has been trained on the union of the training data of tasks 0..t with the
softmax over all seen classes (``ContinualMethod.joint`` tells the protocol), so every row of the
accuracy matrix is an upper bound for that step; the last row is joint training on all classes.
``finetune_backbone=true`` (default) fine-tunes the ViT too; false gives the joint linear probe
(RanPAC's "joint linear probe" row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from methods.base import ContinualMethod, MethodOutput
from methods.registry import register_method


@register_method("joint", baseline=True)
class Joint(ContinualMethod):
    """Trains on all data seen so far; not a continual learner, a reference point."""

    @dataclass
    class Config:
        finetune_backbone: bool = True

    joint = True

    def __init__(self, backbone, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.uses_query = not cfg.finetune_backbone
        if cfg.finetune_backbone:
            backbone.set_trainable(True)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        feat = self.backbone(x) if self.cfg.finetune_backbone else self.get_query(x, query)
        return MethodOutput(logits=self.head(feat), features=feat)
