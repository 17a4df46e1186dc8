"""CPU speed for training steps, as a layer of its own: applied from outside to a finished
model, around each step, and undone after it.

:class:`StepSpeedups` looks at an adapted model once (preparing what it needs) and, inside
``with``, has the model's modules compute the same step faster:

* frozen linear layers multiply with weights cast and prepacked once (:mod:`.frozen`), and an
  adapted layer over one is handed that product (a LoRA update without dropout then computes
  with it as a single autograd node);
* ``nn.Dropout`` layers draw a cheaper, seeded mask (:mod:`.dropout`, with the C kernel of
  :mod:`.native` where a compiler is found);
* attention-probability dropout runs through an attention function with the same mask
  (plain SDPA models, and prefix tuning's attention).

:class:`~.decode.DecodeProducts` does the same for generation (a GRPO run's sampling): every
linear layer multiplies with a weight merged with the active adapters, cast and prepacked once
per generation.

Entering sets instance ``forward`` attributes and the model config's attention implementation;
leaving restores exactly what was there, on errors too. Outside ``with`` the model is the
ordinary model the methods built: evaluation, saving and merging never see this layer. Nothing
below the entry points imports it, and everything works without it. It pays on CPUs; on
accelerators their own kernels do this work (``train.accel: auto`` turns it on for CPUs only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .decode import DecodeProducts
from .dropout import attention_replacement, fast_dropout
from .frozen import FrozenLinears

__all__ = ["DecodeProducts", "StepSpeedups", "wanted"]


def wanted(setting: str | bool, device: torch.device | str) -> bool:
    """Whether ``train.accel`` turns the layer on for a run on ``device``: ``auto`` on CPUs only."""
    if setting == "auto":
        return torch.device(device).type == "cpu"
    return setting in (True, "on")


class StepSpeedups:
    """The speed layer for one model, entered around each training step's forward and backward.

    Args:
        model: the adapted model, unwrapped (not its DDP wrapper); its frozen weights must not
            change while this object is in use.
        dtype: the dtype the steps multiply in (autocast's, or float32).
        products: frozen linear layers multiply with prepared weights.
        fuse_lora: with ``products``, LoRA layers over prepared bases compute as one node.
        dropout: ``nn.Dropout`` layers draw the hashed masks (off: torch's own).
        attention: attention-probability dropout draws them too.

    The parts can be switched off one by one; the benchmarks measure each that way.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        *,
        products: bool = True,
        fuse_lora: bool = True,
        dropout: bool = True,
        attention: bool = True,
    ):
        self.model = model
        self.frozen = FrozenLinears(model, dtype, fuse_lora) if products else None
        dropouts = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0] if dropout else []
        self._forwards = (self.frozen.forwards() if products else []) + [(m, fast_dropout(m)) for m in dropouts]
        self.dropouts = len(dropouts)
        self.attention = attention_replacement(model) if attention else None
        self._saved: list[tuple[nn.Module, Any]] | None = None
        self._saved_attention: str | None = None

    def describe(self) -> str:
        """What the layer does to this model, for the run's log."""
        attention = f"attention dropout through {self.attention}" if self.attention else "attention as it is"
        frozen = self.frozen.describe() if self.frozen is not None else "frozen linear layers: their own forward"
        return f"speed layer: {frozen}; {self.dropouts} dropout layers with hashed masks; {attention}"

    def __enter__(self) -> StepSpeedups:
        if self._saved is not None:
            raise RuntimeError("StepSpeedups is already entered")
        self._saved = []
        for module, forward in self._forwards:
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
        if self.frozen is not None:
            self.frozen.configure(True)
        if self.attention is not None:
            config = self.model.config
            self._saved_attention = config._attn_implementation
            config._attn_implementation = self.attention
        return self

    def __exit__(self, *exc: object) -> None:
        if self.frozen is not None:
            self.frozen.configure(False)
        for module, previous in reversed(self._saved or []):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved = None
        if self._saved_attention is not None:
            self.model.config._attn_implementation = self._saved_attention
            self._saved_attention = None
