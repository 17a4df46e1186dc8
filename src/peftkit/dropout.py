"""Dropout with a cheaper random mask, for the frozen model's own dropout layers in training.

``nn.Dropout`` draws one Bernoulli sample per element from the CPU generator (about 12 ns
each here): on a MiniLM step that was 13% of the time. :class:`FastDropout` draws one 64-bit
word per four elements and compares each 16-bit lane with a threshold, so an element is
dropped with probability ``round(p * 65536) / 65536`` (within 8e-6 of ``p``) and kept ones are
scaled by the exact inverse of the keep rate. It keeps a 1-byte mask for backward instead of a
float one. The draws come from torch's default generator, so seeding and a checkpoint's RNG
state cover them as before.

The mask is written as bytes and only viewed as ``bool``: torch's CPU kernels that read or
write ``bool`` tensors are not vectorised, and converting a bool mask (or multiplying by one)
cost several times the arithmetic itself, most of all in bf16.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

_LANES = 65536  # values of one 16-bit lane


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A boolean mask of ``shape`` (True = keep) and the factor that rescales kept elements."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    lanes = words.view(torch.int16)[:n]  # 16 uniform bits each; any fixed set of K values has chance K/65536
    dropped = round(p * _LANES)
    keep = torch.ge(lanes, dropped - _LANES // 2, out=torch.empty(n, dtype=torch.uint8, device=device))
    return keep.view(torch.bool).view(shape), _LANES / (_LANES - dropped)


def _apply(keep: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * keep * scale`` in one new tensor; the scale is applied last, in the op's float math,
    so the result is exactly that of multiplying by the mask and then by the Python float."""
    return keep.view(torch.uint8).to(x.dtype).mul_(x).mul_(scale)


def _cheap(p: float, x: torch.Tensor) -> bool:
    """Whether the cheap mask applies: on CPU (accelerators have fast Bernoulli kernels), and
    for a ``p`` that does not round to dropping every element."""
    return x.device.type == "cpu" and round(p * _LANES) < _LANES


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _apply(keep, x, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _apply(keep, grad, ctx.scale), None


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same module type for isinstance checks) with the cheaper mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not _cheap(self.p, x):
            return super().forward(x)
        out = _MaskedScale.apply(x, self.p)
        if self.inplace:
            return x.copy_(out)
        return out


def use_fast_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout`` in ``model`` into a :class:`FastDropout`, in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = FastDropout
            count += 1
    return count


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
        keep, keep_scale = keep_mask(probs.shape, p, probs.device)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return torch.matmul(_apply(keep, probs, keep_scale), v)

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


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention, except that attention-probability dropout in CPU training
    runs :class:`_AttentionCore` with :func:`keep_mask`. Torch's SDPA leaves its fused kernel for
    a slower path when it has to drop, and draws its mask element by element (at 256 tokens the
    mask was the costliest part of a MiniLM step)."""
    if (dropout == 0.0 or not module.training or not _cheap(dropout, query) or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
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


def use_fast_attention_dropout(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to :func:`_attention` (the same
    masks, the same result without dropout). Returns False, changing nothing, otherwise."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    return True
