"""What every method shares: the adapter protocol, freezing, reports, applying and merging.

A method adds modules that implement :class:`AdapterModule`, or trains some of the base's
own parameters in place (BitFit's biases, full fine-tuning's everything). The protocol,
the in-place parameter names and the modules saved whole (``modules_to_save``, usually the
task head) are the one source of truth for what is trainable and what an adapter file holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_under, replace_module
from .configs import MethodConfig
from .registry import check_mergeable as _refuse_unmergeable
from .registry import method_of


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns trainable adapter parameters.

    It may also define ``export_state()`` (the tensors written to an adapter file, when
    they differ from the parameters, like prefix tuning's projected prefixes), list an untrained
    buffer among its parameters when checkpoints must carry it (AdaLoRA's rank mask), set
    ``top_level = True`` when those keys are not under the module's own path, and define
    ``peft_fields()`` (adapter_config.json fields only the applied module knows, such as widths).
    """

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters, keyed by their names relative to this module."""
        ...


class AdditiveMerge:
    """``merge`` / ``unmerge`` for a layer whose update is a weight difference: adds
    ``delta_weight()`` (in the base weight's layout) to ``base_layer.weight``, and takes it out."""

    merged: bool
    base_layer: nn.Module

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False


@dataclass
class Injection:
    """What applying a method did to a model; kept on the model as ``model.peftkit``.

    Attributes:
        method: the method's validated config (e.g. :class:`~peftkit.methods.lora.LoraConfig`).
        replaced: full names of the modules the method replaced or wrapped.
        modules_to_save: full names of modules trained and saved whole (heads).
        params: full names of base parameters trained in place (BitFit, full fine-tuning).
        schedule: what the method itself does during training, or None (AdaLoRA's rank
            allocation): ``penalty()`` is added to the training loss, ``after_step(step)`` runs
            after each optimizer step with the gradients in place, and ``state_dict()`` /
            ``load_state_dict()`` travel with checkpoints.
    """

    method: Any
    replaced: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    schedule: Any = None


def injection_of(model: nn.Module) -> Injection:
    """The :class:`Injection` recorded on ``model``; raises if no method was applied."""
    inj = getattr(model, "peftkit", None)
    if not isinstance(inj, Injection):
        raise ValueError("no peftkit method is applied to this model (call apply_method first)")
    return inj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _collect(model: nn.Module, exported: bool) -> dict[str, torch.Tensor]:
    inj = injection_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            export = getattr(module, "export_state", None) if exported else None
            items = export() if export is not None else module.adapter_params()
            top = exported and getattr(module, "top_level", False)
            for key, t in items.items():
                state[key if top else _join(name, key)] = t
    named = dict(model.named_parameters())
    for name in inj.params:
        state[name] = named[name]
    for name in inj.modules_to_save:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            state[_join(name, key)] = t
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor training changes, by its path in ``model``: what checkpoints hold.

    Adapter parameters, in-place trained parameters, and saved modules' whole states.
    """
    return _collect(model, exported=False)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds, keyed by module path (before the file's prefix).

    Equal to :func:`trainable_state` except where a module exports another form
    (``export_state``, with ``top_level`` keys), such as prefix tuning's projected prefixes.
    """
    return _collect(model, exported=True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates: the parameters among :func:`trainable_state`."""
    return {k: v for k, v in trainable_state(model).items() if isinstance(v, nn.Parameter)}


def set_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze exactly :func:`trainable_parameters`."""
    keep = {id(p) for p in trainable_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def finish(model: nn.Module, cfg: MethodConfig, *, replaced: list[str] = (), modules_to_save: list[str] = (),
           params: list[str] = ()) -> Injection:
    """Record what a method did on ``model`` (as ``model.peftkit``) and set what trains."""
    injection = Injection(method=cfg, replaced=list(replaced), modules_to_save=list(modules_to_save),
                          params=list(params))
    model.peftkit = injection
    set_trainable(model)
    return injection


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """One line: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.73``."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


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
    return method_of(cfg).apply(model, cfg, resolve_modules_to_save(model, modules_to_save), tokenizer)


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
    _refuse_unmergeable(injection_of(model).method)


def _mergeable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..quantize import is_quantized

    check_mergeable(model)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule) and hasattr(m, "merge")]
    quantized = [n for n, m in found if is_quantized(getattr(m, "base_layer", None) or m)]
    if quantized:  # adding a float update to packed 4-bit or int8 weights would lose it or fail
        raise PeftkitError(f"cannot merge into quantized weights ({quantized[0]})", "merge",
                           "dequantize the base first (peftkit merge does), or use the adapter unmerged")
    return found


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
    for name in [n for n, _ in model.named_children() if n.startswith("peftkit_")]:
        delattr(model, name)  # state the layers shared (VeRA's projections)
    if hasattr(model, "peftkit"):
        del model.peftkit
    return restored
