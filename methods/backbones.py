"""Backbone creation: timm names (with tags), the CPU micro ViT, weights and their identity.

``create_backbone`` returns the frozen :class:`~methods.vit.PromptedViT` and a
:class:`BackboneInfo` that every result records: the timm architecture and tag, where the weights
came from, the checkpoint file and its SHA-256, and the parameter count.

Weight sources (``backbone.pretrained``):

* ``timm``: timm's pretrained weights for the (tagged) name, from the Hugging Face hub (or its
  local cache); fails with one sentence when neither is reachable, never falls back to random;
* ``file``: ``backbone.checkpoint``, loaded strictly in ``backbone.checkpoint_format``
  (timm / npz / ibot / dino / mocov3, or auto-detected; ``methods/checkpoints.py``);
* ``synthetic``: the micro ViT pretrained by the suite (``methods/pretrain.py``), cached on disk:
  on procedural classes disjoint from every CL task (``backbone.pretrain: procedural``) or on the
  benchmark's held-out training images (``backbone.pretrain: in_domain``);
* ``none``: random initialisation (seeded), for tests;
* ``auto``: ``synthetic`` for the micro ViT, ``file`` when a checkpoint is given, else ``timm``.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch

from benchmarks.config import BackboneConfig, ConfigError
from methods.checkpoints import sha256_file  # noqa: F401  (re-exported)
from methods.micro_vit import MICRO_CONFIGS, build_micro  # noqa: F401  (re-exported)
from methods.vit import PromptedViT



class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded; one sentence for the user."""


@dataclass
class BackboneInfo:
    """Identity of the backbone weights, stored in every result.json."""

    name: str
    architecture: str
    tag: Optional[str]
    source: str
    checkpoint: Optional[str]
    sha256: Optional[str]
    num_params: int
    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_version: str = timm.__version__
    checkpoint_format: Optional[str] = None  # the format a local file was read as (auto resolved)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)



