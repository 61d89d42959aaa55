"""Strict loading of local backbone checkpoints in the formats the reference codes use.

A checkpoint that does not load completely is an error, never a silent partial load: apart from
the projection / classifier head keys listed per format (the suite's methods own their heads),
every tensor of the model must come from the file with the right shape and every tensor of the
file's backbone part must be used. The error lists the missing, unexpected and mis-shaped keys.

Formats (``backbone.checkpoint_format``; ``auto`` detects them from the file's content):

``timm``
    A timm state dict: ``.safetensors``, or ``.bin`` / ``.pth`` / ``.pt`` (optionally nested under
    ``model`` or ``state_dict``), e.g. timm's ``vit_base_patch16_224.augreg2_in21k_ft_in1k``
    ``pytorch_model.bin`` that CODA-Prompt / SMoPE load. Ignored: ``head.*``, ``head_dist.*``,
    ``pre_logits.*``.
``npz``
    Google's JAX checkpoints, e.g. ``imagenet21k/ViT-B_16.npz`` (L2P, DualPrompt, HiDe Sup-21K),
    loaded by timm's own ``vision_transformer._load_weights``. Ignored: ``head/*`` and
    ``pre_logits/*`` (the 21k representation layer, which the reference codes also drop).
``dino``
    ``dino_vitbase16_pretrain.pth`` (a flat state dict with timm's key names), or a full DINO
    training checkpoint, whose ``teacher`` is used with the ``backbone.`` prefix stripped.
    Ignored: ``head.*`` (the DINO projection head).
``ibot``
    ``checkpoint_teacher.pth`` (``{'state_dict': ...}``, timm key names), or a full iBOT training
    checkpoint (e.g. the ImageNet-22k ``checkpoint.pth`` HiDe-Prompt uses), whose ``teacher`` is
    used with ``backbone.`` stripped, as HiDe's ``vit_base_patch16_224_21k_ibot`` does.
    Ignored: ``head.*`` (the iBOT projection heads).
``mocov3``
    MoCo v3's ``vit-b-300ep.pth.tar`` (``state_dict`` with ``module.base_encoder.*``; the
    momentum encoder and predictor are not the backbone and are skipped), or the DeiT-format
    conversion of it (``{'model': ...}``, timm key names). Ignored: ``head.*`` (the projection MLP).

The reference codes load these files non-strictly (HiDe-Prompt drops every key that does not
match, ``vits/hide_prompt_vision_transformer.py``); here the same key mapping is applied and any
other mismatch is an error.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor, nn


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


FORMATS = ("auto", "timm", "npz", "ibot", "dino", "mocov3")

# Keys a timm-format file may carry that the headless backbone does not use.
IGNORABLE_PREFIXES = ("head.", "head_dist.", "pre_logits.")
NPZ_IGNORABLE_PREFIXES = ("head/", "pre_logits/")
SSL_IGNORABLE_PREFIXES = ("head.",)  # DINO / iBOT / MoCo v3 projection heads


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded completely; the message names the offending keys."""


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- reading -------------------------------------------------------------------------------

