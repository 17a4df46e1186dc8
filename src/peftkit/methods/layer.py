"""The adapted linear layer: one frozen linear layer and the updates of any number of named
adapters, of any methods that update linear layers, routed per pass or per row.

A method that updates linear layers writes one :class:`Update` subclass (one adapter's tensors
on one layer, and its maths, in ``forward``) and attaches with :func:`wrap_targets`; the
:class:`AdaptedLinear` it wraps a layer in holds every adapter's update there and reads the
model's :class:`Routing`: the active adapters for every row, one per row of a mixed batch, or
none (the base exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_linear, linear_shape, replace_module, select_targets
from .configs import DEFAULT_ADAPTER

#: the name of the adapter a method puts on a model to train (peft's name for it too)
DEFAULT = DEFAULT_ADAPTER


class Routing:
    """Which adapters the next forward pass of one model uses; every adapted module of the model
    reads the same one.

    Attributes:
        active: the adapters applied to every row when ``rows`` is None (empty: the base alone).
        rows: ``(batch,)`` slot indices, one per row, or None; slot 0 is the base alone.
        slots: the adapter name of each slot (index 0 is None).
    """

    def __init__(self, active: tuple[str, ...] = ()) -> None:
        self.active: tuple[str, ...] = active
        self.rows: torch.Tensor | None = None
        self.slots: list[str | None] = [None, *active]

    def on(self, name: str) -> bool:
        """Whether adapter ``name`` applies to every row of the next pass."""
        return self.rows is None and name in self.active


class Update(nn.Module):
    """One adapter's tensors on one linear layer, and its maths: subclassed once per method.

    ``forward(x, out, base)`` takes the layer's input ``x`` and the frozen layer's output ``out``
    (computed on ``x`` scaled by :meth:`input_scale`) and returns the adapted output; this is the
    only place a method's per-layer computation is written. ``tensors()`` are the tensors an
    adapter file holds for this layer, under peft's names relative to the layer.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        weight = base.weight
        #: the dtype the update computes in (float32 over integer-quantized weights)
        self.dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.device = weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    def input_scale(self) -> torch.Tensor | None:
        """``(in,)`` factors the base layer's input is multiplied by (IA3 on feed-forward layers)."""
        return None

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, base: nn.Module) -> None:
        raise NotImplementedError

    def unmerge(self, base: nn.Module) -> None:
        raise NotImplementedError


