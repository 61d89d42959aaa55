"""Sequential fine-tuning: backbone and head trained task after task (the lower bound).

With the protocol's default ``train.train_mask=current`` this is CODA-Prompt's "FT++" (past-class
logits masked); ``--set train.train_mask=seen`` gives CODA's plain "FT". Nothing protects earlier
tasks, so it forgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from methods.base import ContinualMethod, MethodOutput
from methods.registry import register_method


@register_method("finetune", baseline=True)
class Finetune(ContinualMethod):
    """Full fine-tuning of the ViT and a linear head, sequentially over tasks."""

    @dataclass
    class Config:
        head_lr_mult: float = 1.0  # lr multiplier of the head relative to the backbone

    def __init__(self, backbone, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        backbone.set_trainable(True)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def param_groups(self):
        return [
            {"params": list(self.backbone.parameters()), "lr_mult": 1.0, "name": "backbone"},
            {"params": list(self.head.parameters()), "lr_mult": self.cfg.head_lr_mult, "name": "head"},
        ]

    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        feat = self.backbone(x)
        return MethodOutput(logits=self.head(feat), features=feat)