def split_name(name: str) -> Tuple[str, Optional[str]]:
    """``vit_base_patch16_224.augreg_in21k`` -> (``vit_base_patch16_224``, ``augreg_in21k``)."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def is_known_backbone(name: str) -> bool:
    arch, _ = split_name(name)
    return arch in MICRO_CONFIGS or (arch in timm.list_models("vit_*") and arch.startswith("vit_"))


def build_model(name: str, drop_path: float = 0.0, pretrained: bool = False) -> torch.nn.Module:
    """The timm VisionTransformer for ``name`` with no classifier head."""
    arch, tag = split_name(name)
    if arch in MICRO_CONFIGS:
        return build_micro(arch, drop_path)
    if not is_known_backbone(name):
        raise ConfigError(f"unknown backbone '{name}'; use a timm ViT name such as vit_base_patch16_224[.tag] or one of {', '.join(MICRO_CONFIGS)}")
    if pretrained:
        _check_hub_reachable(name)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, drop_path_rate=drop_path)
    except Exception as e:
        if pretrained:
            raise BackboneError(
                f"could not download pretrained weights for '{name}' ({type(e).__name__}); pass a local file with --checkpoint PATH"
            ) from None
        raise


def _hub_file(name: str) -> Tuple[Optional[str], Optional[str]]:
    """(Hugging Face repo id, file name) timm would download for ``name``, if it uses the hub."""
    try:
        from timm.models import get_pretrained_cfg

        pc = get_pretrained_cfg(name)
    except Exception:
        return None, None
    hub_id = getattr(pc, "hf_hub_id", None) if pc is not None else None
    return hub_id, getattr(pc, "hf_hub_filename", None) or "model.safetensors"


def _cached_hub_file(name: str) -> Optional[str]:
    """Local path of the hub file timm loaded for ``name`` (None when not from the hub)."""
    hub_id, filename = _hub_file(name)
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for fn in (filename, "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id.split("@")[0], fn)
            if isinstance(found, str):
                return found
    except Exception:
        pass
    return None


def _check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one sentence, when timm would have to download from an unreachable
    hub; otherwise huggingface_hub retries for more than a minute before giving up.

    Skipped when the weights are in the local Hugging Face cache, or when ``HF_HUB_OFFLINE`` is
    set (then huggingface_hub itself only reads the cache).
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return
    hub_id, filename = _hub_file(name)
    if not hub_id:
        return  # timm downloads from a plain URL; its own error is reported
    if _cached_hub_file(name) is not None:
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise BackboneError(
            f"cannot download pretrained weights for '{name}': {host} is unreachable ({type(e).__name__}) and "
            f"hf-hub:{hub_id} is not in the local Hugging Face cache; pass a local file with --checkpoint PATH"
        ) from None


def resolve_source(cfg: BackboneConfig) -> str:
    arch, _ = split_name(cfg.name)
    if cfg.pretrained not in ("auto", "none", "timm", "file", "synthetic"):
        raise ConfigError(f"unknown backbone.pretrained '{cfg.pretrained}'; choose auto, none, timm, file or synthetic")
    if cfg.pretrained != "auto":
        return cfg.pretrained
    if cfg.checkpoint:
        return "file"
    return "synthetic" if arch in MICRO_CONFIGS else "timm"


def create_backbone(cfg: BackboneConfig, init_seed: int = 0, benchmark: Optional[Any] = None) -> Tuple[PromptedViT, BackboneInfo]:
    """Build the frozen PromptedViT described by ``cfg`` and record where its weights came from.

    ``benchmark`` (a BenchmarkConfig) is needed for ``backbone.pretrain=in_domain``: the micro
    ViT is then pretrained on that benchmark's held-out training images.
    """
    arch, tag = split_name(cfg.name)
    source = resolve_source(cfg)
    checkpoint: Optional[str] = None
    sha: Optional[str] = None
    ckpt_format: Optional[str] = None
    if source == "synthetic" and arch not in MICRO_CONFIGS:
        raise ConfigError(f"backbone.pretrained=synthetic is only available for {', '.join(MICRO_CONFIGS)}")
    if cfg.pretrain not in ("procedural", "in_domain"):
        raise ConfigError(f"unknown backbone.pretrain '{cfg.pretrain}'; choose procedural or in_domain")
    if source == "synthetic" and cfg.pretrain == "in_domain" and benchmark is None:
        raise ConfigError("backbone.pretrain=in_domain needs the benchmark whose held-out images it pretrains on")
    if source == "file" and not cfg.checkpoint:
        raise ConfigError("backbone.pretrained=file needs --checkpoint PATH")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # same random init for every method in a comparison
        model = build_model(cfg.name, cfg.drop_path, pretrained=(source == "timm"))
    if source == "timm":
        pc = getattr(model, "pretrained_cfg", {}) or {}
        tag = pc.get("tag", tag)
        checkpoint = pc.get("hf_hub_id") or pc.get("url") or None
        cached = _cached_hub_file(cfg.name)
        if cached is not None:  # the exact bytes timm loaded: hash them too
            sha = sha256_file(cached)
    elif source == "file":
        from methods.checkpoints import load_checkpoint_into

        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise BackboneError(f"checkpoint file not found: {path}")
        ckpt_format = load_checkpoint_into(model, path, cfg.checkpoint_format)
        checkpoint, sha = str(path), sha256_file(path)
    elif source == "synthetic":
        from methods.checkpoints import load_checkpoint_into
        from methods.pretrain import pretrained_in_domain_path, pretrained_micro_path

        if cfg.pretrain == "in_domain":
            path, tag = pretrained_in_domain_path(arch, benchmark), f"in_domain_pretrain:{benchmark.name}"
        else:
            path, tag = pretrained_micro_path(arch), "synthetic_pretrain"
        load_checkpoint_into(model, path, "timm")
        checkpoint, sha = str(path), sha256_file(path)
    backbone = PromptedViT(model)
    info = BackboneInfo(
        name=cfg.name,
        architecture=arch,
        tag=tag,
        source=source,
        checkpoint=checkpoint,
        sha256=sha,
        num_params=sum(p.numel() for p in model.parameters()),
        img_size=backbone.img_size,
        embed_dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=backbone.num_heads,
        checkpoint_format=ckpt_format,
    )
    return backbone, info
