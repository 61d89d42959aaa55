"""Cost of a method: parameters (backbone, added, trainable), stored state, passes per image.

(FLOPs, throughput and memory are added by the cost-report work; see ``bench.py cost``.)
"""
from __future__ import annotations

from typing import Any, Dict

from methods.base import ContinualMethod


def parameter_counts(method: ContinualMethod) -> Dict[str, int]:
    """Backbone (frozen) parameters, parameters added by the method, and trainable ones now."""
    backbone = sum(p.numel() for p in method.backbone.parameters())
    added = sum(p.numel() for p in method.method_parameters())
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    buffers = sum(b.numel() for n, b in method.named_buffers() if not n.startswith("backbone."))
    return {"backbone_params": backbone, "added_params": added, "trainable_params": trainable, "state_numbers": buffers}


def run_cost(method: ContinualMethod, scenario: Any) -> Dict[str, Any]:
    """The cost block of result.json."""
    return {**parameter_counts(method), "query_pass": bool(method.uses_query)}
