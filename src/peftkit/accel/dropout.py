"""Dropout with a cheaper random mask, for the frozen model's own dropout layers in training.

``nn.Dropout`` draws one Bernoulli sample per element from the CPU generator, one core at a
time (``bench/step_ablation.py`` measures what that costs a step). Here every element reads a 16-bit lane
of a counter-based hash (splitmix64 of the counter, four lanes per word) and is dropped when
the lane falls among ``round(p * 65536)`` of its 65536 values, so with probability within 8e-6
of ``p``; kept ones are scaled by the exact inverse of the keep rate. Each mask takes the
counter's base from one draw of torch's default generator, so seeding and a checkpoint's RNG
state cover it. The kernels of :mod:`peftkit.native` draw, mask and rescale in one pass on
torch's threads; without them the same numbers come from torch ops. A 1-byte mask is kept for
backward instead of a float one.

The mask is written as bytes and only viewed as ``bool``: torch's CPU kernels that read or
write ``bool`` tensors are not vectorised, and converting a bool mask (or multiplying by one)
cost several times the arithmetic itself, most of all in bf16.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ..methods.prefix import IMPLEMENTATION as PREFIX_IMPLEMENTATION
from ..methods.prefix import add_prefix
from . import native

_LANES = 65536  # values of one 16-bit lane
_MASK64 = 2**64 - 1


def _signed(c: int) -> int:
    return c - 2**64 if c >= 2**63 else c


_STEP, _MUL1, _MUL2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _hashed_lanes(seed: int, n: int, device: torch.device | str) -> torch.Tensor:
    """The ``n`` int16 lanes ``native.c`` reads, in torch ops: splitmix64 of the counters
    ``seed + (w + 1) * 0x9E3779B97F4A7C15`` (int64 arithmetic wraps as uint64 does)."""
    z = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device).mul_(_STEP).add_(_signed(seed))
    z.bitwise_xor_(_shr(z, 30)).mul_(_MUL1)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MUL2)
    z.bitwise_xor_(_shr(z, 31))
    return z.view(torch.int16)[:n]


def _draw(p: float) -> tuple[int, int, float]:
    """A mask's seed (one draw of torch's default generator), the lane threshold at and above
    which an element is kept, and the factor that rescales kept elements."""
    seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) & _MASK64
    dropped = round(p * _LANES)
    return seed, dropped - _LANES // 2, _LANES / (_LANES - dropped)


def _kernel(x: torch.Tensor):
    """The native kernel for ``x`` and its thread count, or None (torch ops then)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    kernels = native.kernels()
    if kernels is None:
        return None
    lib = kernels.lib
    return (lib.peftkit_dropout_f32 if x.dtype == torch.float32 else lib.peftkit_dropout_bf16), kernels.threads()


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A boolean mask of ``shape`` (True = keep) and the factor that rescales kept elements."""
    seed, threshold, scale = _draw(p)
    n = shape.numel()
    keep = torch.empty(n, dtype=torch.uint8, device=device)
    kernels = native.kernels() if keep.device.type == "cpu" else None
    if kernels is not None:
        kernels.lib.peftkit_keep_mask(keep.data_ptr(), n, seed, threshold, kernels.threads())
    else:
        torch.ge(_hashed_lanes(seed, n, device), threshold, out=keep)
    return keep.view(torch.bool).view(shape), scale


def _apply(keep: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * keep * scale`` in one new tensor; the scale is applied last, in the op's float math,
    so the result is exactly that of multiplying by the mask and then by the Python float."""
    kernel = _kernel(x)
    if kernel is None:
        return keep.view(torch.uint8).to(x.dtype).mul_(x).mul_(scale)
    fn, threads = kernel
    out = torch.empty_like(x)
    fn(out.data_ptr(), x.data_ptr(), keep.data_ptr(), x.numel(), 0, 0, 0, scale, threads)
    return out


