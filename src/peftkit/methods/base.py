"""What every method shares: the adapter protocol, freezing, and parameter reports.

A method adds modules that implement :class:`AdapterModule`. The protocol, and the list of
modules saved whole (``modules_to_save``, usually the task head), are the one source of
truth for what is trainable and what goes into an adapter file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..inject import is_under


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns trainable adapter parameters."""

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters, keyed by their names relative to this module."""
        ...


@dataclass
class Injection:
    """What applying a method did to a model; kept on the model as ``model.peftkit``.

    Attributes:
        method: the method's validated config (e.g. :class:`~peftkit.methods.lora.LoraConfig`).
        replaced: full names of the modules the method replaced or wrapped.
        modules_to_save: full names of modules trained and saved whole (heads).
    """

    method: Any
    replaced: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def injection_of(model: nn.Module) -> Injection:
    """The :class:`Injection` recorded on ``model``; raises if no method was applied."""
    inj = getattr(model, "peftkit", None)
    if not isinstance(inj, Injection):
        raise ValueError("no peftkit method is applied to this model (call apply_method first)")
    return inj


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds: adapter parameters and saved modules' states.

    Keys are full module paths in ``model`` (``bert.encoder.layer.0.attention.self.query.lora_A.weight``,
    ``classifier.weight``).
    """
    inj = injection_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            for key, p in module.adapter_params().items():
                state[f"{name}.{key}" if name else key] = p
    for name in inj.modules_to_save:
        for key, t in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = t
    return state


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters plus every parameter of the saved modules."""
    inj = injection_of(model)
    params = {k: v for k, v in adapter_state_dict(model).items() if isinstance(v, nn.Parameter)}
    for name, p in model.named_parameters():
        if is_under(name, inj.modules_to_save):
            params[name] = p
    return params


def set_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze exactly :func:`trainable_parameters`."""
    keep = {id(p) for p in trainable_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """One line: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.73``."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