class AdditiveUpdate(Update):
    """An update that is a weight difference ``dW``: merging adds ``delta_weight()`` (``out x
    in``) to the base weight, in the base's own layout, and unmerging takes it out."""

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _in_layout(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.add_(self._in_layout().to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.weight.sub_(self._in_layout().to(base.weight.dtype))


class AdaptedLinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, quantized ones included, or ``Conv1D``) and the
    updates of any number of named adapters, of any methods that update linear layers.

    The model's :class:`Routing` says which apply: the active ones to every row, or one per row
    of a mixed batch (each row's update computed on its own rows, the base product once for the
    whole batch), or none (the base layer exactly). Shapes: input ``(batch, ..., in_features)``,
    output ``(batch, ..., out_features)``.

    Attributes:
        base_layer: the frozen layer.
        updates: adapter name -> its :class:`Update` here.
        merged: the adapters whose updates are folded into ``base_layer``'s weights.
        product: a prepared frozen product (:mod:`peftkit.accel` sets it around training steps);
            an update that can fuse with it (``fused``) then computes as one node.
    """

    #: :func:`peftkit.inject.linear_layer_names` sees this module as the linear layer it wraps
    wraps_layer = True

    def __init__(self, base_layer: nn.Module, routing: Routing | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.updates = nn.ModuleDict()
        self.routing = routing if routing is not None else Routing((DEFAULT,))
        self.merged: list[str] = []
        self.product: Any = None

    # ---- slots ----
    def add(self, name: str, update: Update) -> None:
        """Put adapter ``name``'s update on this layer."""
        self.updates[name] = update

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise PeftkitError(f"adapter {name!r} is merged", "adapter", "unmerge it first")
        if name in self.updates:
            del self.updates[name]

    def update_of(self, name: str = DEFAULT) -> Update | None:
        return self.updates._modules.get(name)

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        update = self.update_of(name)
        return {} if update is None else update.tensors()

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        update = self.update_of(name)
        return {} if update is None else update.export_state()

    # ---- the forward pass ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routing.rows
        if rows is not None:
            return self._mixed(x, rows)
        updates = self.updates._modules
        active = [u for n in self.routing.active if (u := updates.get(n)) is not None and n not in self.merged]
        if not active:
            return self.base_layer(x)
        if len(active) == 1 and self.product is not None:
            fused = getattr(active[0], "fused", None)
            if fused is not None and active[0].can_fuse():
                return fused(x, self.product)
        return self._run(x, active)

    def _run(self, x: torch.Tensor, active: list[Update]) -> torch.Tensor:
        h = x
        for u in active:
            scale = u.input_scale()
            if scale is not None:
                h = (h * scale).to(x.dtype)
        out = self.base_layer(h)
        for u in active:
            out = u(x, out, self.base_layer)
        return out

    def _mixed(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if rows.shape[0] != n:
            raise RuntimeError(
                f"a mixed-adapter batch of {rows.shape[0]} rows met an input of {n} rows; "
                "mixed batches need batch-first inputs"
            )
        present = rows.unique().tolist()
        groups = {s: u for s in present if (u := self.update_of(self.routing.slots[s] or "")) is not None}
        if self.merged and groups:
            raise PeftkitError(
                "a layer with merged adapters cannot take a mixed batch", "adapter", "unmerge the adapters first"
            )
        if not groups:
            return self.base_layer(x)
        if len(present) == 1:
            return self._run(x, list(groups.values()))
        per_row = (n,) + (1,) * (x.ndim - 2) + (-1,)
        scales = {s: v for s, u in groups.items() if (v := u.input_scale()) is not None}
        h = x
        if scales:
            factors = torch.ones(n, self.in_features, device=x.device, dtype=next(iter(scales.values())).dtype)
            for s, v in scales.items():
                factors[rows == s] = v.flatten()
            h = (x * factors.view(per_row)).to(x.dtype)
        out = self.base_layer(h)
        stacked = type(next(iter(groups.values())))
        mixed = getattr(stacked, "mixed_rows", None)
        if mixed is not None and all(type(u) is stacked for u in groups.values()) and not torch.is_grad_enabled():
            return mixed(groups, x, out, rows, self)
        for s, u in groups.items():
            idx = (rows == s).nonzero().squeeze(1)
            out = out.index_copy(0, idx, u(x[idx], out[idx], self.base_layer))
        return out

    # ---- merging ----
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the active adapters' updates (or ``names``') into the base weights."""
        for name in names if names is not None else list(self.routing.active):
            update = self.update_of(name)
            if update is not None and name not in self.merged:
                update.merge(self.base_layer)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Take every merged update out again, the last merged first."""
        while self.merged:
            self.updates[self.merged.pop()].unmerge(self.base_layer)

    def unload(self) -> nn.Module:
        """The base layer with the active adapters merged into it, to stand in this layer's place."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={list(self.updates)}, merged={self.merged}"


def wrap_targets(
    model: nn.Module, targets: list[str], make: Callable[[str, nn.Module], Update], name: str, routing: Routing
) -> None:
    """The shared "find targets, wrap them": give each layer in ``targets`` adapter ``name``'s
    update ``make(path, base_layer)``, wrapping it in an :class:`AdaptedLinear` on first use."""
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, AdaptedLinear):
            if not is_linear(module):
                raise PeftkitError(f"{path} is not a linear layer", "method.target_modules", "target linear layers")
            module = AdaptedLinear(module, routing)
            replace_module(model, path, module)
        module.add(name, make(path, module.base_layer))


def chosen_layers(model: nn.Module, cfg: Any, modules_to_save: list[str]) -> list[str]:
    """The linear layers ``cfg`` targets (``target_modules``, ``exclude_modules`` and, where the
    config has them, ``layers_to_transform``/``layers_pattern``), never inside a saved module.

    Raises:
        PeftkitError: nothing left to adapt.
    """
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
    in_layers = getattr(cfg, "in_layers", None)
    targets = [n for n in targets if in_layers is None or in_layers(n)]
    if not targets:
        raise PeftkitError(
            f"layers_to_transform {getattr(cfg, 'layers_to_transform', None)!r} leaves no targeted layer",
            "method.layers_to_transform",
            "name block indices the model has",
        )
    return targets
