"""The one registry of methods: a recipe's ``method.name`` -> its config, its implementation
and what it can do. Importable without torch.

Every file that needs to know something about a method asks here (can it merge, does it add
virtual tokens, can it train on a quantized base) instead of comparing method names. The
implementation is named, not imported: :meth:`Method.apply` imports it on first use, so
validating a recipe never loads torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from ..errors import PeftkitError
from .configs import (
    BitFitConfig,
    BottleneckConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    MethodConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from .tuner_configs import AdaLoraConfig, LNTuningConfig, LoHaConfig, LoKrConfig, PTuningConfig, VeraConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
        config: its options class (a recipe's ``method:`` block).
        implementation: ``"module:function"`` under :mod:`peftkit.methods`; the function takes
            ``(model, cfg, attachment)`` (:class:`~peftkit.methods.base.Attachment`: the adapter's
            name, the model's routing, the saved modules, the tokenizer), puts the adapter on
            the model in place and returns what it attached
            (:class:`~peftkit.methods.base.Attached`; typed ``Any`` here: this module stays
            beneath the implementations).
        mergeable: its update folds into the base weights (``merge``, ``merge_and_unload``).
        virtual_tokens: it prepends learned positions to every sequence (prompt, prefix), so
            packed sequences would share them.
        quantized_base: it can train on a quantized (frozen) base.
        named: its adapters only update linear layers, so several share a base under names
            (:class:`~peftkit.methods.named.NamedAdapters`), mixed rows included.
    """

    config: type[MethodConfig]
    implementation: str
    mergeable: bool = False
    virtual_tokens: bool = False
    quantized_base: bool = True
    named: bool = False

    @property
    def name(self) -> str:
        return self.config.model_fields["name"].default

    def attach(self, model: nn.Module, cfg: MethodConfig, attachment: Any) -> Any:
        module, function = self.implementation.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(model, cfg, attachment)


_ALL = (
    Method(LoraConfig, "lora:attach_lora", mergeable=True, named=True),
    Method(VeraConfig, "vera:attach_vera", mergeable=True, named=True),
    Method(LoHaConfig, "lycoris:attach_loha", mergeable=True, named=True),
    Method(LoKrConfig, "lycoris:attach_lokr", mergeable=True, named=True),
    Method(AdaLoraConfig, "adalora:attach_adalora", mergeable=True, named=True),
    Method(BottleneckConfig, "bottleneck:attach_bottleneck"),
    Method(PrefixTuningConfig, "prefix:attach_prefix", virtual_tokens=True),
    Method(PromptTuningConfig, "prompt:attach_prompt", virtual_tokens=True),
    Method(PTuningConfig, "ptuning:attach_ptuning", virtual_tokens=True),
    Method(IA3Config, "ia3:attach_ia3", mergeable=True, named=True),
    Method(BitFitConfig, "inplace:attach_bitfit", mergeable=True),
    Method(FullConfig, "inplace:attach_full", mergeable=True, quantized_base=False),
    Method(LNTuningConfig, "ln_tuning:attach_ln_tuning", mergeable=True, named=True),
)

#: a recipe's ``method.name`` -> the :class:`Method`
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
#: the ``peft_type`` written in adapter_config.json -> our method name
PEFT_TYPES: dict[str, str] = {m.config.peft_type: m.name for m in _ALL}
#: the type of a recipe's ``method:`` block: one of the configs, chosen by ``name`` (built from the
#: registry at run time; a type checker sees their common base)
if TYPE_CHECKING:
    AnyMethod = MethodConfig
else:
    AnyMethod = Annotated[Union[tuple(m.config for m in _ALL)], Field(discriminator="name")]  # noqa: UP007


def method_of(cfg: MethodConfig) -> Method:
    """The registry entry of a method config."""
    return METHODS[cfg.name]


def check_quantizable(cfg: MethodConfig) -> None:
    """The one-line error for a method that cannot train on a quantized base."""
    if not method_of(cfg).quantized_base:
        raise PeftkitError(
            f"{cfg.name} fine-tuning cannot train a quantized base",
            "quantization",
            "remove the quantization block, or choose a parameter-efficient method",
        )


def check_mergeable(cfg: MethodConfig) -> None:
    """The one-line error for a method whose update cannot fold into the base weights."""
    if not method_of(cfg).mergeable:
        raise PeftkitError(
            f"{cfg.name} adapters cannot be merged into the base weights",
            "method",
            "use the adapter unmerged (predict and eval load it as it is)",
        )
