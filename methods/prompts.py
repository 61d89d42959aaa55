"""Shared building blocks of the prompt methods: key–query matching, selection, orthogonalisation.

Only what more than one method uses lives here; everything particular to a method stays in its
own file.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cosine_similarity_matrix(query: Tensor, keys: Tensor) -> Tensor:
    """(B, D) × (M, D) -> (B, M) cosine similarities (L2-normalised dot products)."""
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def select_topk(scores: Tensor, k: int, batchwise: bool = False) -> Tensor:
    """Indices (B, k) of the k highest scores per sample.

    ``batchwise=True`` is the l2p-pytorch / dualprompt-pytorch majority vote (``prompt.py``),
    computed with their exact calls so that the same scores give the same ids on the same device:
    ``torch.unique(idx, return_counts=True, sorted=True)``; when fewer than ``pool_size`` ids were
    picked, the ids are padded with the smallest picked id and the counts with 0 (their port of
    ``jnp.unique(size=..., fill_value=min)``); then ``torch.topk(counts, k)`` picks the ids, in
    torch.topk's order (ties are broken by torch.topk, not by id). Every sample gets those k ids. It
    makes the prediction of a sample depend on the other samples of its batch, so it exists only as
    an explicit, labelled option (DESIGN.md §4).
    """
    idx = scores.topk(k, dim=1).indices
    if not batchwise:
        return idx
    pool_size = scores.shape[1]
    ids, counts = torch.unique(idx, return_counts=True, sorted=True)
    if ids.shape[0] < pool_size:
        pad = pool_size - ids.shape[0]
        ids = torch.cat([ids, torch.full((pad,), int(idx.min()), dtype=ids.dtype, device=ids.device)])
        counts = torch.cat([counts, torch.zeros(pad, dtype=counts.dtype, device=counts.device)])
    major = torch.topk(counts, k=k).indices
    return ids[major].expand(scores.shape[0], -1)


def gram_schmidt(new: Tensor, existing: Optional[Tensor] = None) -> Tensor:
    """Orthonormalise the rows of ``new`` (m, d) against ``existing`` (n, d) rows and each other.

    ``existing`` rows are assumed orthonormal (each earlier task's slice was produced by this
    function). Two passes of classical Gram–Schmidt ("twice is enough") keep the result
    orthogonal to float precision.
    """
    basis = [] if existing is None or existing.numel() == 0 else list(existing.double())
    out = []
    for v in new.double():
        for _ in range(2):
            for b in basis + out:
                v = v - (v @ b) * b
        n = v.norm()
        if n < 1e-10:
            raise ValueError("Gram–Schmidt met a linearly dependent vector; re-draw it")
        out.append(v / n)
    return torch.stack(out).to(new.dtype)


def uniform_parameter(*shape: int, low: float = 0.0, high: float = 1.0) -> nn.Parameter:
    """A parameter initialised U[low, high) (CODA / SMoPE ``tensor_prompt`` default is U[0,1))."""
    p = nn.Parameter(torch.empty(*shape))
    nn.init.uniform_(p, low, high)
    return p


HEAD_INITS = ("torch", "timm", "zeros")


def init_head(head: nn.Linear, mode: str) -> nn.Linear:
    """Initialise a classifier head as the method's reference does.

    * ``torch``: PyTorch's own ``nn.Linear`` init (kaiming-uniform weight and U(±1/√D) bias): the
      CODA-Prompt code base (``models/zoo.py`` ``self.last = nn.Linear(768, C)``), SMoPE, VQ-Prompt;
    * ``timm``: trunc_normal(std 0.02) weight and zero bias: the head the JH-LEE-KR ports and
      HiDe-Prompt build inside their VisionTransformer, whose ``init_weights`` applies timm's
      ``init_weights_vit_timm`` to every Linear (the head is not in the ViT checkpoint);
    * ``zeros``: the JAX L2P / DualPrompt head (flax ``Dense`` with zero init).
    """
    if mode == "timm":
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    elif mode == "zeros":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif mode != "torch":
        raise ValueError(f"unknown head init '{mode}'; use {', '.join(HEAD_INITS)}")
    return head
