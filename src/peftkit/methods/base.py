"""What every method shares: the config base class, the adapter protocol, freezing, reports.

A method adds modules that implement :class:`AdapterModule`, or trains some of the base's
own parameters in place (BitFit's biases, full fine-tuning's everything). The protocol,
the in-place parameter names and the modules saved whole (``modules_to_save``, usually the
task head) are the one source of truth for what is trainable and what an adapter file holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: file keys of peft-format adapters start with this, then the module path in the model
KEY_PREFIX = "base_model.model."


class MethodConfig(BaseModel):
    """Options every method has; each method subclasses this with its own ``name``.

    Class attributes:
        peft_type: what ``adapter_config.json`` calls the method (peft's name, or a
            ``PEFTKIT_*`` name for methods peft does not have).
        mergeable: whether :func:`peftkit.methods.merge_and_unload` can fold it into the base.
    """

    model_config = ConfigDict(extra="forbid")

    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    name: str
    modules_to_save: list[str] | None = Field(
        None, description="modules trained and saved whole; default: the task head"
    )

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> "Injection":
        """Change ``model`` in place (see :func:`peftkit.methods.apply_method`)."""
        raise NotImplementedError

    def to_peft(self, injection: "Injection", model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields for this method (``task_type`` and base are added by the writer)."""
        return {"peft_type": self.peft_type, **self.model_dump(exclude={"name"}),
                "modules_to_save": injection.modules_to_save or None}

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "MethodConfig":
        """The config an adapter_config.json describes."""
        fields = {k: v for k, v in cfg.items() if k in cls.model_fields and k != "name"}
        return cls(**fields)

    # where each tensor goes in adapter_model.safetensors
    def file_key(self, key: str) -> str:
        return KEY_PREFIX + key

    def model_key(self, file_key: str) -> str:
        return file_key.removeprefix(KEY_PREFIX)


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns trainable adapter parameters.

    It may also define ``export_state()`` (the tensors written to an adapter file, when
    they differ from the parameters, like prefix tuning's projected prefixes) and set
    ``top_level = True`` when those keys are not under the module's own path.
    """

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
        params: full names of base parameters trained in place (BitFit, full fine-tuning).
    """

    method: Any
    replaced: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


def injection_of(model: nn.Module) -> Injection:
    """The :class:`Injection` recorded on ``model``; raises if no method was applied."""
    inj = getattr(model, "peftkit", None)
    if not isinstance(inj, Injection):
        raise ValueError("no peftkit method is applied to this model (call apply_method first)")
    return inj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _collect(model: nn.Module, exported: bool) -> dict[str, torch.Tensor]:
    inj = injection_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            export = getattr(module, "export_state", None) if exported else None
            items = export() if export is not None else module.adapter_params()
            top = exported and getattr(module, "top_level", False)
            for key, t in items.items():
                state[key if top else _join(name, key)] = t
    named = dict(model.named_parameters())
    for name in inj.params:
        state[name] = named[name]
    for name in inj.modules_to_save:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            state[_join(name, key)] = t
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor training changes, by its path in ``model``: what checkpoints hold.

    Adapter parameters, in-place trained parameters, and saved modules' whole states.
    """
    return _collect(model, exported=False)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds, keyed by module path (before the file's prefix).

    Equal to :func:`trainable_state` except where a module exports another form
    (``export_state``, with ``top_level`` keys), such as prefix tuning's projected prefixes.
    """
    return _collect(model, exported=True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates: the parameters among :func:`trainable_state`."""
    return {k: v for k, v in trainable_state(model).items() if isinstance(v, nn.Parameter)}


def set_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze exactly :func:`trainable_parameters`."""
    keep = {id(p) for p in trainable_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def finish(model: nn.Module, cfg: MethodConfig, *, replaced: list[str] = (), modules_to_save: list[str] = (),
           params: list[str] = ()) -> Injection:
    """Record what a method did on ``model`` (as ``model.peftkit``) and set what trains."""
    injection = Injection(method=cfg, replaced=list(replaced), modules_to_save=list(modules_to_save),
                          params=list(params))
    model.peftkit = injection
    set_trainable(model)
    return injection


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
