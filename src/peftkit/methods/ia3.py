"""IA3: learned rescaling vectors on keys, values and feed-forward activations.

For a frozen linear layer ``h = W x + b`` IA3 learns one vector ``l``, initialised to ones so
the untrained model equals the base. On attention layers (keys, values) it scales the
output, ``h = l * (W x + b)``; on feed-forward output layers it scales the input,
``h = W (l * x) + b``. Both fold into ``W`` exactly, so IA3 merges.
File layout and semantics follow ``peft``'s ``IA3`` type (``ia3_l`` of shape
``(out, 1)``, or ``(1, in)`` for feed-forward layers).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..inject import FFN_OUTPUT, KEY_VALUE, is_linear, linear_shape, name_matches, replace_module, select_targets
from .base import Injection, MethodConfig, finish


class IA3Config(MethodConfig):
    """IA3 options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "IA3"
    mergeable: ClassVar[bool] = True

    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] = Field(
        f"{KEY_VALUE}|{FFN_OUTPUT}", description="layers to rescale; default: keys, values, feed-forward outputs"
    )
    feedforward_modules: str | list[str] = Field(
        FFN_OUTPUT, description="targets whose input (not output) is rescaled"
    )
    exclude_modules: str | list[str] | None = None

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        targets = select_targets(model, self.target_modules, self.exclude_modules, skip=modules_to_save)
        for name in targets:
            base = model.get_submodule(name)
            assert is_linear(base)
            replace_module(model, name, IA3Linear(base, name_matches(name, self.feedforward_modules)))
        return finish(model, self, replaced=targets, modules_to_save=modules_to_save)

    def to_peft(self, injection: Injection, model: nn.Module) -> dict[str, Any]:
        layers = [model.get_submodule(n) for n in injection.replaced]
        return {
            "peft_type": "IA3",
            # stored as the layers chosen, so peft's suffix matching selects exactly these
            "target_modules": injection.replaced,
            "feedforward_modules": [n for n, m in zip(injection.replaced, layers) if m.feedforward],
            "exclude_modules": None,
            "modules_to_save": injection.modules_to_save or None,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in layers),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "IA3Config":
        def norm(v: Any) -> Any:
            return sorted(v) if isinstance(v, (list, tuple, set)) else v

        return cls(target_modules=norm(cfg["target_modules"]),
                   feedforward_modules=norm(cfg.get("feedforward_modules") or []),
                   exclude_modules=norm(cfg.get("exclude_modules")),
                   modules_to_save=list(cfg.get("modules_to_save") or []))


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
