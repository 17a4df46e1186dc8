"""VeRA: shared frozen random projections, and two trained scaling vectors per layer.

Every targeted layer ``W`` (``out x in``) uses slices of the same two random matrices,
``A`` (``r x in_max``) and ``B`` (``out_max x r``), sized for the largest targeted layer, and
learns ``lambda_d`` (``r``, starting at ``d_initial``) and ``lambda_b`` (``out``, starting at
zero, so the untrained model equals the base)::

    y = W x + b + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))

The projections come from a seeded generator exactly as peft draws them (Kaiming-uniform, CPU
generator seeded with ``projection_prng_key``, ``A`` first), so a file written without them
(``save_projection: false``) still loads with the same numbers. File keys follow peft's
``VERA`` type: ``<layer>.vera_lambda_b`` / ``vera_lambda_d`` and top-level ``vera_A`` / ``vera_B``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PeftkitError
from ..inject import is_linear, linear_shape, replace_module, select_targets
from .base import AdditiveMerge, Injection, finish
from .tuner_configs import VeraConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over the fan-in (``shape[1]``), from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen projections ``vera_A`` (``r x in_max``) and ``vera_B`` (``out_max x r``)."""

    top_level = True

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, saved: bool):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((out_max, r), generator), persistent=False)
        self.saved = saved

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {}  # nothing trains; the seed regenerates them

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"vera_A": self.vera_A, "vera_B": self.vera_B} if self.saved else {}


class VeraLinear(AdditiveMerge, nn.Module):
    """A frozen linear layer (``nn.Linear``, quantized ones included, or ``Conv1D``) with a VeRA update.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, r: int, d_initial: float,
                 dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer, self.merged = base_layer, False
        self._shared = [projections]  # a list, so the shared module is registered once, on the model
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=weight.device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=weight.device, dtype=dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        dtype = self.vera_lambda_d.dtype
        return (shared.vera_A[:, :self.in_features].to(dtype), shared.vera_B[:self.out_features].to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a, b = self._projections()
        h = self.vera_lambda_d * F.linear(self.vera_dropout(x.to(a.dtype)), a)
        return out + (self.vera_lambda_b * F.linear(h, b)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``diag(lambda_b) B diag(lambda_d) A`` in the base weight's layout."""
        a, b = self._projections()
        delta = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.vera_lambda_d.numel()}, merged={self.merged}"


def apply_vera(model: nn.Module, cfg: VeraConfig, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
    """Wrap the targeted linear layers of ``model`` with :class:`VeraLinear`, sharing one pair of
    projections registered on the model as ``peftkit_vera``.

    Raises:
        PeftkitError: no layer chosen, or ``r`` larger than the narrowest targeted dimension.
    """
    targets = [n for n in select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
               if cfg.in_layers(n)]
    if not targets:
        raise PeftkitError("no layer is left to adapt", "method.layers_to_transform", "name blocks the model has")
    shapes = {name: linear_shape(model.get_submodule(name))[:2] for name in targets}
    narrow = min(shapes, key=lambda n: min(shapes[n]))
    if cfg.r > min(shapes[narrow]):
        raise PeftkitError(f"VeRA rank r={cfg.r} is larger than the smallest targeted dimension "
                           f"({min(shapes[narrow])}, in {narrow})", "method.r",
                           f"use r up to {min(shapes[narrow])}, or leave the narrow layers out of target_modules")
    in_max, out_max = (max(s[i] for s in shapes.values()) for i in (0, 1))
    projections = VeraProjections(cfg.r, in_max, out_max, cfg.projection_prng_key, cfg.save_projection)
    device = model.get_submodule(targets[0]).weight.device
    model.add_module("peftkit_vera", projections.to(device))
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        replace_module(model, name, VeraLinear(base, projections, cfg.r, cfg.d_initial, cfg.dropout))
    return finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