def is_npz(path: Path) -> bool:
    """A NumPy ``.npz`` archive (a zip of ``.npy`` members; torch's zip files hold ``data.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_object(path: Path) -> Any:
    """The object stored in a ``.safetensors`` or torch file, read without executing code.

    torch files are read with ``weights_only=True``; ``argparse.Namespace`` is allowed because
    DINO and iBOT store their arguments in the training checkpoints.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path.name} ({type(e).__name__}: {first[:200]})") from None


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _unwrap(obj: Any, keys: Sequence[str] = ("model", "state_dict")) -> Any:
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _strip(state: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def read_state_dict(path: Path) -> Dict[str, Tensor]:
    """A timm-style state dict from .safetensors / .bin / .pt / .pth (nested under 'model' or
    'state_dict' is unwrapped)."""
    obj = _unwrap(read_object(path))
    if not _tensor_dict(obj):
        raise CheckpointError(f"checkpoint {Path(path).name} does not hold a state dict of tensors")
    return obj


def detect_format(path: Path, obj: Any = None) -> str:
    """The checkpoint format of ``path`` from its content (see the module docstring)."""
    path = Path(path)
    if path.suffix != ".safetensors" and is_npz(path):
        return "npz"
    obj = read_object(path) if obj is None else obj
    if isinstance(obj, dict):
        if isinstance(obj.get("teacher"), dict):
            return "ibot" if "ibot_loss" in obj or any("last_layer2" in k for k in obj["teacher"]) else "dino"
        sd = obj.get("state_dict")
        if isinstance(sd, dict) and any(k.startswith("module.base_encoder.") for k in sd):
            return "mocov3"
    return "timm"


def extract_backbone(obj: Any, fmt: str, name: str) -> Tuple[Dict[str, Tensor], Tuple[str, ...]]:
    """Apply ``fmt``'s key mapping: (state dict with timm key names, ignorable key prefixes)."""
    if fmt == "timm":
        state = _unwrap(obj)
        ignorable = IGNORABLE_PREFIXES
    elif fmt in ("dino", "ibot"):
        if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
            state = _strip(obj["teacher"], "module.")  # a DDP-wrapped teacher
            plain = [k for k in state if not k.startswith(("backbone.", "head."))]
            if plain:
                raise CheckpointError(f"the teacher of {name} has keys outside backbone.* and head.*: {_short(plain)}")
            state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
        else:
            state = _unwrap(obj, ("state_dict", "model"))
        ignorable = SSL_IGNORABLE_PREFIXES
    elif fmt == "mocov3":
        sd = obj.get("state_dict") if isinstance(obj, dict) else None
        if isinstance(sd, dict) and any(k.startswith("module.base_encoder.") for k in sd):
            state = {k[len("module.base_encoder."):]: v for k, v in sd.items() if k.startswith("module.base_encoder.")}
        elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            state = obj["model"]
        else:
            raise CheckpointError(f"{name} is not a MoCo v3 checkpoint (no state_dict with module.base_encoder.* keys "
                                  f"and no DeiT-format 'model')")
        ignorable = SSL_IGNORABLE_PREFIXES
    else:
        raise CheckpointError(f"unknown checkpoint format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not _tensor_dict(state):
        raise CheckpointError(f"{name} does not hold a state dict of tensors in the {fmt} layout")
    return state, ignorable


# --- strict loading ------------------------------------------------------------------------

def load_strict(model: nn.Module, state: Dict[str, Tensor], source: str = "checkpoint",
                ignorable: Sequence[str] = IGNORABLE_PREFIXES) -> None:
    """Load ``state`` into ``model``; raise :class:`CheckpointError` on anything incomplete."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignorable))}
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
        problems.append(f"shape mismatches (file vs model): {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match the backbone; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def google_npz_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the arrays a Google ViT ``.npz`` holds for ``model`` (no head).

    timm's ``_load_weights`` reads these names but ignores any others, and silently resamples
    patch and position embeddings of other sizes; this inventory lets the loader reject both.
    """
    d = model.embed_dim
    blk = model.blocks[0]
    h = blk.attn.num_heads
    hd = d // h
    m = blk.mlp.fc1.out_features
    out_c, in_c, ph, pw = model.patch_embed.proj.weight.shape
    shapes: Dict[str, Tuple[int, ...]] = {
        "embedding/kernel": (ph, pw, in_c, out_c),
        "embedding/bias": (d,),
        "cls": (1, 1, d),
        "Transformer/posembed_input/pos_embedding": tuple(model.pos_embed.shape),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
    }
    for i in range(len(model.blocks)):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}{ln}/scale"] = (d,)
            shapes[f"{b}{ln}/bias"] = (d,)
        a = f"{b}MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            shapes[f"{a}{n}/kernel"] = (d, h, hd)
            shapes[f"{a}{n}/bias"] = (h, hd)
        shapes[f"{a}out/kernel"] = (h, hd, d)
        shapes[f"{a}out/bias"] = (d,)
        shapes[f"{b}MlpBlock_3/Dense_0/kernel"] = (d, m)
        shapes[f"{b}MlpBlock_3/Dense_0/bias"] = (m,)
        shapes[f"{b}MlpBlock_3/Dense_1/kernel"] = (m, d)
        shapes[f"{b}MlpBlock_3/Dense_1/bias"] = (d,)
    return shapes


def load_npz_strict(model: nn.Module, path: Path) -> None:
    """Load a Google ViT ``.npz`` with timm's loader after checking its names and shapes."""
    import numpy as np
    from timm.models.vision_transformer import _load_weights

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as w:
            found = {k: tuple(w[k].shape) for k in w.files}
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path.name} as .npz ({type(e).__name__}: {str(e)[:200]})") from None
    prefix = "opt/target/" if "opt/target/embedding/kernel" in found else ""
    if any(k.startswith("params/") for k in found) or f"{prefix}pos_embedding" in found:
        raise CheckpointError(f"{path.name} is a big_vision .npz; only the original Google ViT layout "
                              f"(Transformer/encoderblock_<i>/...) is supported")
    found = {k[len(prefix):]: s for k, s in found.items() if k.startswith(prefix)}
    found = {k: s for k, s in found.items() if not k.startswith(NPZ_IGNORABLE_PREFIXES)}
    expected = google_npz_shapes(model)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems = [f"{what}: {_short(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (file vs model)", wrong)) if keys]
    if problems:
        raise CheckpointError(f"checkpoint {path.name} does not match the backbone; " + "; ".join(problems))
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.fill_(math.nan)  # sentinel: anything the loader does not write stays NaN
        try:
            _load_weights(model, str(path), prefix)
        except Exception as e:
            raise CheckpointError(f"timm could not load {path.name} ({type(e).__name__}: {str(e)[:200]})") from None
    unset = [k for k, v in model.state_dict().items() if v.is_floating_point() and torch.isnan(v).any()]
    if unset:
        raise CheckpointError(f"checkpoint {path.name} does not match the backbone; missing keys: {_short(unset)}")


def load_checkpoint_into(model: nn.Module, path: Path, fmt: str = "auto") -> str:
    """Load the local checkpoint ``path`` of format ``fmt`` into the headless timm ViT ``model``.

    Returns the format used (``auto`` resolved). Raises :class:`CheckpointError` with the
    offending keys when the file does not cover the backbone exactly.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "npz" or (fmt == "auto" and path.suffix != ".safetensors" and is_npz(path)):
        load_npz_strict(model, path)
        return "npz"
    obj = read_object(path)
    if fmt == "auto":
        fmt = detect_format(path, obj)
    state, ignorable = extract_backbone(obj, fmt, path.name)
    load_strict(model, state, source=f"checkpoint {path.name} ({fmt} format)", ignorable=ignorable)
    return fmt
