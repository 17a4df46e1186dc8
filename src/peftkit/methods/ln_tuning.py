"""LayerNorm tuning (peft's ``LN_TUNING``): train a copy of each normalization layer's own
weights (and biases), leaving every other weight frozen.

Each targeted normalization layer becomes a :class:`TunedNorm`: the frozen layer plus, per
adapter, a tuned copy of it. A pass uses the active adapter's copy, or the frozen layer when
none is active (the base exactly). Normalization works token by token, so a mixed batch runs
the frozen layer once and each adapter's copy on its own rows. Merging copies the tuned weights
into the base layer. File keys follow peft: ``<layer>.ln_tuning_layers.weight`` (and ``.bias``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_under, name_matches, replace_module
from .base import Attached, Attachment
from .layer import DEFAULT, Routing
from .tuner_configs import LNTuningConfig

#: the key of the tuned copy in a file, between the layer's path and the tensor's name
FILE_KEY = "ln_tuning_layers"


def is_norm(module: nn.Module) -> bool:
    """A normalization layer with weights of its own: ``nn.LayerNorm`` or a model's own
    LayerNorm/RMSNorm class."""
    named = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return (isinstance(module, nn.LayerNorm) or named) and isinstance(getattr(module, "weight", None), nn.Parameter)


class TunedNorm(nn.Module):
    """A frozen normalization layer and the tuned copies of any number of named adapters
    (``updates``, by adapter name, as :class:`~.layer.AdaptedLinear` keeps its updates).

    Shapes: input ``(batch, ..., hidden)``, output the same.
    """

    def __init__(self, base_layer: nn.Module, routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.updates = nn.ModuleDict()
        self.routing = routing
        self.merged: list[str] = []
        self._saved: list[torch.Tensor] = []  # the base's own weights while an adapter is merged

    def add(self, name: str) -> None:
        """Give adapter ``name`` a copy of the frozen layer to tune."""
        self.updates[name] = copy.deepcopy(self.base_layer)

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise PeftkitError(f"adapter {name!r} is merged", "adapter", "unmerge it first")
        if name in self.updates:
            del self.updates[name]

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        if name not in self.updates:
            return {}
        return {f"{FILE_KEY}.{k}": p for k, p in self.updates[name].named_parameters()}

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        rows = self.routing.rows
        if rows is None:
            name = next((n for n in self.routing.active if n in self.updates and n not in self.merged), None)
            return (self.base_layer if name is None else self.updates[name])(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for slot in rows.unique().tolist():
            name = self.routing.slots[slot]
            if name in self.updates:
                idx = (rows == slot).nonzero().squeeze(1)
                out = out.index_copy(0, idx, self.updates[name](x[idx], *args, **kwargs))
        return out

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Copy the active adapter's tuned weights into the base layer."""
        if self.merged:
            return
        name = next((n for n in (names or self.routing.active) if n in self.updates), None)
        if name is None:
            return
        base = list(self.base_layer.parameters())
        self._saved = [p.detach().clone() for p in base]
        for p, tuned in zip(base, self.updates[name].parameters()):
            p.copy_(tuned)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for p, saved in zip(self.base_layer.parameters(), self._saved):
            p.copy_(saved)
        self._saved, self.merged = [], []

    def unload(self) -> nn.Module:
        """The base layer holding the active adapter's tuned weights, to stand in this one's place."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={list(self.updates)}, merged={self.merged}"


def chosen_norms(model: nn.Module, cfg: LNTuningConfig, skip: list[str]) -> list[str]:
    """The normalization layers ``cfg`` targets (a layer already tuned counts as its layer)."""
    chosen: list[str] = []
    inside: str | None = None
    for path, module in model.named_modules():
        if not path or (inside is not None and path.startswith(inside)):
            continue
        if isinstance(module, TunedNorm):
            inside, module = path + ".", module.base_layer
        if (
            is_norm(module)
            and not is_under(path, skip)
            and not name_matches(path, cfg.exclude_modules)
            and (cfg.target_modules is None or name_matches(path, cfg.target_modules))
        ):
            chosen.append(path)
    if not chosen:
        raise PeftkitError(
            f"target_modules {cfg.target_modules!r} matches no normalization layer",
            "method.target_modules",
            "name LayerNorm or RMSNorm modules, or leave target_modules out",
        )
    return chosen


def attach_ln_tuning(model: nn.Module, cfg: LNTuningConfig, at: Attachment) -> Attached:
    """Give the targeted normalization layers adapter ``at.name``'s tuned copy, in place."""
    targets = chosen_norms(model, cfg, at.modules_to_save)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, TunedNorm):
            module = TunedNorm(module, at.routing)
            replace_module(model, path, module)
        module.add(at.name)
    return Attached(replaced=targets)
