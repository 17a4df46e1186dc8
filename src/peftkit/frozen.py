"""The frozen linear layers' products in training: prepared once, lent to the layers per step.

A frozen weight never changes during a run, yet eager PyTorch redoes work for it at every
call. Under bf16 autocast it casts the float32 weight to bf16 again: autocast keeps a cast only
for weights that require grad. On the CPU every matmul also repacks the weight into oneDNN's
blocked layout. :class:`FrozenLinears` does both once. For every frozen linear layer it keeps
a :class:`FrozenProduct`: the weight in the step's compute dtype, prepacked by oneDNN on CPUs
that have it (once for the forward product and once, transposed, for the input gradient).
While a step runs, the layers multiply with those. On this project's CPU the prepacked
products of MiniLM's layer shapes took 0.80-0.92 of the time of ``nn.Linear``'s forward in
float32 and 0.65-0.94 under bf16 autocast (``bench/RESULTS-frozen.md``).

The prepared weights stay in memory for the run: two copies of every frozen linear weight in
the compute dtype on the CPU, one on other devices (none there when the dtypes agree).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from .inject import is_plain_linear, linear_shape

if TYPE_CHECKING:
    from torch import nn

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
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pack: bool):
        self.dtype = dtype
        w = weight.detach().to(dtype)  # the weight itself when the dtype agrees
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.weight = self._forward = self._backward = None
        if pack:
            self._forward = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _BATCH_HINT)
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
        return sum(t.numel() * t.element_size() for t in tensors)


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


class FrozenLinears:
    """Every frozen float linear layer of ``model`` multiplying with its :class:`FrozenProduct`
    inside ``with``.

    Enter it around a step's forward and backward (autocast around the forward only). Outside
    the block the layers run their own forward again, on their float32 weights, for evaluation
    and saving. The products are prepared once: the frozen weights must not change while this
    object is in use.

    Left out: layers with a trainable weight or bias, quantized layers (subclasses of
    ``nn.Linear``), the output embedding (a causal LM's loss multiplies by it itself) and any
    layer whose weight another module shares (a tied input embedding).

    Args:
        model: the model being trained.
        dtype: the dtype the step multiplies in (autocast's, or float32).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        from .methods.lora import LoRALinear

        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        layers = {id(m): m for m in model.modules() if is_plain_linear(m) and m is not head}
        others = {id(p) for m in model.modules() if id(m) not in layers for p in m.parameters(recurse=False)}
        owners = {id(m.base_layer): m for m in model.modules() if isinstance(m, LoRALinear)}
        self._layers: list[tuple[nn.Module, FrozenProduct, LoRALinear | None]] = []
        for m in layers.values():
            params = list(m.parameters(recurse=False))
            if any(p.requires_grad or not p.is_floating_point() or id(p) in others for p in params):
                continue
            pack = m.weight.device.type == "cpu" and can_pack(dtype)
            self._layers.append((m, FrozenProduct.of(m, dtype, pack), owners.get(id(m))))

    def __len__(self) -> int:
        return len(self._layers)

    def nbytes(self) -> int:
        """Memory the prepared weights hold."""
        return sum(product.nbytes() for _, product, _ in self._layers)

    def describe(self) -> str:
        """One line for the run's log."""
        if not self._layers:
            return "frozen linear layers: none"
        packed = " oneDNN-packed" if self._layers[0][1].weight is None else ""
        dtype = str(self._layers[0][1].dtype).removeprefix("torch.")
        return (f"frozen linear layers: {len(self)} multiply with{packed} {dtype} weights prepared once "
                f"({self.nbytes() / 2**20:.0f} MiB)")

    def __enter__(self) -> FrozenLinears:
        for layer, product, lora in self._layers:
            layer.forward = _bound(product)
            if lora is not None:
                lora.base_product = product  # the LoRA layer adds its update into this product
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, _product, lora in self._layers:
            del layer.forward
            if lora is not None:
                lora.base_product = None


def _bound(product: FrozenProduct):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, product)

    return forward