def _drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x`` with a new mask applied: the result, the mask (``keep_mask``'s) and its scale."""
    kernel = _kernel(x)
    if kernel is None:
        keep, scale = keep_mask(x.shape, p, x.device)
        return _apply(keep, x, scale), keep, scale
    fn, threads = kernel
    seed, threshold, scale = _draw(p)
    keep = torch.empty(x.shape, dtype=torch.uint8)
    out = torch.empty_like(x)
    fn(out.data_ptr(), x.data_ptr(), keep.data_ptr(), x.numel(), 1, seed, threshold, scale, threads)
    return out, keep.view(torch.bool), scale


def _cheap(p: float, x: torch.Tensor) -> bool:
    """Whether the cheap mask applies: on CPU (accelerators have fast Bernoulli kernels), and
    for a ``p`` that does not round to dropping every element."""
    return x.device.type == "cpu" and round(p * _LANES) < _LANES


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        out, keep, ctx.scale = _drop(x, p)
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _apply(keep, grad, ctx.scale), None


def fast_dropout(module: nn.Dropout):
    """A forward for an ``nn.Dropout`` module (its own ``p``, ``inplace`` and training flag)
    that draws the cheaper mask; where that mask does not apply it runs the module's own."""
    own = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or module.p == 0.0:
            return x
        if not _cheap(module.p, x):
            return own(x)
        out = _MaskedScale.apply(x, module.p)
        if module.inplace:
            return x.copy_(out)
        return out

    return forward


ATTENTION = "peftkit_sdpa"


class _AttentionCore(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + bias)) v`` as one autograd node, with its backward
    written out. Composed of autograd ops it saved the float32 softmax output, a cast of it and
    reshaped copies of every operand, and cast gradients back and forth; this keeps the
    probabilities in the compute dtype and one contiguous copy of q, k and v.

    Shapes: q ``(B, H, L, D)``, k and v ``(B, H, S, D)``, bias broadcastable to ``(B, H, L, S)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, p: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            scores.add_(bias)
        probs = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)  # float32 sums
        dropped, keep, keep_scale = _drop(probs, p)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return torch.matmul(dropped, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, probs, keep = ctx.saved_tensors
        grad = grad.contiguous()
        grad_v = torch.matmul(_apply(keep, probs, ctx.keep_scale).transpose(-1, -2), grad)
        grad_probs = _apply(keep, torch.matmul(grad, v.transpose(-1, -2)), ctx.keep_scale)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v, None, None, None


_bias_cache: list = [None, None, None]  # (weak reference to a bool mask, dtype, its additive form)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as 0 / the dtype's lowest value. Every layer of a forward
    gets the same mask object, so the last conversion is kept for the next layer."""
    ref, cached_dtype, bias = _bias_cache
    if ref is not None and ref() is mask and cached_dtype == dtype:
        return bias
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    _bias_cache[:] = [weakref.ref(mask), dtype, bias]
    return bias


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' SDPA attention, except that attention-probability dropout in CPU training
    runs :class:`_AttentionCore` with :func:`keep_mask`. Torch's SDPA leaves its fused kernel for
    a slower path when it has to drop, and draws its mask element by element (at 256 tokens the
    mask was the costliest part of a MiniLM step)."""
    if (
        dropout == 0.0
        or not module.training
        or not _cheap(dropout, query)
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and query.shape[2] > 1:
        q, k = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else query.dtype
    bias = attention_mask
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        bias = _additive(attention_mask, dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _AttentionCore.apply(query.to(dtype), key.to(dtype), value.to(dtype), bias, scale, dropout)
    return out.transpose(1, 2).contiguous(), None


def _prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    """Prefix tuning's attention (:func:`peftkit.methods.prefix.add_prefix`) through :func:`_attention`."""
    key, value, attention_mask, kwargs = add_prefix(module, query, key, value, attention_mask, kwargs)
    return _attention(module, query, key, value, attention_mask, **kwargs)


#: a model's attention implementation -> the name and function that replace it in CPU training steps
REPLACEMENTS = {"sdpa": (ATTENTION, _attention), PREFIX_IMPLEMENTATION: ("peftkit_prefix_fast", _prefix_attention)}


def attention_replacement(model: nn.Module) -> str | None:
    """The attention implementation that computes ``model``'s attention with the cheap dropout
    mask in training (registered with transformers), or None when there is none for it."""
    config = getattr(model, "config", None)
    found = REPLACEMENTS.get(getattr(config, "_attn_implementation", None))
    if found is None:
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name, function = found
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
