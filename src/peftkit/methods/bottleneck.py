"""Bottleneck adapters: small down-project / non-linearity / up-project layers in each block.

Placements (``placement``):

* ``houlsby``: after the attention output projection and after the feed-forward output
  projection, sequentially: ``h <- h + s * up(act(down(h)))`` (Houlsby et al., 2019);
* ``pfeiffer``: the same after the feed-forward output projection only (Pfeiffer et al., 2021);
* ``parallel``: beside each feed-forward block, reading the block's input ``x``:
  ``FFN(x) + s * up(act(down(x)))`` (He et al., 2022). For BERT-style blocks, whose output
  module adds the residual ``x`` before its LayerNorm, the adapter's output joins that sum.

``up`` starts at zero, so an untrained adapter leaves the model unchanged. ``peft`` has no
bottleneck type: files use the PEFT layout with ``"peft_type": "PEFTKIT_BOTTLENECK"`` and
tensors ``base_model.model.<wrapped module>.adapter_down.weight`` (and ``.bias``,
``adapter_up.*``). Adapters cannot be merged into the base weights (the non-linearity).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import PeftkitError
from ..inject import ATTENTION_OUTPUT, FFN_OUTPUT, is_linear, is_under, linear_shape, name_matches, replace_module
from .base import Injection, MethodConfig, finish

#: feed-forward blocks (for the parallel placement), in the families of inject.FFN_OUTPUT
FFN_BLOCK = r".*(\.layer\.\d+\.output|\.ffn|\.mlp)"
ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
               "tanh": torch.tanh}


class BottleneckConfig(MethodConfig):
    """Bottleneck adapter options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PEFTKIT_BOTTLENECK"

    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: float = Field(16.0, gt=0, description="bottleneck = hidden size / reduction_factor")
    bottleneck_size: int | None = Field(None, gt=0, description="set the bottleneck width directly")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    residual: bool = Field(True, description="add the adapter to its input (h + f(h)); false: f(h) only")
    scaling: float = Field(1.0, description="factor s on the adapter's output")
    attention_modules: str | list[str] = Field(ATTENTION_OUTPUT, description="attention output projections")
    ffn_modules: str | list[str] = Field(FFN_OUTPUT, description="feed-forward output projections")
    ffn_blocks: str | list[str] = Field(FFN_BLOCK, description="feed-forward blocks (parallel placement)")

    def width(self, dim: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        if self.reduction_factor > dim:
            raise PeftkitError(f"reduction_factor {self.reduction_factor:g} is larger than the hidden size {dim}",
                               "method.reduction_factor", f"use a value up to {dim}, or set bottleneck_size")
        return max(1, int(dim // self.reduction_factor))

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        if self.placement == "parallel":
            patterns = [self.ffn_blocks]
        else:
            patterns = [self.ffn_modules] + ([self.attention_modules] if self.placement == "houlsby" else [])
        targets = [n for n, m in model.named_modules()
                   if n and any(name_matches(n, p) for p in patterns) and not is_under(n, modules_to_save)
                   and (self.placement == "parallel" or is_linear(m))]
        if not targets:
            raise PeftkitError(f"no {self.placement} adapter places found in {type(model).__name__}",
                               "method", "set method.ffn_modules / attention_modules / ffn_blocks to its module names")
        for name in targets:
            base = model.get_submodule(name)
            dim = linear_shape(base)[1] if self.placement != "parallel" else _hidden_size(model)
            replace_module(model, name, BottleneckAdapter(
                base, dim, self.width(dim), self.non_linearity, self.scaling, self.residual,
                parallel=self.placement == "parallel"))
        return finish(model, self, replaced=targets, modules_to_save=modules_to_save)

    def to_peft(self, injection: Injection, model: nn.Module) -> dict[str, Any]:
        return {**super().to_peft(injection, model), "target_modules": injection.replaced}


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise PeftkitError("the model's config has no hidden_size", "method.placement",
                           "use placement houlsby or pfeiffer")
    return size


class BottleneckAdapter(nn.Module):
    """A frozen module plus a bottleneck adapter (sequential on its output, or parallel).

    Args:
        base_layer: the wrapped module (an output projection, or a feed-forward block).
        dim: the width the adapter reads and writes.
        size: the bottleneck width.
        activation: name in ``ACTIVATIONS``.
        scaling: factor on the adapter's output.
        residual: sequential only: keep the skip connection around the adapter.
        parallel: read the block's input instead of its output.
    """

    def __init__(self, base_layer: nn.Module, dim: int, size: int, activation: str, scaling: float,
                 residual: bool = True, parallel: bool = False):
        super().__init__()
        self.base_layer, self.scaling, self.residual, self.parallel = base_layer, scaling, residual, parallel
        self.activation = activation
        ref = next(base_layer.parameters())
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        self.adapter_down = nn.Linear(dim, size, device=ref.device, dtype=dtype)
        self.adapter_up = nn.Linear(size, dim, device=ref.device, dtype=dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"{m}.{p}": getattr(getattr(self, m), p) for m in ("adapter_down", "adapter_up")
                for p in ("weight", "bias")}

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        out = self.adapter_up(act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return (out * self.scaling).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.parallel:
            if len(args) >= 2:  # BERT-style output module: (hidden_states, residual input)
                x = args[1]
                return self.base_layer(args[0], x + self.bottleneck(x), *args[2:], **kwargs)
            out = self.base_layer(*args, **kwargs)
            return out + self.bottleneck(args[0])
        h = self.base_layer(*args, **kwargs)
        return h + self.bottleneck(h) if self.residual else self.bottleneck(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scaling={self.scaling:g}, parallel={self.parallel}"
