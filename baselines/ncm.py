"""NCM / SimpleCIL: nearest class mean on frozen features, no training at all.

After each task the prototype of every new class is the mean of the frozen [CLS] features of its
training images under the *test* transform (SimpleCIL, Zhou et al. 2023); prediction is the
cosine similarity to every prototype. Unseen classes have zero prototypes and are masked anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import ContinualMethod, MethodOutput, Phase, Task
from methods.registry import register_method


@register_method("ncm", baseline=True)
class NCM(ContinualMethod):
    """Class prototypes of frozen features; cosine-similarity classifier."""

    @dataclass
    class Config:
        pass

    uses_query = True

    def __init__(self, backbone, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.register_buffer("prototypes", torch.zeros(num_classes, backbone.embed_dim))

    def phases(self, task: Task) -> List[Phase]:
        return []  # nothing is trained

    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        feat = self.get_query(x, query)
        logits = F.normalize(feat, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        return MethodOutput(logits=logits, features=feat)

    @torch.no_grad()
    def end_task(self, task: Task, ctx: Any) -> None:
        feats, labels = ctx.query_features(self, transform="test")
        for c in labels.unique().tolist():
            self.prototypes[c] = feats[labels == c].mean(0).to(self.prototypes.device)
