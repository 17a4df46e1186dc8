"""The method registry and the operations every method shares.

``METHODS`` maps a recipe's ``method.name`` to its config class, whose ``apply`` changes a
model in place. Merging is defined by the adapter modules themselves (``merge``/``unmerge``
and a ``base_layer`` to restore); a config's ``mergeable`` says whether the method can merge
at all (BitFit and full fine-tuning trained the base in place: nothing to fold).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field
from torch import nn

from ..errors import PeftkitError
from ..inject import is_under, replace_module
from .base import (
    AdapterModule,
    Injection,
    MethodConfig,
    adapter_state_dict,
    count_parameters,
    injection_of,
    parameter_report,
    set_trainable,
    trainable_parameters,
    trainable_state,
)
from .bottleneck import BottleneckAdapter, BottleneckConfig
from .ia3 import IA3Config, IA3Linear
from .lora import LoraConfig, LoRALinear
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .selective import BitFitConfig, FullConfig

#: a recipe's ``method.name`` -> its config class (whose ``apply`` changes the model)
METHODS: dict[str, type[MethodConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (LoraConfig, BottleneckConfig, PrefixTuningConfig, PromptTuningConfig, IA3Config,
                BitFitConfig, FullConfig)
}
#: the ``peft_type`` written in adapter_config.json -> our method name
PEFT_TYPES = {cls.peft_type: name for name, cls in METHODS.items()}

#: the type of a recipe's ``method:`` block: one of the configs, chosen by ``name``
AnyMethod = Annotated[Union[tuple(METHODS.values())], Field(discriminator="name")]


def apply_method(model: nn.Module, cfg: MethodConfig, modules_to_save: list[str] | None = None,
                 tokenizer: Any = None) -> Injection:
    """Apply the method ``cfg`` describes to ``model`` in place; freeze everything else.

    Args:
        model: the model to adapt.
        cfg: a method config (``LoraConfig``...).
        modules_to_save: modules trained and saved whole; defaults to ``cfg.modules_to_save``,
            else to the model's task head (:func:`default_modules_to_save`).
        tokenizer: the model's tokenizer (prompt tuning's ``init_text`` needs it).

    Returns:
        The :class:`Injection` (also stored as ``model.peftkit``), which lists what was changed.
    """
    if getattr(model, "peftkit", None) is not None:
        raise PeftkitError("this model already has a peftkit method applied", fix="load a fresh base model")
    if modules_to_save is None:
        modules_to_save = cfg.modules_to_save
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(model)
    return cfg.apply(model, resolve_modules_to_save(model, modules_to_save), tokenizer=tokenizer)


def resolve_modules_to_save(model: nn.Module, entries: list[str]) -> list[str]:
    """Full module names that ``modules_to_save`` entries select, with ``peft``'s rule.

    ``peft`` selects every module whose full name ends with an entry (plain string suffix:
    ``"classifier"`` also selects DistilBERT's ``pre_classifier``); entries that match
    nothing are ignored (``"score"`` on a BERT model). A module inside one already
    selected is not listed again.
    """
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(e) for e in entries) and not is_under(name, chosen):
            chosen.append(name)
    return chosen


HEAD_NAMES = ("classifier", "score", "pre_classifier")


def default_modules_to_save(model: nn.Module, newly_initialized: list[str] = ()) -> list[str]:
    """The task head: known head names plus every module the base checkpoint lacked.

    A module that was randomly initialised when the base was loaded (DistilBERT's
    ``pre_classifier``, DeBERTa's ``pooler``) must be trained and saved, or the adapter
    would not reproduce the trained model when loaded onto a fresh base.
    """
    names = dict(model.named_modules())
    chosen = [n for n in HEAD_NAMES if n in names]
    for n in newly_initialized:
        if n in names and not any(n == c or n.startswith(c + ".") for c in chosen):
            chosen.append(n)
    return chosen


def check_mergeable(model: nn.Module) -> None:
    """Raise the one-line error when the method on ``model`` cannot merge into the base."""
    method = injection_of(model).method
    if not method.mergeable:
        raise PeftkitError(f"{method.name} adapters cannot be merged into the base weights", "method",
                           "use the adapter unmerged (predict and eval load it as it is)")


def _mergeable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    check_mergeable(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule)]


def merge(model: nn.Module) -> None:
    """Merge every adapter update into the base weights (reversible with :func:`unmerge`)."""
    for _, module in _mergeable(model):
        module.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    for _, module in _mergeable(model):
        module.unmerge()


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge, then put the plain base layers back; returns the names restored.

    Afterwards ``model`` is an ordinary model with no peftkit modules in it; its heads
    (``modules_to_save``) keep their trained weights.
    """
    restored = []
    for name, module in _mergeable(model):
        module.merge()
        replace_module(model, name, module.base_layer)
        restored.append(name)
    if hasattr(model, "peftkit"):
        del model.peftkit
    return restored


__all__ = [
    "METHODS", "PEFT_TYPES", "AdapterModule", "AnyMethod", "BitFitConfig", "BottleneckAdapter", "BottleneckConfig",
    "FullConfig", "IA3Config", "IA3Linear", "Injection", "LoraConfig", "LoRALinear", "MethodConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "trainable_state",
    "adapter_state_dict", "apply_method", "check_mergeable", "count_parameters", "default_modules_to_save",
    "injection_of",
    "merge", "merge_and_unload", "parameter_report", "set_trainable", "trainable_parameters", "unmerge",
]
