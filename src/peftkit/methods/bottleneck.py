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

from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_linear, is_under, linear_shape, name_matches, replace_module
from .base import Attached, Attachment
from .configs import BottleneckConfig
from .layer import DEFAULT, Routing

ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise PeftkitError(
            "the model's config has no hidden_size", "method.placement", "use placement houlsby or pfeiffer"
        )
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

    def __init__(
        self,
        base_layer: nn.Module,
        dim: int,
        size: int,
        activation: str,
        scaling: float,
        residual: bool = True,
        parallel: bool = False,
        routing: Routing | None = None,
        adapter: str = DEFAULT,
    ):
        super().__init__()
        self.routing = routing if routing is not None else Routing((adapter,))
        self.adapter = adapter
        self.base_layer, self.scaling, self.residual, self.parallel = base_layer, scaling, residual, parallel
        self.activation = activation
        ref = next(base_layer.parameters())
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        self.adapter_down = nn.Linear(dim, size, device=ref.device, dtype=dtype)
        self.adapter_up = nn.Linear(size, dim, device=ref.device, dtype=dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        if name != self.adapter:
            return {}
        return {
            f"{m}.{p}": getattr(getattr(self, m), p) for m in ("adapter_down", "adapter_up") for p in ("weight", "bias")
        }

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        out = self.adapter_up(act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return (out * self.scaling).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.routing.on(self.adapter):
            return self.base_layer(*args, **kwargs)
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


def attach_bottleneck(model: nn.Module, cfg: BottleneckConfig, at: Attachment) -> Attached:
    """Wrap the places ``cfg.placement`` names with :class:`BottleneckAdapter`, in place."""
    if cfg.placement == "parallel":
        patterns = [cfg.ffn_blocks]
    else:
        patterns = [cfg.ffn_modules] + ([cfg.attention_modules] if cfg.placement == "houlsby" else [])
    targets = [
        n
        for n, m in model.named_modules()
        if n
        and any(name_matches(n, p) for p in patterns)
        and not is_under(n, at.modules_to_save)
        and (cfg.placement == "parallel" or is_linear(m))
    ]
    if not targets:
        raise PeftkitError(
            f"no {cfg.placement} adapter places found in {type(model).__name__}",
            "method",
            "set method.ffn_modules / attention_modules / ffn_blocks to its module names",
        )
    for name in targets:
        base = model.get_submodule(name)
        dim = linear_shape(base)[1] if cfg.placement != "parallel" else _hidden_size(model)
        replace_module(
            model,
            name,
            BottleneckAdapter(
                base,
                dim,
                cfg.width(dim),
                cfg.non_linearity,
                cfg.scaling,
                cfg.residual,
                parallel=cfg.placement == "parallel",
                routing=at.routing,
                adapter=at.name,
            ),
        )
    return Attached(replaced=targets)
