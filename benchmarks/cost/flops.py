"""Counting multiply-accumulates (MACs) of a forward pass and of its backward, with fvcore.

Units: one multiply-add = 1 MAC (fvcore's "flop"); 1 FLOP-as-in-papers = 2 MACs, so GFLOPs = 2 × GMACs.

What is counted (the *exact* count): every matrix product of the traced forward -- linear layers,
the patch-embedding convolution, ``matmul`` / ``bmm`` / ``einsum`` and the two products of
attention (QKᵀ and A·V) -- and nothing elementwise. fvcore counts 0 for
``aten::scaled_dot_product_attention`` (and ``torch.utils.flop_counter.FlopCounterMode`` counts 0
for the CPU kernel ``_scaled_dot_product_flash_attention_for_cpu``), so this module registers a
handle for it: with q (B, H, N, d), k (B, H, S, d), v (B, H, S, d_v) the products cost
B·H·N·S·d + B·H·N·S·d_v MACs, where S includes any key/value prefix. fvcore's LayerNorm handle
(a rough 5 operations per element) is switched off, so that the count is made of MACs only and a
plain ViT matches its closed form exactly; softmax, GELU and additions are ignored by fvcore anyway.

Backward MACs come from the same trace: the traced graph records which tensors require a gradient,
and for every product the gradient with respect to an operand that requires one costs as much as the
forward product (dX = dY·Wᵀ, dW = Xᵀ·dY). For attention, dV = Aᵀ·dO needs v's gradient, dA = dO·Vᵀ
is needed when q, k or an additive mask needs one, dQ = dS·K and dK = dSᵀ·Q when q / k do. This is
what autograd's math path executes (it is checked against FlopCounterMode on an explicit-attention
model in the tests); fused kernels additionally recompute QKᵀ in the backward, which we do not count.
Through a frozen backbone the backward therefore costs the input gradients only (≈ 1× the forward
products behind the earliest prompt), while fine-tuning also pays every weight gradient (≈ 2×).

The papers' convention (:class:`ModuleHookCounter`): the SMoPE poster's 33.72 GFLOPs per ViT-B/16
pass is reproduced by a counter that sees only modules -- ``nn.Linear`` (MACs + one bias add per
output feature), ``nn.Conv2d`` (MACs + bias adds), ``nn.LayerNorm`` and ``nn.GELU`` (one operation
per element) -- and not the attention products, which the reference ViTs compute with ``@``
(the rules of ptflops' module hooks up to v0.7.0); the sum is doubled into "GFLOPs".
See docs/cost.md for the derivation.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# fvcore op name -> the name under which its MACs are reported
_MAC_OP_NAMES = {
    "aten::linear": "linear",
    "aten::addmm": "linear",
    "aten::mm": "matmul",
    "aten::matmul": "matmul",
    "aten::bmm": "matmul",
    "aten::baddbmm": "matmul",
    "aten::einsum": "einsum",
    "aten::_convolution": "conv",
    "aten::scaled_dot_product_attention": "attention",
}
BACKWARD_PREFIX = "backward."

# Elementwise / bookkeeping ops that carry no MACs; listed so that fvcore does not warn about them.
_NO_MAC_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::gelu", "aten::softmax", "aten::log_softmax", "aten::layer_norm", "aten::batch_norm", "aten::group_norm",
    "aten::instance_norm", "aten::mean", "aten::sum", "aten::exp", "aten::log", "aten::sqrt", "aten::rsqrt",
    "aten::pow", "aten::neg", "aten::abs", "aten::sigmoid", "aten::tanh", "aten::topk", "aten::sort", "aten::argmax",
    "aten::argsort", "aten::norm", "aten::linalg_vector_norm", "aten::clamp_min", "aten::expand_as", "aten::repeat",
    "aten::masked_fill_", "aten::where", "aten::scatter", "aten::scatter_", "aten::ne", "aten::lt", "aten::le",
    "aten::max", "aten::min", "aten::amax", "aten::var", "aten::std", "aten::cumsum", "aten::one_hot",
    "aten::reciprocal", "aten::frobenius_norm", "aten::cosine_similarity", "aten::log1p", "aten::bucketize",
    "aten::index_select", "aten::take_along_dim", "aten::logsumexp", "aten::relu", "aten::silu", "aten::dropout",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
    "aten::fill_", "aten::zero_", "aten::clone", "aten::type_as", "aten::new_ones", "aten::randn", "aten::rand",
    "aten::normal", "aten::randn_like", "aten::rand_like", "aten::uniform_", "aten::bernoulli_", "aten::bincount",
    "aten::unflatten", "aten::movedim", "aten::square", "aten::all", "aten::any", "aten::isfinite",
    "prim::PythonOp", "aten::embedding", "aten::floor_divide_", "aten::lerp", "aten::addcmul", "aten::addcdiv",
)


# --- handles ---------------------------------------------------------------------------------

def _shape(v: Any) -> Optional[List[int]]:
    return list(v.type().sizes()) if v.isCompleteTensor() else None


def _requires_grad(v: Any) -> bool:
    """Whether a traced value is a tensor that requires a gradient (False for None / scalars)."""
    t = v.type()
    if isinstance(t, torch._C.TensorType):
        return bool(t.requires_grad())
    return False


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _product_macs(out_shape: Sequence[int], inner: int) -> int:
    """A (batched) matrix product costs one MAC per output element per contracted index."""
    return _prod(out_shape) * inner


def _linear(inputs, outputs) -> Tuple[int, int]:
    x, w = inputs[0], inputs[1]
    fwd = _product_macs(_shape(outputs[0]), _shape(w)[-1])
    return fwd, fwd * (_requires_grad(x) + _requires_grad(w))


def _addmm(inputs, outputs) -> Tuple[int, int]:
    a, b = inputs[1], inputs[2]
    fwd = _product_macs(_shape(outputs[0]), _shape(a)[-1])
    return fwd, fwd * (_requires_grad(a) + _requires_grad(b))


def _matmul(inputs, outputs) -> Tuple[int, int]:
    a, b = inputs[0], inputs[1]
    fwd = _product_macs(_shape(outputs[0]) or [1], _shape(a)[-1])
    return fwd, fwd * (_requires_grad(a) + _requires_grad(b))


def _baddbmm(inputs, outputs) -> Tuple[int, int]:
    a, b = inputs[1], inputs[2]
    fwd = _product_macs(_shape(outputs[0]), _shape(a)[-1])
    return fwd, fwd * (_requires_grad(a) + _requires_grad(b))


def _einsum(inputs, outputs) -> Tuple[int, int]:
    from fvcore.nn.jit_handles import einsum_flop_jit

    fwd = int(einsum_flop_jit(inputs, outputs))
    operands = list(inputs[1].node().inputs())
    # For a two-operand contraction the gradient of each operand is one product of the same size.
    return fwd, fwd * sum(_requires_grad(v) for v in operands)


def _conv(inputs, outputs) -> Tuple[int, int]:
    from fvcore.nn.jit_handles import conv_flop_count

    x, w = inputs[0], inputs[1]
    fwd = int(conv_flop_count(_shape(x), _shape(w), _shape(outputs[0]), transposed=bool(inputs[6].toIValue())))
    return fwd, fwd * (_requires_grad(x) + _requires_grad(w))


def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> Tuple[int, int]:
    """MACs of QKᵀ and of A·V for ``scaled_dot_product_attention`` (S includes any prefix)."""
    *batch, n, d = q_shape
    s, dv = k_shape[-2], v_shape[-1]
    b = _prod(batch)
    return b * n * s * d, b * n * s * dv


def _sdpa(inputs, outputs) -> Tuple[int, int]:
    q, k, v = inputs[0], inputs[1], inputs[2]
    qk, av = sdpa_macs(_shape(q), _shape(k), _shape(v))
    rq, rk, rv = _requires_grad(q), _requires_grad(k), _requires_grad(v)
    rmask = len(inputs) > 3 and _requires_grad(inputs[3])
    bwd = (av if rv else 0) + (av if (rq or rk or rmask) else 0) + (qk if rq else 0) + (qk if rk else 0)
    return qk + av, bwd


_RULES: Dict[str, Callable[[List[Any], List[Any]], Tuple[int, int]]] = {
    "aten::linear": _linear,
    "aten::addmm": _addmm,
    "aten::mm": _matmul,
    "aten::matmul": _matmul,
    "aten::bmm": _matmul,
    "aten::baddbmm": _baddbmm,
    "aten::einsum": _einsum,
    "aten::_convolution": _conv,
    "aten::scaled_dot_product_attention": _sdpa,
}


def _handle(op: str) -> Callable[[List[Any], List[Any]], Counter]:
    name = _MAC_OP_NAMES[op]
    rule = _RULES[op]

    def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
        fwd, bwd = rule(inputs, outputs)
        return Counter({name: int(fwd), BACKWARD_PREFIX + name: int(bwd)})

    return handle


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention`` (forward MACs only)."""
    return int(_sdpa(inputs, outputs)[0])


