"""Parameter-efficient modules that any method attaches to the shared :class:`PromptedViT`.

The first-session-adaptation methods (APER, RanPAC) and EASE tune small modules inside the frozen
ViT instead of prompting it. The three modules of their reference codes are here, once:

* :class:`AdapterPEFT` -- AdaptFormer's parallel adapter in every block (RanPAC
  ``petl/vision_transformer_adapter.py`` ``Adapter`` / ``Block``, identical in RevisitingCIL and
  CVPR24-Ease): ``x ← x + MLP(LN2(x)) + s·up(dropout(ReLU(down(x))))``, where ``x`` is the
  post-attention residual stream (no LayerNorm), bottleneck 64, s = 0.1, dropout 0.1, ``lora``
  init (down: kaiming-uniform a=√5, up and both biases zero);
* :class:`SSFPEFT` -- SSF's per-channel ``γ⊙x+β`` (``petl/vision_transformer_ssf.py``) after the
  patch projection, norm1, norm2, qkv, attn.proj, fc1 (before the activation), fc2 and the final
  norm; γ ~ N(1, 0.02), β ~ N(0, 0.02);
* :class:`VPTPEFT` -- VPT tokens (``petl/vpt.py``): zero-initialised, appended *after* the patch
  tokens with no positional embedding; ``deep`` gives every block its own tokens and drops them
  after that block, ``shallow`` inserts one set before block 0 and drops it after the last block.

How they attach, and why hooks: the reference codes each copy the ViT with the module built in.
Here the module registers forward hooks on the timm submodules of the one shared backbone, and the
hooks act only inside ``with module.active():``. Outside that block the backbone is bit-for-bit
timm's (so the protocol's frozen query pass and a method's "frozen branch" stay un-adapted), and
several modules (EASE: one adapter per task) can sit on the same backbone and be switched per pass.
The module's parameters belong to the module (so to the owning method's ``state_dict``), not to
the backbone. The hooks fire on every path of ``PromptedViT`` that calls the submodules: the
adapter and SSF hooks also on prefixed blocks; VPT's block hooks only on blocks run whole, so
VPT cannot be combined with prefixes on the same blocks (checked).

The first-session head of APER / RanPAC / EASE (``CosineLinear`` with a learnable σ) is
:class:`CosineHead`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.vit import PromptedViT

PEFT_KINDS = ("adapter", "ssf", "vpt_shallow", "vpt_deep")


class PEFT(nn.Module):
    """Base class: hooks on a backbone's submodules that act only inside :meth:`active`."""

    def __init__(self, backbone: PromptedViT) -> None:
        super().__init__()
        # the backbone is not a submodule: its weights must not appear in this module's state_dict
        # or parameter count (they belong to the method's ``backbone``)
        self.__dict__["_backbone"] = backbone
        self._on = False
        self._handles: List[Any] = []

    @property
    def backbone(self) -> PromptedViT:
        return self.__dict__["_backbone"]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Passes of the backbone inside this block are adapted by this module."""
        prev, self._on = self._on, True
        try:
            yield
        finally:
            self._on = prev

    def features(self, x: Tensor) -> Tensor:
        """Final [CLS] after the last norm of the adapted pass, (B, D)."""
        with self.active():
            return self.backbone(x)

    def detach_hooks(self) -> None:
        """Remove this module's hooks from the backbone."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, fn: Any, pre: bool = False) -> None:
        reg = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(reg(fn))


# --- Adapter -------------------------------------------------------------------------------

class ParallelAdapter(nn.Module):
    """AdaptFormer bottleneck without residual or LayerNorm: ``s·up(dropout(ReLU(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.dropout = dropout
        with torch.no_grad():  # the reference's "lora" init: the adapter starts as the zero map
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(h) * self.scale


class AdapterPEFT(PEFT):
    """One parallel adapter per block, reading the post-attention stream, added beside the MLP."""

    def __init__(self, backbone: PromptedViT, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        self.adapters = nn.ModuleList(ParallelAdapter(backbone.embed_dim, bottleneck, scale, dropout)
                                      for _ in range(backbone.depth))
        self._stream: List[Optional[Tensor]] = [None] * backbone.depth
        for i, blk in enumerate(backbone.vit.blocks):
            # norm2's input is the post-attention residual stream x of the reference's Block
            self._hook(blk.norm2, self._capture(i), pre=True)
            # ls2 (identity for ViT-B/16 and the micro ViT) is the last module before the residual
            # add; its output is MLP(LN2(x)), so adding the adapter there gives the reference's sum
            self._hook(blk.ls2, self._add(i))

    def _capture(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            if self._on:
                self._stream[i] = args[0]
        return hook

    def _add(self, i: int):
        def hook(module: nn.Module, args: Any, out: Tensor) -> Optional[Tensor]:
            if not self._on:
                return None
            x, self._stream[i] = self._stream[i], None
            return out + self.adapters[i](x).to(out.dtype)
        return hook


# --- SSF -----------------------------------------------------------------------------------

class ScaleShift(nn.Module):
    """Per-channel ``γ⊙x+β`` on the last dimension (dimension 1 for an NCHW conv output)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[-1] != self.scale.shape[0]:
            return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return x * self.scale + self.shift


