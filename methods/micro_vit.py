"""The suite's CPU-scale ViTs: their configs and builder.

A leaf module, so that both the backbone factory (methods/backbones.py) and the micro-ViT
pretraining (methods/pretrain.py) build the same model without importing each other.
"""
from __future__ import annotations

from typing import Any, Dict

import timm
import torch

# CPU-scale ViTs, built through timm's VisionTransformer (so every code path is timm's).
# Depth 6 so that every method's prompted layers (SMoPE: 0-5, CODA/HiDe: 0-4) exist.
MICRO_CONFIGS: Dict[str, Dict[str, Any]] = {
    "vit_micro_patch8_32": dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0, qkv_bias=True),
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0, qkv_bias=True),
}
_MICRO_BASE = "vit_tiny_patch16_224"  # only its class is used; every size argument is overridden


def build_micro(arch: str, drop_path: float = 0.0) -> torch.nn.Module:
    """The timm VisionTransformer of micro config ``arch``, without a classifier head."""
    return timm.create_model(_MICRO_BASE, pretrained=False, num_classes=0, drop_path_rate=drop_path, **MICRO_CONFIGS[arch])
