"""Methods that train the base's own parameters in place: BitFit and full fine-tuning.

BitFit trains every bias (and the task head); full fine-tuning trains everything and is
the reference every comparison needs. Both save the tensors they trained in the adapter
layout under peftkit's own ``peft_type`` (``PEFTKIT_BITFIT``, ``PEFTKIT_FULL``); ``peft``
has no such types. Nothing needs folding into the base, so ``merge`` just writes the model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import nn

from ..errors import PeftkitError
from ..inject import is_under
from .base import Injection, MethodConfig, finish


class BitFitConfig(MethodConfig):
    """BitFit: train the bias terms only (plus the saved modules)."""

    peft_type: ClassVar[str] = "PEFTKIT_BITFIT"
    mergeable: ClassVar[bool] = True

    name: Literal["bitfit"] = "bitfit"

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        names = [n for n, _ in model.named_parameters()
                 if n.rsplit(".", 1)[-1] == "bias" and not is_under(n, modules_to_save)]
        if not names:
            raise PeftkitError(f"{type(model).__name__} has no bias terms for BitFit to train", "method.name",
                               "choose another method (lora, ia3...) for this model")
        return finish(model, self, modules_to_save=modules_to_save, params=names)


class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter trains; the "adapter" is the whole model's weights."""

    peft_type: ClassVar[str] = "PEFTKIT_FULL"
    mergeable: ClassVar[bool] = True

    name: Literal["full"] = "full"

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        names = [n for n, _ in model.named_parameters() if not is_under(n, modules_to_save)]
        return finish(model, self, modules_to_save=modules_to_save, params=names)
