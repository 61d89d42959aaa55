"""PromptedViT: a frozen timm VisionTransformer with one prompt-injection point per block.

Every method in the suite uses this wrapper instead of a copied ViT. It supports

* **prompt-tuning**: prompt tokens inserted after the prefix tokens ([CLS]) at the input (L2P);
* **prefix-tuning**: per-layer key/value prefixes in post-projection, per-head space, concatenated
  in front of the layer's keys and values (DualPrompt, CODA-Prompt, HiDe-Prompt, SMoPE, ...);
* an **additive logit bias** on the prefix columns. SMoPE's proxy-score attention is a prefix
  whose keys are zero and whose bias is ``q̄·p_j/√d``;
* the **query pass**: an un-prompted, gradient-free forward that returns the final [CLS] after
  the last norm (the query of L2P / DualPrompt / CODA and the frozen feature of the baselines).

Attention always runs through ``F.scaled_dot_product_attention``. Blocks without a prefix run
timm's own ``Block.forward`` so that, with no prompts, the output is exactly timm's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm >= 1.0
    from timm.models.vision_transformer import Block, VisionTransformer
    from timm.layers import Attention
except ImportError:  # pragma: no cover - older timm layouts
    from timm.models.vision_transformer import Attention, Block, VisionTransformer


@dataclass
class Prefix:
    """Key/value prefix for one attention layer, in post-projection per-head space.

    Shapes: ``value`` is (B, H, P, d_h). ``key`` is (B, H, P, d_h) or ``None`` (all-zero keys,
    used together with ``bias``). ``bias`` is an additive logit bias for the P prefix columns,
    broadcastable to (B, H, N, P); a (B, H, 1, P) bias is the same for every query row.
    """

    key: Optional[Tensor]
    value: Tensor
    bias: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return self.value.shape[-2]


class PrefixProvider(Protocol):
    """A prefix that depends on the layer's queries (e.g. SMoPE's proxy-score routing).

    ``layers`` lists the block indices that get a prefix; ``__call__(layer, q)`` receives the
    layer's per-head queries ``q`` (B, H, N, d_h) and returns that layer's :class:`Prefix`.
    """

    layers: Collection[int]

    def __call__(self, layer: int, q: Tensor) -> Optional[Prefix]: ...


PrefixSpec = Union[Mapping[int, Prefix], PrefixProvider, None]


def to_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, P, D) -> (B, H, P, D/H): split a width-D prefix into per-head vectors."""
    b, p, d = t.shape
    return t.reshape(b, p, num_heads, d // num_heads).transpose(1, 2)


def prefix_attention(attn: Attention, x: Tensor, layer: int, prefix: PrefixSpec) -> Tensor:
    """timm ``Attention.forward`` with a key/value prefix and an optional prefix logit bias."""
    b, n, c = x.shape
    h, dh = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = prefix(layer, q) if callable(prefix) else prefix.get(layer)
    mask = None
    if p is not None:
        pv = p.value.to(v.dtype).expand(b, -1, -1, -1)
        pk = torch.zeros_like(pv) if p.key is None else p.key.to(k.dtype).expand(b, -1, -1, -1)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        if p.bias is not None:
            bias = p.bias.to(q.dtype)
            rows = bias.shape[-2]
            bias = bias.expand(b, h, rows, p.length)
            # Zero bias on the token columns; a (B, H, 1, P+N) mask broadcasts over the query
            # rows, so it costs O(P+N) memory per head instead of O(N·(P+N)).
            mask = torch.cat([bias, bias.new_zeros(b, h, rows, n)], dim=-1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    out = out.transpose(1, 2).reshape(b, n, h * dh)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


class PromptedViT(nn.Module):
    """A timm VisionTransformer with prompt tokens, key/value prefixes and a query pass.

    The wrapped model's weights are frozen (``requires_grad=False``) unless ``trainable=True``,
    so no gradient is computed or stored for them; gradients still flow *through* them to the
    prompts. A frozen backbone also stays in eval mode (no dropout / drop-path) whatever mode
    the owning method is in.
    """

    def __init__(self, vit: VisionTransformer, trainable: bool = False) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"PromptedViT wraps a timm VisionTransformer, got {type(vit).__name__}")
        for blk in vit.blocks:
            if type(blk) is not Block or not isinstance(blk.attn, Attention):
                raise TypeError("PromptedViT supports timm's pre-norm Block with standard Attention")
        self.vit = vit
        self.trainable = trainable
        self.vit.requires_grad_(trainable)
        if not trainable:
            self.vit.eval()

    # -- geometry -------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def head_dim(self) -> int:
        return self.vit.blocks[0].attn.head_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        """Sequence length of an un-prompted pass (patches + [CLS] / register tokens)."""
        return self.vit.patch_embed.num_patches + self.num_prefix_tokens

    @property
    def img_size(self) -> int:
        return self.vit.patch_embed.img_size[0]

    def set_trainable(self, trainable: bool) -> None:
        """Unfreeze (fine-tuning baselines) or freeze the wrapped ViT."""
        self.trainable = trainable
        self.vit.requires_grad_(trainable)
        self.train(self.training)

    def reset_final_norm(self, eps: float = 1e-5) -> None:
        """Replace the pretrained final LayerNorm by a freshly initialised one (weight 1, bias 0).

        SLCA's backbone does this (``convs/vits.py`` ``vit_base_patch16_224_in21k``: ``del
        model.norm; model.norm = nn.LayerNorm(768)``, torch's default eps 1e-5) and then trains it
        with the rest of the ViT. It changes what every pass of this backbone returns, the query
        pass included, so only a method that owns and trains its backbone should call it.
        """
        norm = nn.LayerNorm(self.embed_dim, eps=eps).to(self.vit.norm.weight.device)
        norm.requires_grad_(self.trainable)
        self.vit.norm = norm

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        if not self.trainable:
            self.vit.eval()
        return self

    # -- passes ---------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding + positional embedding + [CLS] (timm's own code path)."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def forward_features(
        self,
        x: Tensor,
        prompt_tokens: Optional[Tensor] = None,
        prefix: PrefixSpec = None,
    ) -> Tensor:
        """Prompted pass. Returns all tokens after the final norm, (B, N [+ L], D).

        ``prompt_tokens`` (B, L, D) are inserted right after the prefix tokens ([CLS]) at the
        input; ``prefix`` maps block index -> :class:`Prefix`, or is a :class:`PrefixProvider`.
        """
        x = self.embed(x)
        if prompt_tokens is not None:
            n = self.num_prefix_tokens
            x = torch.cat([x[:, :n], prompt_tokens.to(x.dtype), x[:, n:]], dim=1)
        layers = () if prefix is None else (prefix.keys() if isinstance(prefix, Mapping) else prefix.layers)
        for i, blk in enumerate(self.vit.blocks):
            if i in layers:
                x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), i, prefix)))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            else:
                x = blk(x)
        return self.vit.norm(x)

    def forward(self, x: Tensor, prompt_tokens: Optional[Tensor] = None, prefix: PrefixSpec = None) -> Tensor:
        """Final [CLS] feature of the prompted pass, (B, D)."""
        return self.forward_features(x, prompt_tokens, prefix)[:, 0]

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """Un-prompted, gradient-free pass: the final [CLS] after the last norm, (B, D)."""
        was_training = self.vit.training
        self.vit.eval()
        try:
            return self.vit.forward_features(x)[:, 0]
        finally:
            self.vit.train(was_training)


def prefix_from_tokens(tokens: Tensor, num_heads: int) -> Prefix:
    """Split a (B, 2·L, D) prefix tensor (first half keys, second half values) into a Prefix.

    This is the CODA-Prompt / SMoPE convention where a prompt of length L holds L/2 key tokens
    and L/2 value tokens; DualPrompt-style (2, L, D) prompts use :func:`prefix_from_kv`.
    """
    half = tokens.shape[1] // 2
    return Prefix(key=to_heads(tokens[:, :half], num_heads), value=to_heads(tokens[:, half:], num_heads))


def prefix_from_kv(key: Tensor, value: Tensor, num_heads: int) -> Prefix:
    """Build a Prefix from (B, L, D) key tokens and (B, L, D) value tokens."""
    return Prefix(key=to_heads(key, num_heads), value=to_heads(value, num_heads))
