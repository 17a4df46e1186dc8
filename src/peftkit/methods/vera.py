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

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PeftkitError
from ..inject import linear_shape, plain_layer
from .base import Attached, Attachment
from .layer import DEFAULT, AdditiveUpdate, chosen_layers, wrap_targets
from .tuner_configs import VeraConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over the fan-in (``shape[1]``), from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen projections ``vera_A`` (``r x in_max``) and ``vera_B`` (``out_max x r``)."""

    top_level = True

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, saved: bool, adapter: str = DEFAULT):
        super().__init__()
        self.adapter = adapter
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((out_max, r), generator), persistent=False)
        self.saved = saved

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return {}  # nothing trains; the seed regenerates them

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return {"vera_A": self.vera_A, "vera_B": self.vera_B} if self.saved and name == self.adapter else {}


class VeraUpdate(AdditiveUpdate):
    """One VeRA adapter on one frozen linear layer (``nn.Linear``, quantized ones included, or
    ``Conv1D``), reading slices of its adapter's shared projections.

    Shapes: ``vera_lambda_b`` ``(out,)``, ``vera_lambda_d`` ``(r,)``; input ``(..., in_features)``,
    output ``(..., out_features)``.
    """

    def __init__(self, base: nn.Module, projections: VeraProjections, r: int, d_initial: float, dropout: float = 0.0):
        super().__init__(base)
        self._shared = [projections]  # a list, so the shared module is registered once, on the model
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=self.device, dtype=self.dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=self.device, dtype=self.dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        dtype = self.vera_lambda_d.dtype
        return (shared.vera_A[:, : self.in_features].to(dtype), shared.vera_B[: self.out_features].to(dtype))

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self._projections()
        h = self.vera_lambda_d * F.linear(self.vera_dropout(x.to(a.dtype)), a)
        return out + (self.vera_lambda_b * F.linear(h, b)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``diag(lambda_b) B diag(lambda_d) A`` (``out x in``)."""
        a, b = self._projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def extra_repr(self) -> str:
        return f"r={self.vera_lambda_d.numel()}"


def projections_name(adapter: str) -> str:
    """Where adapter ``adapter``'s shared projections sit on the model."""
    return "peftkit_vera" if adapter == DEFAULT else f"peftkit_vera_{adapter}"


def attach_vera(model: nn.Module, cfg: VeraConfig, at: Attachment) -> Attached:
    """Give the targeted linear layers of ``model`` adapter ``at.name``'s VeRA update, sharing one
    pair of projections registered on the model (:func:`projections_name`).

    Raises:
        PeftkitError: no layer chosen, or ``r`` larger than the narrowest targeted dimension.
    """
    targets = chosen_layers(model, cfg, at.modules_to_save)
    shapes = {name: linear_shape(model.get_submodule(name))[:2] for name in targets}
    narrow = min(shapes, key=lambda n: min(shapes[n]))
    if cfg.r > min(shapes[narrow]):
        raise PeftkitError(
            f"VeRA rank r={cfg.r} is larger than the smallest targeted dimension ({min(shapes[narrow])}, in {narrow})",
            "method.r",
            f"use r up to {min(shapes[narrow])}, or leave the narrow layers out of target_modules",
        )
    in_max, out_max = (max(s[i] for s in shapes.values()) for i in (0, 1))
    projections = VeraProjections(cfg.r, in_max, out_max, cfg.projection_prng_key, cfg.save_projection, at.name)
    device = plain_layer(model.get_submodule(targets[0])).weight.device
    model.add_module(projections_name(at.name), projections.to(device))
    wrap_targets(
        model,
        targets,
        lambda path, base: VeraUpdate(base, projections, cfg.r, cfg.d_initial, cfg.dropout),
        at.name,
        at.routing,
    )
    return Attached(replaced=targets)
