"""BitFit and full fine-tuning: the base's own parameters train in place; no module is added.

The adapter file holds the trained tensors themselves (BitFit's biases, full fine-tuning's
every weight), under their paths in the model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PeftkitError
from ..inject import is_under
from .base import Injection, finish
from .configs import BitFitConfig, FullConfig


def apply_bitfit(model: nn.Module, cfg: BitFitConfig, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
    """Train every bias term of ``model`` (and the saved modules); freeze the rest."""
    names = [n for n, _ in model.named_parameters()
             if n.rsplit(".", 1)[-1] == "bias" and not is_under(n, modules_to_save)]
    if not names:
        raise PeftkitError(f"{type(model).__name__} has no bias terms for BitFit to train", "method.name",
                           "choose another method (lora, ia3...) for this model")
    return finish(model, cfg, modules_to_save=modules_to_save, params=names)


def apply_full(model: nn.Module, cfg: FullConfig, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
    """Train every parameter of ``model``."""
    names = [n for n, _ in model.named_parameters() if not is_under(n, modules_to_save)]
    return finish(model, cfg, modules_to_save=modules_to_save, params=names)
