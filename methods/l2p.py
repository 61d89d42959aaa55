"""L2P (Wang et al., CVPR'22) and CODA-Prompt's L2P++ / Deep L2P++ reimplementations.

Three variants behind ``method.variant``:

* ``l2p`` (default): the l2p-pytorch Split CIFAR-100 configuration
  (JH-LEE-KR/l2p-pytorch ``configs/cifar100_l2p.py``, ``prompt.py``, ``vision_transformer.py``,
  ``engine.py``). A pool of M=10 prompts of length 5 with learnable keys; each sample picks the
  top-5 keys by cosine similarity with its frozen query [CLS]; the 25 selected prompt tokens are
  inserted after [CLS] at the input (prompt-tuning); the head reads the **mean of the prompt
  tokens' final outputs** (``head_type='prompt'``). In the port every prompt token gets a copy of
  the [CLS] positional embedding (the frozen ``pos_embed`` is enlarged at load time,
  ``resize_pos_embed``); the JAX code (google-research/l2p ``models/vit.py``) prepends the prompts
  after the positional embedding, i.e. gives them none: ``prompt_pos_embed: none``. (The JAX
  order [prompts, CLS, patches] vs the port's [CLS, prompts, patches] does not matter: without
  a positional embedding, attention is permutation-equivariant.)
  Loss: CE − λ·(1/B)·Σ_b Σ_{i∈sel(b)} cos(q_b, k_i), λ=0.1 (``pull_loss: l2p``).
  Init U(-1,1) (``init: port``; the JAX code uses U[0,0.01): ``init: jax``, and a zero head:
  ``head_init: zeros``).
* ``l2p++`` and ``deep_l2p++``: GT-RIPL/CODA-Prompt ``models/zoo.py::L2P`` (a subclass of its
  ``DualPrompt``), run with ``--prompt_param 30 20 -1`` (shallow) / ``30 20 1`` (deep).
  Prefix-tuning instead of prompt-tuning; a prompt of length 20 holds 10 key and 10 value tokens
  (CODA's convention: the first ``length//2`` rows are keys); pool 30, per-sample top-5, so layer
  0 gets 50 key + 50 value prefix tokens; the deep variant has a separate pool *and key set* on
  each of layers 0–4, each matched independently. Head on [CLS]. Init U(0,1) (``tensor_prompt``).
  Pull loss as CODA computes it, ``(1 − cos_sim[:, k_idx]).sum()`` with ``k_idx`` of shape
  (B, k): the indexing makes a (B, B, k) tensor, so every sample's query is pulled toward every
  other sample's selected keys (``pull_loss: coda_pairs``, the default; baselines.md §1.4). CODA
  trained with ``DataParallel`` on 4 GPUs, so that sum ran within each GPU's quarter of the batch
  and the four partial sums were added: ``pull_chunks: 4`` reproduces it (the ``coda`` preset
  sets it). ``pull_loss: coda_per_sample`` is the intended per-sample form
  Σ_b Σ_{i∈sel(b)} (1 − cos(q_b, k_i)).

Options of the reference codes: ``use_prompt_mask`` (train-time only: task t uses prompts
[t·k, (t+1)·k), dropped when that range runs past the pool), ``shared_prompt_pool`` /
``shared_prompt_key`` (slot t copied from slot t−1 at the start of task t; l2p-pytorch
``engine.py::train_and_evaluate``), and the batch-wise majority vote ``batchwise_prompt``
(l2p-pytorch's CIFAR config has it on, in training *and* at test time). The vote makes a
sample's prediction depend on the rest of its batch, so it is off by default here and is an
explicit, labelled option (DESIGN.md §4, google-research/l2p#28).

Numbers whose meaning depends on the variant are left ``None`` in the config and filled in by
:meth:`Config.validate` from ``VARIANT_DEFAULTS``, so the dumped run config always shows them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from benchmarks.config import ConfigError
from methods.base import ContinualMethod, MethodOutput, Task
from methods.prompts import HEAD_INITS, cosine_similarity_matrix, init_head, select_topk
from methods.registry import register_method
from methods.vit import PromptedViT, prefix_from_kv

# Per-variant defaults of the settings left None in the config (sources in the module docstring).
VARIANT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "l2p": dict(pool_size=10, length=5, pull_coeff=0.1, pull_loss="l2p", init="port", head="prompt", prefix_layers=[],
                head_init="timm"),
    "l2p++": dict(pool_size=30, length=20, pull_coeff=1.0, pull_loss="coda_pairs", init="coda", head="token",
                  prefix_layers=[0], head_init="torch"),
    "deep_l2p++": dict(pool_size=30, length=20, pull_coeff=1.0, pull_loss="coda_pairs", init="coda", head="token",
                       prefix_layers=[0, 1, 2, 3, 4], head_init="torch"),
}

# Uniform initialisation ranges of prompts and keys.
INIT_RANGES: Dict[str, tuple] = {
    "port": (-1.0, 1.0),  # l2p-pytorch / dualprompt-pytorch: nn.init.uniform_(p, -1, 1)
    "jax": (0.0, 0.01),  # google-research/l2p: flax.linen.initializers.uniform() = U[0, 0.01)
    "coda": (0.0, 1.0),  # CODA-Prompt tensor_prompt: nn.init.uniform_(p) = U[0, 1)
    "zero": (0.0, 0.0),
}

PULL_LOSSES = ("l2p", "coda_pairs", "coda_per_sample")


def check_pool_options(cfg) -> None:
    """The checks shared by the key-matched prompt pools (L2P here, DualPrompt's E-pool): top-k
    within the pool, a known pull loss and init range, at least one pull chunk."""
    if not 1 <= cfg.top_k <= cfg.pool_size:
        raise ConfigError(f"method.top_k must lie between 1 and method.pool_size ({cfg.pool_size})")
    if cfg.pull_loss not in PULL_LOSSES:
        raise ConfigError(f"unknown method.pull_loss '{cfg.pull_loss}'; choose one of {', '.join(PULL_LOSSES)}")
    if cfg.pull_chunks < 1:
        raise ConfigError("method.pull_chunks must be at least 1")
    if cfg.init not in INIT_RANGES:
        raise ConfigError(f"unknown method.init '{cfg.init}'; choose one of {', '.join(INIT_RANGES)}")


def pull_loss(sim: Tensor, idx: Tensor, kind: str, chunks: int = 1) -> Tensor:
    """Key–query pull loss (to be multiplied by the pull coefficient).

    ``sim`` (B, M) cosine similarities between queries and keys, ``idx`` (B, k) selected keys.

    * ``l2p``: −(1/B)·Σ_b Σ_j cos(q_b, k_{idx[b,j]}) (l2p-pytorch / dualprompt-pytorch
      ``reduce_sim``, subtracted from the CE);
    * ``coda_per_sample``: Σ_b Σ_j (1 − cos(q_b, k_{idx[b,j]}));
    * ``coda_pairs``: Σ_b Σ_{b'} Σ_j (1 − cos(q_b, k_{idx[b',j]})), CODA's ``cos_sim[:, k_idx]``
      indexing, summed within each of ``chunks`` consecutive parts of the batch (DataParallel).
    """
    if kind == "l2p":
        return -sim.gather(1, idx).sum() / sim.shape[0]
    if kind == "coda_per_sample":
        return (1.0 - sim.gather(1, idx)).sum()
    if kind == "coda_pairs":
        return sum((1.0 - s[:, i]).sum() for s, i in zip(sim.chunk(chunks), idx.chunk(chunks)))
    raise ValueError(f"unknown pull loss '{kind}'")


def fp32_similarity(query: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarities in fp32 even under bf16 autocast, so top-k ties do not depend on precision."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        return cosine_similarity_matrix(query.float(), keys.float())


@register_method("l2p")
class L2P(ContinualMethod):
    """L2P (+ CODA's L2P++ / Deep L2P++ variants): key–query prompt pool, per-sample top-N, pull loss."""

    @dataclass
    class Config:
        variant: str = "l2p"  # l2p (l2p-pytorch) | l2p++ | deep_l2p++ (CODA-Prompt's reimplementations)
        pool_size: Optional[int] = None  # prompts per pool (l2p 10, ++ 30)
        length: Optional[int] = None  # l2p: prompt tokens per prompt (5); ++: key+value tokens (20 = 10 K + 10 V)
        top_k: int = 5
        pull_coeff: Optional[float] = None  # l2p 0.1, ++ 1.0
        pull_loss: Optional[str] = None  # l2p | coda_pairs | coda_per_sample (see pull_loss())
        pull_chunks: int = 1  # coda_pairs: sum within this many batch chunks (CODA: 4 GPUs)
        init: Optional[str] = None  # port U(-1,1) | jax U[0,0.01) | coda U[0,1) | zero
        head: Optional[str] = None  # prompt (mean of prompt-token outputs) | token ([CLS]) | token+prompt
        head_init: Optional[str] = None  # timm (ports: trunc_normal .02, zero bias) | torch (CODA: nn.Linear) | zeros (JAX)
        prompt_pos_embed: str = "cls"  # l2p: cls (port, [CLS] positional embedding) | none (JAX)
        prefix_layers: Optional[List[int]] = None  # ++: blocks with a pool ([0]; deep [0..4])
        batchwise_prompt: bool = False  # batch-wise majority vote (l2p-pytorch CIFAR: True); explicit option
        use_prompt_mask: bool = False  # train-time: task t uses prompts [t·k, (t+1)·k)
        shared_prompt_pool: bool = False  # copy prompt slot t-1 -> t at the start of task t
        shared_prompt_key: bool = False  # copy key slot t-1 -> t at the start of task t

        def validate(self) -> None:
            """Fill the variant-dependent defaults and check every setting (ConfigError)."""
            if self.variant not in VARIANT_DEFAULTS:
                raise ConfigError(f"unknown method.variant '{self.variant}'; choose one of {', '.join(VARIANT_DEFAULTS)}")
            for key, value in VARIANT_DEFAULTS[self.variant].items():
                if getattr(self, key) is None:
                    setattr(self, key, list(value) if isinstance(value, list) else value)
            prompt_tuning = self.variant == "l2p"
            if self.pool_size < 1 or self.length < 1:
                raise ConfigError("method.pool_size and method.length must be at least 1")
            check_pool_options(self)
            heads = ("prompt", "token", "token+prompt") if prompt_tuning else ("token",)
            if self.head not in heads:
                raise ConfigError(f"method.head '{self.head}' is not available for variant {self.variant}; choose {' or '.join(heads)}")
            if self.head_init not in HEAD_INITS:
                raise ConfigError(f"unknown method.head_init '{self.head_init}'; choose {', '.join(HEAD_INITS)}")
            if self.prompt_pos_embed not in ("cls", "none"):
                raise ConfigError(f"unknown method.prompt_pos_embed '{self.prompt_pos_embed}'; choose cls or none")
            if prompt_tuning and self.prefix_layers:
                raise ConfigError("variant l2p inserts prompt tokens at the input; method.prefix_layers is only for l2p++ / deep_l2p++")
            if not prompt_tuning and (not self.prefix_layers or len(set(self.prefix_layers)) != len(self.prefix_layers)):
                raise ConfigError("method.prefix_layers must list distinct block indices")
            if not prompt_tuning and self.length < 2:
                raise ConfigError("method.length of a prefix prompt must be at least 2 (key and value tokens)")

    uses_query = True

    def __init__(self, backbone: PromptedViT, num_classes: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, cfg)
        cfg.validate()
        self.selection_size = cfg.pool_size
        self.prompt_tuning = cfg.variant == "l2p"
        d = backbone.embed_dim
        if not self.prompt_tuning and max(cfg.prefix_layers) >= backbone.depth:
            raise ConfigError(f"method.prefix_layers {cfg.prefix_layers} exceed the backbone's {backbone.depth} blocks")
        low, high = INIT_RANGES[cfg.init]
        n_pools = 1 if self.prompt_tuning else len(cfg.prefix_layers)
        # One pool and one key set per prompted layer (CODA's e_p_<l> / e_k_<l>); l2p has one of each.
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(cfg.pool_size, cfg.length, d).uniform_(low, high)) for _ in range(n_pools)]
        )
        self.keys = nn.ParameterList(
            [nn.Parameter(torch.empty(cfg.pool_size, d).uniform_(low, high)) for _ in range(n_pools)]
        )
        self.head = init_head(nn.Linear(d, num_classes), cfg.head_init)

    # -- life cycle ---------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        t, k = task.index, self.cfg.top_k
        # l2p-pytorch engine.py: copy only when both slots fit in the pool
        if t == 0 or (t + 1) * k > self.cfg.pool_size:
            return
        cur, prev = slice(t * k, (t + 1) * k), slice((t - 1) * k, t * k)
        with torch.no_grad():
            if self.cfg.shared_prompt_pool:
                for p in self.prompts:
                    p[cur] = p[prev]
            if self.cfg.shared_prompt_key:
                for key in self.keys:
                    key[cur] = key[prev]

    def _forced_slots(self, batch: int, device: torch.device) -> Optional[Tensor]:
        """use_prompt_mask: the current task's prompt ids (training only), or None."""
        if not (self.training and self.cfg.use_prompt_mask and self.current_task is not None):
            return None
        t, k = self.current_task.index, self.cfg.top_k
        if (t + 1) * k > self.cfg.pool_size:
            return None
        return torch.arange(t * k, (t + 1) * k, device=device).expand(batch, k)

    def _select(self, q: Tensor, pool: int) -> tuple:
        """(similarities (B, M), selected ids (B, k)) for one pool."""
        sim = fp32_similarity(q, self.keys[pool])
        idx = self._forced_slots(q.shape[0], q.device)
        if idx is None:
            idx = select_topk(sim, self.cfg.top_k, self.cfg.batchwise_prompt)
        return sim, idx

    def _cls_pos_embed(self) -> Tensor:
        """The [CLS] positional embedding (1, 1, D) the port gives every prompt token (zero if none)."""
        vit = self.backbone.vit
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "no_embed_class", False):
            return torch.zeros(1, 1, self.backbone.embed_dim, device=self.head.weight.device)
        return vit.pos_embed[:, :1]

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        cfg = self.cfg
        q = self.get_query(x, query)
        sims, picks = [], []
        if self.prompt_tuning:
            sim, idx = self._select(q, 0)
            sims.append(sim)
            picks.append(idx)
            tokens = self.prompts[0][idx].flatten(1, 2)  # (B, k·L, D)
            if cfg.prompt_pos_embed == "cls":
                tokens = tokens + self._cls_pos_embed().to(tokens.dtype)
            out = self.backbone.forward_features(x, prompt_tokens=tokens)
            n, p = self.backbone.num_prefix_tokens, tokens.shape[1]
            if cfg.head == "prompt":
                feat = out[:, n : n + p].mean(1)
            elif cfg.head == "token":
                feat = out[:, 0]
            else:  # token+prompt: [CLS] and the prompt tokens, averaged (l2p-pytorch head_type)
                feat = out[:, : n + p].mean(1)
        else:
            prefix = {}
            h = self.backbone.num_heads
            for j, layer in enumerate(cfg.prefix_layers):
                sim, idx = self._select(q, j)
                sims.append(sim)
                picks.append(idx)
                sel = self.prompts[j][idx]  # (B, k, L, D)
                half = cfg.length // 2  # CODA: the first int(L/2) rows are key tokens
                prefix[layer] = prefix_from_kv(sel[:, :, :half].flatten(1, 2), sel[:, :, half:].flatten(1, 2), h)
            feat = self.backbone(x, prefix=prefix)
        logits = self.head(feat)
        aux = None
        if self.training and cfg.pull_coeff:
            aux = cfg.pull_coeff * sum(pull_loss(s, i, cfg.pull_loss, cfg.pull_chunks) for s, i in zip(sims, picks))
        selection = picks[0] if len(picks) == 1 else torch.stack(picks, 1)  # (B, k) or (B, layers, k)
        return MethodOutput(logits=logits, aux_loss=aux, features=feat, diagnostics={"selection": selection})

    # -- cost and diagnostics -----------------------------------------------------------------
    def used_parameters(self) -> Optional[int]:
        """With ``use_prompt_mask``, prompt slots of tasks not started yet are untrained copies of
        their initialisation and are not counted (keys are: every key takes part in matching)."""
        if not self.cfg.use_prompt_mask or self.current_task is None:
            return None
        k, m = self.cfg.top_k, self.cfg.pool_size
        unused_slots = max(0, m - (self.current_task.index + 1) * k)
        total = sum(p.numel() for p in self.method_parameters())
        return total - unused_slots * sum(p[0].numel() for p in self.prompts)

    def diagnostics(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.prompt_tuning:
            return {"variant": cfg.variant, "prompt_tokens": cfg.top_k * cfg.length}
        half = cfg.length // 2
        return {"variant": cfg.variant, "prefix_layers": list(cfg.prefix_layers),
                "prefix_key_tokens": cfg.top_k * half, "prefix_value_tokens": cfg.top_k * (cfg.length - half)}