class SSFPEFT(PEFT):
    """SSF after the patch projection, in every block (norm1, qkv, attn.proj, norm2, fc1, fc2) and
    after the final norm, as ``petl/vision_transformer_ssf.py`` places them."""

    def __init__(self, backbone: PromptedViT) -> None:
        super().__init__(backbone)
        vit = backbone.vit
        sites = [("patch", vit.patch_embed.proj, vit.patch_embed.proj.out_channels)]
        for i, blk in enumerate(vit.blocks):
            sites += [
                (f"b{i}_norm1", blk.norm1, backbone.embed_dim),
                (f"b{i}_qkv", blk.attn.qkv, blk.attn.qkv.out_features),
                (f"b{i}_proj", blk.attn.proj, blk.attn.proj.out_features),
                (f"b{i}_norm2", blk.norm2, backbone.embed_dim),
                (f"b{i}_fc1", blk.mlp.fc1, blk.mlp.fc1.out_features),
                (f"b{i}_fc2", blk.mlp.fc2, blk.mlp.fc2.out_features),
            ]
        sites.append(("norm", vit.norm, backbone.embed_dim))
        self.ssf = nn.ModuleDict({name: ScaleShift(dim) for name, _, dim in sites})
        for name, module, _ in sites:
            self._hook(module, self._apply(name))

    def _apply(self, name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> Optional[Tensor]:
            return self.ssf[name](out).to(out.dtype) if self._on else None
        return hook


# --- VPT -----------------------------------------------------------------------------------

class VPTPEFT(PEFT):
    """VPT-Deep (tokens per block) or VPT-Shallow (one set), appended after the patch tokens."""

    def __init__(self, backbone: PromptedViT, num_tokens: int = 5, deep: bool = True) -> None:
        super().__init__(backbone)
        self.deep = deep
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.zeros(backbone.depth if deep else 1, num_tokens, backbone.embed_dim))
        blocks = backbone.vit.blocks
        for i, blk in enumerate(blocks):
            if deep or i == 0:
                self._hook(blk, self._append(i if deep else 0), pre=True)
            if deep or i == len(blocks) - 1:
                self._hook(blk, self._strip)

    def _append(self, slot: int):
        def hook(module: nn.Module, args: Any) -> Optional[tuple]:
            if not self._on:
                return None
            x = args[0]
            t = self.tokens[slot].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat([x, t], dim=1),) + tuple(args[1:])
        return hook

    def _strip(self, module: nn.Module, args: Any, out: Tensor) -> Optional[Tensor]:
        return out[:, : out.shape[1] - self.num_tokens] if self._on else None


# --- factory and the first-session head ------------------------------------------------------

def build_peft(kind: str, backbone: PromptedViT, bottleneck: int = 64, adapter_scale: float = 0.1,
               adapter_dropout: float = 0.1, vpt_tokens: int = 5) -> PEFT:
    """The module named ``kind`` (one of :data:`PEFT_KINDS`), attached to ``backbone``."""
    if kind == "adapter":
        return AdapterPEFT(backbone, bottleneck, adapter_scale, adapter_dropout)
    if kind == "ssf":
        return SSFPEFT(backbone)
    if kind in ("vpt_shallow", "vpt_deep"):
        return VPTPEFT(backbone, vpt_tokens, deep=kind == "vpt_deep")
    raise ValueError(f"unknown PEFT module '{kind}'; use one of {', '.join(PEFT_KINDS)}")


class CosineHead(nn.Module):
    """``σ·cos(f, w_c)`` with a learnable σ (init 1) and weights U(±1/√D): the reference codes'
    ``CosineLinear`` used as the first-session training head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


# --- first-session adaptation (APER, RanPAC) -------------------------------------------------

def first_session_head(task_classes: int, dim: int) -> CosineHead:
    """The phase-1 head: a CosineLinear over the first task's classes only (so no logit masking
    is involved; the reference heads are ``update_fc(init_cls)``)."""
    return CosineHead(dim, task_classes)


def pad_logits(logits: Tensor, start: int, num_classes: int) -> Tensor:
    """Place a block of per-task logits at columns ``start..`` of a (B, num_classes) tensor whose
    other entries are -inf (they take no part in the softmax, as in a head of the task's size)."""
    full = logits.new_full((logits.shape[0], num_classes), float("-inf"))
    full[:, start : start + logits.shape[1]] = logits
    return full
