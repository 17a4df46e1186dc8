"""Finding the layers a method targets, and replacing them visibly.

Target semantics follow Hugging Face PEFT's ``target_modules``:

* a list of names: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``);
* a single string: a regular expression that must match the full name (``re.fullmatch``);
* ``"all-linear"``: every linear layer except the model's output embedding (LM head).

Only linear layers are candidates: ``nn.Linear`` and its subclasses (quantized linears
included) and GPT-2's ``Conv1D``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import PeftkitError
from .methods.configs import ALL_LINEAR, name_matches

if TYPE_CHECKING:  # torch loads on first use
    from torch import nn


def is_linear(module: nn.Module) -> bool:
    """True for modules LoRA can wrap: ``nn.Linear`` (and subclasses) and ``Conv1D``."""
    from torch import nn

    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_plain_linear(module: nn.Module) -> bool:
    """``nn.Linear`` itself or ``Conv1D``: layers whose forward is one product with their own
    float weight. Subclasses, quantized layers among them, have forwards of their own."""
    from torch import nn

    return type(module) is nn.Linear or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def plain_layer(module: nn.Module) -> nn.Module:
    """The layer itself, or the one a module wrapping it for adapters (``wraps_layer``) holds."""
    return module.base_layer if getattr(module, "wraps_layer", False) else module


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear or GPT-2 ``Conv1D`` (or of the
    one an adapter wrapper holds)."""
    from torch import nn

    layer = plain_layer(layer)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    in_f, out_f = layer.weight.shape  # Conv1D stores its weight as (in, out)
    return in_f, out_f, True


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """True when ``name`` is one of ``prefixes`` or a submodule of one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer in ``model``, in module order. A module that wraps a
    linear layer for adapters (``wraps_layer``) stands for the layer it wraps."""
    names: list[str] = []
    wrapper = None
    for n, m in model.named_modules():
        if not n or (wrapper is not None and n.startswith(wrapper)):
            continue
        if getattr(m, "wraps_layer", False):
            wrapper = n + "."
            m = m.base_layer
        if is_linear(m):
            names.append(n)
    return names


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The model's LM head (its output embedding), or None: the one place that asks. A model
    wrapped for data parallelism (DDP, as ``accelerate`` prepares it) is asked through its wrapper."""
    from torch import nn

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def output_embedding_name(model: nn.Module) -> str | None:
    """The name of the LM head, if the model has one (it is never a LoRA target)."""
    head = output_embedding(model)
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def select_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Names of the linear layers that ``target_modules`` selects.

    Args:
        model: the model to search.
        target_modules: list of name suffixes, a regex, or ``"all-linear"``.
        exclude_modules: the same forms (no ``all-linear``); matches are dropped.
        skip: module names whose whole subtree is never targeted (trained heads).

    Raises:
        PeftkitError: when nothing matches; the message lists the linear layers that exist.
    """
    skip = list(skip)
    lm_head = output_embedding_name(model)
    if lm_head:
        skip.append(lm_head)
    candidates = [n for n in linear_layer_names(model) if not is_under(n, skip)]
    if target_modules == ALL_LINEAR:
        chosen = candidates
    else:
        chosen = [n for n in candidates if name_matches(n, target_modules)]
    chosen = [n for n in chosen if not name_matches(n, exclude_modules)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise PeftkitError(
            f"target_modules {target_modules!r} matches no linear layer",
            "method.target_modules",
            f"use names from: {', '.join(leaves)} (or a regex, or all-linear)",
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` was and return the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
