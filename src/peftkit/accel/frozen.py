"""The frozen linear layers' products in training: prepared once, used by the layers per step.

A frozen weight never changes during a run, yet eager PyTorch redoes work for it at every
call. Under bf16 autocast it casts the float32 weight to bf16 again: autocast keeps a cast only
for weights that require grad. On the CPU every matmul also repacks the weight into oneDNN's
blocked layout. :class:`FrozenLinears` does both once. For every frozen linear layer it keeps
a :class:`FrozenProduct`: the weight in the step's compute dtype, prepacked by oneDNN on CPUs
that have it (once for the forward product and once, transposed, for the input gradient).
While a step runs, the layers multiply with those (``bench/frozen.py`` measures the gain).
An adapted layer over such a frozen layer is handed the prepared product, and a LoRA update
there computes with it as one autograd node (:meth:`peftkit.methods.lora.LoRAUpdate.fused`).

The prepared weights stay in memory for the run: two copies of every frozen linear weight in
the compute dtype on the CPU, one on other devices (none there when the dtypes agree).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..inject import is_plain_linear, linear_shape, output_embedding
from ..methods.layer import AdaptedLinear

if TYPE_CHECKING:
    from collections.abc import Callable

_BATCH_HINT = 512  # rows oneDNN packs for; the packed products ran as fast from 6 rows to 4,096


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear_pointwise()(x, packed, bias, "none", [], "")


@functools.cache
def _linear_pointwise():
    """oneDNN's product with a prepacked weight, as the overload itself: calling it through
    ``torch.ops`` resolves the overload again at every call (about 12 µs)."""
    return torch.ops.mkldnn._linear_pointwise.default


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks and multiplies ``dtype`` weights here, checked on a small
    product against ``F.linear`` (a torch build without the op, or without bf16 kernels, says no)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w, x = (torch.randn(shape, generator=g).to(dtype) for shape in ((24, 40), (5, 40)))
        got = _onednn(x, torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT), None)
        return bool(torch.allclose(got.float(), (x @ w.t()).float(), atol=0.05, rtol=0.02))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class FrozenProduct:
    """``x W^T + b`` and the input gradient ``g W`` of one frozen layer, in ``dtype``.

    Args:
        weight: ``W`` as ``(out, in)`` (a ``Conv1D``'s weight transposed).
        bias: ``b`` or None.
        dtype: the compute dtype; inputs must come in it.
        pack: keep ``W`` and ``W^T`` prepacked by oneDNN (CPU) instead of as a tensor.
        input_grad: prepare ``W^T`` for :meth:`input_grad` too (not needed for inference).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pack: bool, input_grad: bool = True
    ):
        self.dtype = dtype
        w = weight.detach().to(dtype)  # the weight itself when the dtype agrees
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.weight = self._forward = self._backward = None
        if pack:
            self._forward = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _BATCH_HINT)
            if input_grad:
                self._backward = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), _BATCH_HINT)
        else:
            self.weight = w

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype, pack: bool = False) -> FrozenProduct:
        """The product of an ``nn.Linear`` or ``Conv1D`` layer."""
        weight = layer.weight.t() if linear_shape(layer)[2] else layer.weight
        return cls(weight, layer.bias, dtype, pack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` to ``(..., out)``."""
        if self.weight is None:
            return _onednn(x, self._forward, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``(..., out)`` to ``(..., in)``."""
        if self.weight is None:
            return _onednn(grad, self._backward, None)
        return grad @ self.weight

    def nbytes(self) -> int:
        tensors = [self.weight] if self.weight is not None else [self._forward, self._backward]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _FrozenLinear(torch.autograd.Function):
    """A frozen layer's forward, and in backward only the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, product: FrozenProduct) -> torch.Tensor:
        ctx.product, ctx.x_dtype = product, x.dtype
        return product.forward(x.to(product.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        product = ctx.product
        return product.input_grad(grad.to(product.dtype)).to(ctx.x_dtype), None


def frozen_forward(product: FrozenProduct) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen layer's forward through its prepared product."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, product)

    return forward


class FrozenLinears:
    """The prepared products of every frozen float linear layer of ``model``, and the forwards
    that use them (:meth:`forwards`), for :class:`peftkit.accel.StepSpeedups` to install.

    The products are prepared once: the frozen weights must not change while they are in use.
    Left out: layers with a trainable weight or bias, quantized layers (subclasses of
    ``nn.Linear``), the output embedding (a causal LM's loss multiplies by it itself) and any
    layer whose weight another module shares (a tied input embedding). An adapted layer over a
    prepared layer is handed its product (:meth:`configure`); a LoRA update without dropout
    computes with it as one node.

    Args:
        model: the model being trained.
        dtype: the dtype the step multiplies in (autocast's, or float32).
        fuse_lora: hand adapted layers their prepared base (off: they run their own forward over
            it, which multiplies exactly as without this layer when nothing is packed).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, fuse_lora: bool = True):
        head = output_embedding(model)
        layers = {id(m): m for m in model.modules() if is_plain_linear(m) and m is not head}
        others = {id(p) for m in model.modules() if id(m) not in layers for p in m.parameters(recurse=False)}
        self.products: list[tuple[nn.Module, FrozenProduct]] = []
        for m in layers.values():
            params = list(m.parameters(recurse=False))
            if any(p.requires_grad or not p.is_floating_point() or id(p) in others for p in params):
                continue
            pack = m.weight.device.type == "cpu" and can_pack(dtype)
            self.products.append((m, FrozenProduct.of(m, dtype, pack)))
        by_layer = {id(layer): product for layer, product in self.products}
        self.fused = (
            [
                (m, by_layer[id(m.base_layer)])
                for m in model.modules()
                if isinstance(m, AdaptedLinear)
                and id(m.base_layer) in by_layer
                and any(getattr(u, "can_fuse", lambda: False)() for u in m.updates.values())
            ]
            if fuse_lora
            else []
        )

    def __len__(self) -> int:
        return len(self.products)

    def forwards(self) -> list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """(module, the forward it runs inside a step) for every prepared layer."""
        return [(layer, frozen_forward(product)) for layer, product in self.products]

    def configure(self, on: bool) -> None:
        """Hand every adapted layer over a prepared layer its product (``on``), or take it back."""
        for layer, product in self.fused:
            layer.product = product if on else None

    def nbytes(self) -> int:
        """Memory the prepared weights hold."""
        return sum(product.nbytes() for _, product in self.products)

    def describe(self) -> str:
        """One line for the run's log."""
        if not self.products:
            return "frozen linear layers: none"
        packed = " oneDNN-packed" if self.products[0][1].weight is None else ""
        dtype = str(self.products[0][1].dtype).removeprefix("torch.")
        return (
            f"frozen linear layers: {len(self)} multiply with{packed} {dtype} weights prepared once "
            f"({self.nbytes() / 2**20:.0f} MiB); {len(self.fused)} LoRA layers fused with them"
        )
