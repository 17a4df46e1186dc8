"""The method registry and the operations every method shares.

``METHODS`` maps a recipe's ``method.name`` to its config class, whose ``apply`` changes a
model in place. Merging is defined by the adapter modules themselves (``merge``/``unmerge``
and a ``base_layer`` to restore); a config's ``mergeable`` says whether the method can merge
at all (BitFit and full fine-tuning trained the base in place: nothing to fold).

The configs (:mod:`.configs`) import without torch, so validating a recipe is quick; the
modules and operations below load torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .configs import (
    METHODS,
    PEFT_TYPES,
    AnyMethod,
    BitFitConfig,
    BottleneckConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    MethodConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)

#: names that need torch -> the module that defines them
_LAZY = {
    **dict.fromkeys(["AdapterModule", "Injection", "adapter_state_dict", "apply_method", "check_mergeable",
                     "count_parameters", "default_modules_to_save", "injection_of", "merge", "merge_and_unload",
                     "parameter_report", "resolve_modules_to_save", "set_trainable", "trainable_parameters",
                     "trainable_state", "unmerge", "HEAD_NAMES"], "base"),
    "BottleneckAdapter": "bottleneck", "IA3Linear": "ia3", "LoRALinear": "lora",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["METHODS", "PEFT_TYPES", "AnyMethod", "BitFitConfig", "BottleneckConfig", "FullConfig", "IA3Config",
           "LoraConfig", "MethodConfig", "PrefixTuningConfig", "PromptTuningConfig"]
__all__ += sorted(_LAZY)
