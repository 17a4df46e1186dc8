"""peftkit: parameter-efficient fine-tuning of transformer models, natively in PyTorch.

The Python API::

    from peftkit import LoraConfig, apply_method, save_adapter
    injection = apply_method(model, LoraConfig(r=8, target_modules=["query", "value"]))
    print(injection.replaced, parameter_report(model))
    save_adapter(model, "my-adapter", base_model="bert-base-uncased")

Training from a config: ``from peftkit.train import train``.
Names are imported lazily so that ``import peftkit`` (and the CLI's ``--help``) is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PeftkitError": "errors",
    "LoraConfig": "methods",
    "LoRAUpdate": "methods",
    "AdaptedLinear": "methods",
    "adapters_disabled": "methods",
    "active_adapters": "methods",
    "NamedAdapters": "methods",
    "Injection": "methods",
    "METHODS": "methods",
    "apply_method": "methods",
    "merge": "methods",
    "unmerge": "methods",
    "merge_and_unload": "methods",
    "parameter_report": "methods",
    "count_parameters": "methods",
    "trainable_parameters": "methods",
    "adapter_state_dict": "methods",
    "default_modules_to_save": "methods",
    "save_adapter": "methods.saving",
    "read_adapter": "adapter_io",
    "load_adapter_weights": "methods.saving",
    "load_adapter": "methods.saving",
    "RunConfig": "config",
    "load_recipe": "config",
    "load_adapted_classifier": "multi",
    "load_adapted_lm": "multi",
    "evaluate_adapter": "predict",
    "merge_to_folder": "predict",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
