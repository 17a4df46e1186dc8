"""Methods: what an adapter is. The registry, every method's config, and (loaded lazily, with
torch) the operations they share.

:mod:`.registry` maps a recipe's ``method.name`` to its config, its implementation and what it
can do; :mod:`.configs` holds the torch-free options; :mod:`.layer` is the adapted linear layer every
layer-updating method computes in; :mod:`.base` applies, freezes, reports
and merges; :mod:`.saving` writes and reads adapters in the PEFT file layout. One module per
method implements it (``lora``, ``vera``, ``lycoris`` for LoHa and LoKr, ``adalora``,
``bottleneck``, ``prefix``, ``prompt``, ``ptuning``, ``ia3``, ``inplace`` for BitFit and full
fine-tuning); :mod:`.tuner_configs` holds the options of the tuners beyond LoRA's own family. Nothing in this package imports the training loop, the
entry points or the speed layer (:mod:`peftkit.accel`).
"""

from __future__ import annotations

import importlib
from typing import Any

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
from .registry import METHODS, PEFT_TYPES, AnyMethod, Method
from .tuner_configs import AdaLoraConfig, LoHaConfig, LoKrConfig, PTuningConfig, VeraConfig

#: names that need torch -> the module that defines them
_LAZY = {
    **dict.fromkeys(["AdaptedLinear", "Update", "AdditiveUpdate", "Routing", "wrap_targets"], "layer"),
    **dict.fromkeys(
        [
            "AdapterModule",
            "adapters_disabled",
            "active_adapters",
            "Injection",
            "adapter_state_dict",
            "apply_method",
            "count_parameters",
            "default_modules_to_save",
            "injection_of",
            "merge",
            "merge_and_unload",
            "parameter_report",
            "resolve_modules_to_save",
            "set_trainable",
            "trainable_parameters",
            "trainable_state",
            "unmerge",
            "HEAD_NAMES",
            "check_mergeable",
        ],
        "base",
    ),
    **dict.fromkeys(["save_adapter", "load_adapter", "load_adapter_weights"], "saving"),
    "BottleneckAdapter": "bottleneck",
    "IA3Update": "ia3",
    "LoRAUpdate": "lora",
    "NamedAdapters": "named",
    "VeraUpdate": "vera",
    "LoHaUpdate": "lycoris",
    "LoKrUpdate": "lycoris",
    "AdaLoraUpdate": "adalora",
    "RankAllocator": "adalora",
    "PromptEncoder": "ptuning",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "METHODS",
    "PEFT_TYPES",
    "AdaLoraConfig",
    "AnyMethod",
    "BitFitConfig",
    "BottleneckConfig",
    "FullConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "Method",
    "MethodConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "VeraConfig",
]
__all__ += sorted(_LAZY)
