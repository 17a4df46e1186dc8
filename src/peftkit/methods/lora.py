"""LoRA: a trainable low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (``out x in``) LoRA learns ``A`` (``r x in``) and ``B``
(``out x r``) and computes ``y = W x + b + s * B A dropout(x)`` with ``s = alpha / r``
(or ``alpha / sqrt(r)`` with rsLoRA). ``B`` starts at zero, so an untrained adapter
leaves the model unchanged. Merging adds ``s * B A`` into ``W``; unmerging subtracts it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..frozen import FrozenProduct
from ..inject import is_linear, is_plain_linear, linear_shape, replace_module, select_targets
from .base import Injection, finish
from .configs import LoraConfig


class _LinearPlusLoRA(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with a frozen ``W`` and ``b``, as one autograd node.

    Composed of modules, the update costs a cast of ``x`` of its own, a full-size product
    ``(x A^T) B^T`` and a pass adding it to the base output; its backward a full-size scaled
    gradient, a second input gradient and a pass summing the two. Here the update accumulates
    into the base product's output and the second input gradient into the first, and only the
    ``(N, r)`` tensors are scaled. Everything runs in ``base.dtype``.

    Shapes: x ``(..., in)``, a ``(r, in)``, b ``(out, r)``; ``base`` maps ``in`` to ``out``.
    """

    @staticmethod
    def forward(ctx, x, base: FrozenProduct, a, b, scaling: float):
        ctx.base, ctx.scaling, ctx.x_meta, ctx.lora_dtype = base, scaling, (x.shape, x.dtype), a.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(base.dtype)
        a, b = a.to(base.dtype), b.to(base.dtype)
        h = x2 @ a.t()
        out = base.forward(x2).addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, a, b, h)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        # the skinny products with the long side as the inner dimension of a row-major
        # operand: as written out plainly (g @ b, g^T @ h) they took 1.7-3.9x as long in float32
        gh = (g @ b.t().contiguous().t()).mul_(ctx.scaling)  # gradient of h = x A^T
        want_x, _, want_a, want_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if want_x:
            shape, dtype = ctx.x_meta
            grad_x = ctx.base.input_grad(g).addmm_(gh, a).view(shape).to(dtype)
        if want_a:
            grad_a = (gh.t() @ x2).to(ctx.lora_dtype)
        if want_b:
            grad_b = (h.t() @ g).mul_(ctx.scaling).t().contiguous().to(ctx.lora_dtype)
        return grad_x, None, grad_a, grad_b, None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update.

    Args:
        base_layer: the frozen layer (``nn.Linear`` or a subclass, or ``Conv1D``).
        r: rank.
        scaling: the factor ``s`` applied to ``B A x``.
        dropout: dropout probability on the update's input.

    Shapes:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.r, self.scaling, self.merged = r, scaling, False
        self.base_product: FrozenProduct | None = None  # lent by FrozenLinears during a training step
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self._fused():
            product = self.base_product
            if product is None:  # nothing lent (outside a peftkit training step): the weight as it is
                device = x.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
                product = FrozenProduct.of(base, dtype)
            return _LinearPlusLoRA.apply(x, product, self.lora_A.weight, self.lora_B.weight, self.scaling)
        out = base(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        if update.dtype == out.dtype:
            return torch.add(out, update, alpha=self.scaling)  # one pass, no scaled copy of the update
        return out + (update * self.scaling).to(out.dtype)

    def _fused(self) -> bool:
        """Whether :class:`_LinearPlusLoRA` computes this layer: a frozen ``nn.Linear`` or
        ``Conv1D`` base (quantized layers have forwards of their own) and no dropout."""
        base = self.base_layer
        return (is_plain_linear(base) and type(self.lora_dropout) is nn.Identity
                and not any(p.requires_grad for p in base.parameters(recurse=False)))

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then skips the LoRA branch."""
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged update again."""
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str]) -> Injection:
    """Wrap the targeted linear layers of ``model`` with :class:`LoRALinear`, in place.

    Args:
        model: any PyTorch model (a transformers model, usually).
        cfg: the LoRA options.
        modules_to_save: modules trained and saved whole; never wrapped.

    Returns:
        The :class:`Injection`, also stored as ``model.peftkit``.
    """
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        replace_module(model, name, LoRALinear(base, cfg.r, cfg.scaling(), cfg.dropout))
    return finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
