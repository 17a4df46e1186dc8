"""IA3: learned rescaling vectors on keys, values and feed-forward activations.

For a frozen linear layer ``h = W x + b`` IA3 learns one vector ``l``, initialised to ones so
the untrained model equals the base. On attention layers (keys, values) it scales the
output, ``h = l * (W x + b)``; on feed-forward output layers it scales the input,
``h = W (l * x) + b``. Both fold into ``W`` exactly, so IA3 merges.
File layout and semantics follow ``peft``'s ``IA3`` type (``ia3_l`` of shape
``(out, 1)``, or ``(1, in)`` for feed-forward layers).
"""

from __future__ import annotations

import torch
from torch import nn

from ..inject import name_matches, select_targets
from .base import Attached, Attachment
from .configs import IA3Config
from .layer import Update, wrap_targets


class IA3Update(Update):
    """One IA3 adapter's scaling vector on one frozen linear layer (``nn.Linear`` or ``Conv1D``).

    Shapes: ``ia3_l`` is ``(1, in_features)`` when ``feedforward`` (it scales the input) else
    ``(out_features, 1)`` (it scales the output).
    """

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=self.device, dtype=self.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def input_scale(self) -> torch.Tensor | None:
        return self.ia3_l.flatten() if self.feedforward else None

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.feedforward:  # the layer scaled its input already (input_scale)
            return out
        return (out * self.ia3_l.flatten()).to(out.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``ia3_l`` shaped to multiply the base weight (rows for outputs, columns for inputs)."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        w, b = base.weight, getattr(base, "bias", None)
        w.mul_(self._weight_scale().to(w.dtype))
        if not self.feedforward and b is not None:
            b.mul_(self.ia3_l.flatten().to(b.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        w, b = base.weight, getattr(base, "bias", None)
        w.div_(self._weight_scale().to(w.dtype))
        if not self.feedforward and b is not None:
            b.div_(self.ia3_l.flatten().to(b.dtype))

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def attach_ia3(model: nn.Module, cfg: IA3Config, at: Attachment) -> Attached:
    """Give the targeted linear layers of ``model`` adapter ``at.name``'s IA3 vector, in place."""
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=at.modules_to_save)
    wrap_targets(
        model,
        targets,
        lambda path, base: IA3Update(base, name_matches(path, cfg.feedforward_modules)),
        at.name,
        at.routing,
    )
    return Attached(replaced=targets)
