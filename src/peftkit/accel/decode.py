"""Generation's products: every linear layer multiplies with a weight prepared for decoding.

Decoding a token reads every weight of the model once and multiplies it by one row per
sequence, so its time is the time to stream the weights. Eager PyTorch streams them as they
are: float32, an adapter's update computed apart from its base, and on the CPU repacked into
oneDNN's layout at every call. :class:`DecodeProducts`, entered around a generation, prepares
each linear layer once instead: the active adapters' weight differences added to the base weight
(the methods' own ``delta_weight``, as merging does), cast to the compute dtype (bf16 halves
the bytes) and prepacked by oneDNN. Leaving restores the layers' own forwards; nothing in the
model changes. ``bench/grpo.py`` measures the gain against llama.cpp.

Layers left as they are: quantized ones, adapted layers whose updates are not weight
differences (IA3's input scaling, DoRA's norms), and adapted layers while rows are routed to
different adapters. Valid only while the weights and the active adapters stay as they were at
entry (one generation call), and without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..inject import is_plain_linear, linear_shape
from ..methods.layer import AdaptedLinear, AdditiveUpdate, Update
from ..methods.lora import LoRAUpdate
from .frozen import FrozenProduct, can_pack


class DecodeProducts:
    """Prepared products of ``model``'s linear layers for one generation (see the module docstring).

    Args:
        model: the adapted model (its active adapters are merged into the prepared weights).
        dtype: the dtype the products multiply in; their outputs come back in the input's dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model, self.dtype = model, dtype
        self._saved: list[tuple[nn.Module, Any]] | None = None
        self.layers = 0

    @torch.no_grad()
    def _forwards(self) -> list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        out = []
        adapted = [m for m in self.model.modules() if isinstance(m, AdaptedLinear)]
        inside = {id(m.base_layer) for m in adapted} | {id(x) for m in adapted for x in m.updates.modules()}
        for module in self.model.modules():
            if isinstance(module, AdaptedLinear):
                weight = self._merged(module)
                if weight is None:
                    continue
                base = module.base_layer
            elif is_plain_linear(module) and id(module) not in inside and module.weight.is_floating_point():
                base = module
                weight = base.weight.t() if linear_shape(base)[2] else base.weight
            else:
                continue
            pack = weight.device.type == "cpu" and can_pack(self.dtype)
            product = FrozenProduct(weight, base.bias, self.dtype, pack, input_grad=False)
            out.append((module, _forward(product)))
        return out

    def _merged(self, layer: AdaptedLinear) -> torch.Tensor | None:
        """The layer's ``(out, in)`` weight with its active additive updates added, or None
        where the layer cannot be prepared so."""
        if layer.routing.rows is not None or layer.merged or not is_plain_linear(layer.base_layer):
            return None
        updates = layer.updates._modules
        deltas = [_delta(u) for n in layer.routing.active if (u := updates.get(n)) is not None]
        if any(d is None for d in deltas):
            return None
        base = layer.base_layer
        weight = base.weight.t() if linear_shape(base)[2] else base.weight
        if not deltas:
            return weight
        weight = weight.float().clone()
        for d in deltas:
            weight += d.float()
        return weight

    def __enter__(self) -> DecodeProducts:
        if self._saved is not None:
            raise RuntimeError("DecodeProducts is already entered")
        forwards = self._forwards()
        self._saved = [(m, m.__dict__.get("forward")) for m, _ in forwards]
        for module, forward in forwards:
            module.forward = forward
        self.layers = len(forwards)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, previous in reversed(self._saved or []):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved = None


def _delta(update: Update) -> torch.Tensor | None:
    """An update's ``(out, in)`` weight difference, or None when it is not one (IA3 scales the
    input; DoRA rescales rows; a LoRA bias adds to the bias)."""
    if isinstance(update, LoRAUpdate):
        if update.lora_magnitude_vector is not None or update.lora_B.bias is not None:
            return None
        delta = update.delta_weight()  # in the base's layout
        return delta.T if update.fan_in_fan_out else delta
    if isinstance(update, AdditiveUpdate) and update.input_scale() is None:
        return update.delta_weight()
    return None


def _forward(product: FrozenProduct) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return product.forward(x.to(product.dtype)).to(x.dtype)

    return forward
