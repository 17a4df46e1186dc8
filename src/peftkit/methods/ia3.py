"""IA3: learned rescaling vectors on keys, values and feed-forward activations.

For a frozen linear layer ``h = W x + b`` IA3 learns one vector ``l``, initialised to ones so
the untrained model equals the base. On attention layers (keys, values) it scales the
output, ``h = l * (W x + b)``; on feed-forward output layers it scales the input,
``h = W (l * x) + b``. Both fold into ``W`` exactly, so IA3 merges.
File layout and semantics follow ``peft``'s ``IA3`` type (``ia3_l`` of shape
``(out, 1)``, or ``(1, in)`` for feed-forward layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inject import is_linear, linear_shape, name_matches, replace_module, select_targets
from .base import Injection, finish
from .configs import IA3Config


class IA3Linear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or ``Conv1D``) with an IA3 scaling vector.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``; ``ia3_l`` is
    ``(1, in_features)`` when ``feedforward`` else ``(out_features, 1)``.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer, self.feedforward, self.merged = base_layer, feedforward, False
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        shape = (1, in_f) if feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``ia3_l`` shaped to multiply the base weight (rows for outputs, columns for inputs)."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w, b = self.base_layer.weight, getattr(self.base_layer, "bias", None)
            w.mul_(self._weight_scale().to(w.dtype))
            if not self.feedforward and b is not None:
                b.mul_(self.ia3_l.flatten().to(b.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w, b = self.base_layer.weight, getattr(self.base_layer, "bias", None)
            w.div_(self._weight_scale().to(w.dtype))
            if not self.feedforward and b is not None:
                b.div_(self.ia3_l.flatten().to(b.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


def apply_ia3(model: nn.Module, cfg: IA3Config, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
    """Wrap the targeted linear layers of ``model`` with :class:`IA3Linear`, in place."""
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        replace_module(model, name, IA3Linear(base, name_matches(name, cfg.feedforward_modules)))
    return finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
