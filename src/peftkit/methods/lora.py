"""LoRA: a trainable low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (``out x in``) LoRA learns ``A`` (``r x in``) and ``B``
(``out x r``) and computes ``y = W x + b + s * B A dropout(x)`` with ``s = alpha / r``
(or ``alpha / sqrt(r)`` with rsLoRA). ``B`` starts at zero, so an untrained adapter
leaves the model unchanged. Merging adds ``s * B A`` into ``W``; unmerging subtracts it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..inject import is_linear, linear_shape, replace_module, select_targets
from .base import Injection, finish
from .configs import LoraConfig


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
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        if out.dtype != h.dtype and not torch.is_autocast_enabled(out.device.type):
            return out + (self.lora_B(h) * self.scaling).to(out.dtype)
        # out + s * h B^T in one product that accumulates into a copy of the base output
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.weight.t(),
                           alpha=self.scaling)
        return flat.view(out.shape)

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


def apply_lora(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
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
