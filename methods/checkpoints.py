"""Strict loading of local backbone checkpoints.

A checkpoint that does not load completely is an error, never a silent partial load: apart from
the classifier head keys (the suite's methods own their heads), every key of the model must be
present with the right shape and every key of the file must be used. The error lists the keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List

import torch
from torch import Tensor, nn

# Keys a pretrained file may carry that the headless backbone does not use.
IGNORABLE_PREFIXES = ("head.", "head_dist.", "pre_logits.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded completely; the message names the offending keys."""


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path: Path) -> Dict[str, Tensor]:
    """Read a timm-style state dict from .safetensors / .bin / .pt / .pth (nested under
    'model', 'state_dict' or 'teacher' is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return obj


def load_strict(model: nn.Module, state: Dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; raise :class:`CheckpointError` on anything incomplete."""
    state = {k: v for k, v in state.items() if not k.startswith(IGNORABLE_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems: List[str] = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match the backbone; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint_into(model: nn.Module, path: Path, fmt: str = "auto") -> None:
    """Load a local checkpoint file of format ``fmt`` into the headless timm ViT ``model``."""
    path = Path(path)
    if fmt not in ("auto", "timm"):
        raise CheckpointError(f"checkpoint format '{fmt}' is not supported yet")
    load_strict(model, read_state_dict(path), source=f"checkpoint {path.name}")
