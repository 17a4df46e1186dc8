"""BitFit and full fine-tuning: the base's own parameters train in place; no module is added.

The adapter file holds the trained tensors themselves (BitFit's biases, full fine-tuning's
every weight), under their paths in the model.
"""

from __future__ import annotations

from torch import nn

from ..errors import PeftkitError
from ..inject import is_under
from .base import Attached, Attachment
from .configs import BitFitConfig, FullConfig


def attach_bitfit(model: nn.Module, cfg: BitFitConfig, at: Attachment) -> Attached:
    """Train every bias term of ``model`` (and the saved modules); freeze the rest."""
    names = [
        n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and not is_under(n, at.modules_to_save)
    ]
    if not names:
        raise PeftkitError(
            f"{type(model).__name__} has no bias terms for BitFit to train",
            "method.name",
            "choose another method (lora, ia3...) for this model",
        )
    return Attached(params=names)


def attach_full(model: nn.Module, cfg: FullConfig, at: Attachment) -> Attached:
    """Train every parameter of ``model``. :func:`~.base.adapters_disabled` needs the starting
    weights, so applying keeps a copy of them (the model's size again in memory)."""
    names = [n for n, _ in model.named_parameters() if not is_under(n, at.modules_to_save)]
    return Attached(params=names)