# --- FlopCounterMode formulas for the CPU attention kernels (FLOPs = 2 × MACs) --------------------

def _sdpa_cpu_fwd_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    qk, av = sdpa_macs(query_shape, key_shape, value_shape)
    return 2 * (qk + av)


def _sdpa_cpu_bwd_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    # The kernel returns dQ, dK and dV: four products (dV, dA, dQ, dK), the same rule as above
    # with every input requiring a gradient; the recomputation of QKᵀ is not counted.
    qk, av = sdpa_macs(query_shape, key_shape, value_shape)
    return 2 * (2 * av + 2 * qk)


def flop_counter_sdpa_mapping() -> Dict[Any, Callable[..., int]]:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode`` covering CPU attention."""
    ops = torch.ops.aten
    out: Dict[Any, Callable[..., int]] = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        out[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_fwd_flops
        out[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_bwd_flops
    return out


# --- the module-hook counter of the papers' convention --------------------------------------------

class ModuleHookCounter:
    """Counts operations the way hook-based counters (ptflops ≤ 0.7.0) do, while active.

    ``nn.Linear``: input elements × out_features + out_features (a bias add per output feature,
    once per call); ``nn.Conv1d/2d/3d``: output positions × (in_channels/groups × kernel) ×
    out_channels + out_channels × positions; ``nn.LayerNorm`` and ``nn.GELU``: one per element.
    Functional calls (attention's products, ``F.scaled_dot_product_attention``, einsum) are not
    seen. Written here rather than depending on ptflops because its later versions changed these
    rules (functional patching double-counts GELU) and the convention must stay fixed.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.total = 0
        self._handles: List[Any] = []

    def _linear(self, m: nn.Linear, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        # int(): under jit tracing sizes are traced values
        self.total += int(inp[0].numel()) * m.out_features + (m.out_features if m.bias is not None else 0)

    def _conv(self, m: nn.modules.conv._ConvNd, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        positions = int(out.shape[0]) * math.prod(int(s) for s in out.shape[2:])
        per_position = math.prod(m.kernel_size) * (m.in_channels // m.groups) * m.out_channels
        self.total += positions * per_position + (m.out_channels * positions if m.bias is not None else 0)

    def _elementwise(self, m: nn.Module, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        self.total += int(out.numel())

    def __enter__(self) -> "ModuleHookCounter":
        for m in self.root.modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._linear))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self._handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, (nn.LayerNorm, nn.GELU)):
                self._handles.append(m.register_forward_hook(self._elementwise))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --- shape-only kernels -------------------------------------------------------------------------------

def _zeros(shape: Sequence[Any], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.zeros([int(v) for v in shape], dtype=dtype or like.dtype, device=like.device)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    return _zeros([a.shape[0], b.shape[1]], a)


def _addmm(c: Tensor, a: Tensor, b: Tensor, beta: Any = 1, alpha: Any = 1) -> Tensor:
    return _zeros([a.shape[0], b.shape[1]], a)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    return _zeros([a.shape[0], a.shape[1], b.shape[2]], a)


def _baddbmm(c: Tensor, a: Tensor, b: Tensor, beta: Any = 1, alpha: Any = 1) -> Tensor:
    return _zeros([a.shape[0], a.shape[1], b.shape[2]], a)


def _sdpa_cpu(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, is_causal: bool = False,
              attn_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return _zeros(list(q.shape[:-1]) + [v.shape[-1]], q), _zeros(q.shape[:-1], q, torch.float32)


_SHAPE_ONLY_CPU = {"mm": _mm, "addmm": _addmm, "bmm": _bmm, "baddbmm": _baddbmm,
                   "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu}


@contextlib.contextmanager
def shape_only_kernels() -> Iterator[None]:
    """While active, the CPU kernels of the matrix products return zeros of the right shape.

    The jit tracer records each op (``aten::linear``, ``aten::matmul``, ``aten::_convolution``,
    ``aten::scaled_dot_product_attention`` with their input shapes and ``requires_grad``) one
    dispatch level *above* these kernels, so the graph fvcore analyses is unchanged, but tracing
    ViT-B/16 on CPU no longer costs ~35 GFLOP of arithmetic per pass. Values become degenerate
    (zeros); routing decisions taken on them (top-k, argmax) keep their shapes, which is all a
    count depends on; the tests check that counts with and without it agree for every method.
    The kernels are overridden through ``torch.library`` for the duration only (process-wide, so
    nothing else may run matrix products on CPU meanwhile); CUDA kernels are untouched.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib = torch.library.Library("aten", "IMPL")
        for name, fn in _SHAPE_ONLY_CPU.items():
            if hasattr(torch.ops.aten, name):
                lib.impl(name, fn, "CPU")
    try:
        yield
    finally:
        lib._destroy()


# --- running a count -------------------------------------------------------------------------------

@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded meanwhile: counting executes only small elementwise kernels (the
    matrix products are shape-only), and on a busy machine extra threads only spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class OpCount:
    """MACs of one traced call, by operator kind, for the forward and for its backward."""

    forward: Counter = field(default_factory=Counter)
    backward: Counter = field(default_factory=Counter)
    paper: int = 0  # module-hook convention operations (see ModuleHookCounter)
    unsupported: Counter = field(default_factory=Counter)

    @property
    def forward_total(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def backward_total(self) -> float:
        return float(sum(self.backward.values()))

    def scaled(self, factor: float) -> "OpCount":
        """Every figure multiplied by ``factor`` (e.g. 1/batch for per-image counts)."""
        return OpCount(Counter({k: v * factor for k, v in self.forward.items()}),
                       Counter({k: v * factor for k, v in self.backward.items()}), self.paper * factor,
                       Counter(self.unsupported))


def count_ops(fn: Callable[[Tensor], Any], x: Tensor, owner: Optional[nn.Module] = None, paper: bool = True,
              shape_only: bool = False) -> OpCount:
    """Trace ``fn(x)`` with fvcore and return its MACs (forward + backward) and paper-convention ops.

    ``fn`` may return a tensor, a tuple of tensors or anything with ``.logits`` (a MethodOutput).
    ``owner`` is the module whose parameters ``fn`` uses (``fn`` itself when it is a module): its
    parameters are registered in the traced wrapper so that they enter the graph as inputs, and with
    ``paper`` its modules are also counted with the module-hook convention while ``fn`` runs. Run
    under ``torch.no_grad()`` for inference (the backward is then 0) and with gradients enabled for
    training. ``shape_only`` runs the matrix products under :func:`shape_only_kernels` (no arithmetic).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import touches the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    if owner is None and isinstance(fn, nn.Module):
        owner = fn

    class _Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # The owner's parameters (same objects) rather than the owner itself: the tracer feeds
            # the wrapper's state_dict to the graph, and a module's extra state (e.g. ClassStats'
            # dicts) is not a tensor it can take.
            self.params = nn.ParameterList(list(owner.parameters()) if owner is not None else [])

        def forward(self, inp: Tensor) -> Any:
            out = fn(inp)
            if hasattr(out, "logits"):
                aux = getattr(out, "aux_loss", None)
                return (out.logits, aux) if isinstance(aux, Tensor) else out.logits
            return out

    analysis = FlopCountAnalysis(_Wrap(), (x,))
    analysis.clear_op_handles()  # drop fvcore's defaults (its LayerNorm estimate is not a MAC)
    analysis.set_op_handle(**{op: None for op in _NO_MAC_OPS})
    analysis.set_op_handle(**{op: _handle(op) for op in _RULES})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    counter = ModuleHookCounter(owner) if (paper and owner is not None) else contextlib.nullcontext()
    kernels = shape_only_kernels() if shape_only else contextlib.nullcontext()
    with warnings.catch_warnings(), counter, kernels, single_thread():
        warnings.simplefilter("ignore")
        by_op = analysis.by_operator()
    fwd = Counter({k: int(v) for k, v in by_op.items() if not k.startswith(BACKWARD_PREFIX) and v})
    bwd = Counter({k[len(BACKWARD_PREFIX):]: int(v) for k, v in by_op.items() if k.startswith(BACKWARD_PREFIX) and v})
    unsupported = Counter(analysis.unsupported_ops())
    return OpCount(fwd, bwd, counter.total if isinstance(counter, ModuleHookCounter) else 0, unsupported)


# --- which convention gives the papers' numbers -----------------------------------------------------

def op_inventory(model: nn.Module, fn: Callable[[Tensor], Any], x: Tensor) -> Dict[str, int]:
    """Per-call totals of one pass ``fn(x)`` that the counting conventions weigh differently:
    matrix-product MACs by kind (fvcore trace with the attention handle), bias additions (per output
    element, and once per linear call as ptflops counts them), and LayerNorm / GELU elements."""
    inv = Counter()

    def lin(m: nn.Linear, i: Tuple[Tensor, ...], o: Tensor) -> None:
        if m.bias is not None:
            inv["linear_bias_per_element"] += int(o.numel())
            inv["linear_bias_once"] += m.out_features

    def conv(m: nn.Module, i: Tuple[Tensor, ...], o: Tensor) -> None:
        if m.bias is not None:
            inv["conv_bias"] += int(o.numel())

    def elem(key: str) -> Callable[..., None]:
        def hook(m: nn.Module, i: Tuple[Tensor, ...], o: Tensor) -> None:
            inv[key] += int(o.numel())
        return hook

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(elem("layernorm_elements")))
        elif isinstance(m, nn.GELU):
            handles.append(m.register_forward_hook(elem("gelu_elements")))
    try:
        with torch.no_grad():
            oc = count_ops(fn, x, owner=model, paper=False, shape_only=True)
    finally:
        for h in handles:
            h.remove()
    for k, v in oc.forward.items():
        inv[f"{k}_macs"] += int(v)
    return dict(inv)


def convention_candidates(inv: Dict[str, int]) -> Dict[str, int]:
    """One pass under the counting conventions of common tools, from an :func:`op_inventory`.

    Returned in *that tool's unit* (MACs, or "flops" counted per element); papers print
    2 × this as GFLOPs. Attention products are seen only by counters that see functional
    matmuls (fvcore / FlopCounterMode on a hand-written attention, or our SDPA handle).
    """
    lin, conv, att = inv.get("linear_macs", 0), inv.get("conv_macs", 0), inv.get("attention_macs", 0)
    ln, gelu = inv.get("layernorm_elements", 0), inv.get("gelu_elements", 0)
    return {
        "exact MACs (this suite: linear + conv + attention)": lin + conv + att,
        "linear + conv only (FlopCounterMode with fused CPU attention)": lin + conv,
        "fvcore defaults, fused attention (LayerNorm 5/elem, attention 0)": lin + conv + 5 * ln,
        "fvcore defaults, hand-written attention (LayerNorm 5/elem)": lin + conv + att + 5 * ln,
        "thop (Linear, Conv, LayerNorm 4/elem)": lin + conv + 4 * ln,
        "ptflops <= 0.7.0 module hooks (Linear+bias once, Conv+bias, LayerNorm 1, GELU 1)":
            lin + inv.get("linear_bias_once", 0) + conv + inv.get("conv_bias", 0) + ln + gelu,
        "ptflops >= 0.7.1 (functional F.gelu counted again: GELU 2)":
            lin + inv.get("linear_bias_once", 0) + conv + inv.get("conv_bias", 0) + ln + 2 * gelu,
    }
