"""Linear probe: a linear head on the frozen backbone's [CLS] feature ("no prompt").

The strong no-prompt baseline of dualprompt-pytorch#10 / google-research/l2p#35: frozen ViT +
linear head + the same logit masking as the prompt methods. It needs only the query pass, so the
protocol's query cache makes its evaluation nearly free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from methods.base import ContinualMethod, MethodOutput
from methods.registry import register_method


@register_method("linear_probe", baseline=True)
class LinearProbe(ContinualMethod):
    """Frozen features, one trainable linear head over all classes."""

    @dataclass
    class Config:
        pass

    uses_query = True

    def __init__(self, backbone, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        feat = self.get_query(x, query)
        return MethodOutput(logits=self.head(feat), features=feat)
