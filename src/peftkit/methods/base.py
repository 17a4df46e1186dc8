"""What every method shares: the adapter protocol, attaching, freezing, reports, adapters off,
and merging.

Methods that update linear layers do it through the adapted layer of :mod:`.layer`. Other
methods add modules that implement
:class:`AdapterModule`, or train some of the base's own parameters in place (BitFit's biases,
full fine-tuning's everything). The protocol, the in-place parameter names and the modules
saved whole (``modules_to_save``, usually the task head) are the one source of truth for what
is trainable and what an adapter file holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_under, replace_module
from ..quantize import is_quantized
from .configs import MethodConfig
from .layer import DEFAULT, Routing
from .registry import check_mergeable as _refuse_unmergeable
from .registry import method_of


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns adapter tensors, under adapter names.

    ``adapter_params(name)`` gives the adapter ``name``'s own tensors on this module, keyed by
    their names relative to it (empty when ``name`` has none here). It may also define
    ``export_state(name)`` (the tensors written to an adapter file, when they differ from the
    parameters, like prefix tuning's projected prefixes), list an untrained buffer among its
    tensors when checkpoints must carry it (AdaLoRA's rank mask), set ``top_level = True`` when
    those keys are not under the module's own path, and define ``peft_fields()``
    (adapter_config.json fields only the applied module knows, such as widths).
    """

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        """The adapter ``name``'s tensors, keyed by their names relative to this module."""
        ...


@dataclass
class Attachment:
    """What a method's ``attach`` is told: the adapter's name, the model's routing, the modules
    saved whole (never wrapped) and the tokenizer (prompt tuning's ``init_text`` needs it)."""

    name: str = DEFAULT
    routing: Routing = field(default_factory=lambda: Routing((DEFAULT,)))
    modules_to_save: list[str] = field(default_factory=list)
    tokenizer: Any = None


@dataclass
class Attached:
    """What a method's ``attach`` put on a model.

    Attributes:
        replaced: full names of the layers it wrapped (or gave an update of this adapter).
        params: full names of base parameters it trains in place (BitFit, full fine-tuning).
        schedule: what the method itself does during training (:class:`MethodHooks`), or None.
    """

    replaced: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    schedule: Any = None


class MethodHooks(Protocol):
    """What a method may do during training besides its forward (AdaLoRA's rank allocation)."""

    def penalty(self) -> torch.Tensor:
        """A term added to the training loss."""
        ...

    def after_step(self, step: int) -> None:
        """Runs after optimizer step ``step`` (1-based), with the gradients still in place."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Injection:
    """What applying a method did to a model; kept on the model as ``model.peftkit``.

    Attributes:
        method: the method's validated config (e.g. :class:`~peftkit.methods.lora.LoraConfig`).
        replaced: full names of the modules the method replaced or wrapped.
        modules_to_save: full names of modules trained and saved whole (heads).
        params: full names of base parameters trained in place (BitFit, full fine-tuning).
        schedule: the method's training hooks (:class:`MethodHooks`), or None.
        routing: which adapters the model's forward passes use (:class:`Routing`).
        originals: the starting values of every tensor trained in place (saved modules,
            BitFit's biases, full fine-tuning's weights), which :func:`adapters_disabled` puts
            back while it runs.
        disabled: how many :func:`adapters_disabled` blocks are open.
        methods: every adapter's method config, by adapter name (the trained one is "default").
    """

    method: Any
    replaced: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    schedule: MethodHooks | None = None
    routing: Routing = field(default_factory=lambda: Routing((DEFAULT,)))
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    disabled: int = 0
    methods: dict[str, Any] = field(default_factory=dict)


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` itself, or the model a data-parallel wrapper holds."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def injection_of(model: nn.Module) -> Injection:
    """The :class:`Injection` recorded on ``model``; raises if no method was applied."""
    inj = getattr(unwrapped(model), "peftkit", None)
    if not isinstance(inj, Injection):
        raise ValueError("no peftkit method is applied to this model (call apply_method first)")
    return inj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _collect(model: nn.Module, exported: bool, name: str = DEFAULT) -> dict[str, torch.Tensor]:
    inj = injection_of(model)
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule):
            export = getattr(module, "export_state", None) if exported else None
            items = export(name) if export is not None else module.adapter_params(name)
            top = exported and getattr(module, "top_level", False)
            for key, t in items.items():
                state[key if top else _join(path, key)] = t
    if name != DEFAULT:
        return state
    named = dict(model.named_parameters())
    for path in inj.params:
        state[path] = named[path]
    for path in inj.modules_to_save:
        for key, t in model.get_submodule(path).state_dict(keep_vars=True).items():
            state[_join(path, key)] = t
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor training changes, by its path in ``model``: what checkpoints hold.

    The trained adapter's tensors, in-place trained parameters, and saved modules' whole states.
    """
    return _collect(model, exported=False)


def adapter_state_dict(model: nn.Module, name: str = DEFAULT) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds, keyed by module path (before the file's prefix).

    Equal to :func:`trainable_state` except where a module exports another form
    (``export_state``, with ``top_level`` keys), such as prefix tuning's projected prefixes.
    ``name`` picks a named adapter's tensors (its layer updates only) instead of the trained one's.
    """
    return _collect(model, exported=True, name=name)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates: the parameters among :func:`trainable_state`."""
    return {k: v for k, v in trainable_state(model).items() if isinstance(v, nn.Parameter)}


def set_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze exactly :func:`trainable_parameters`."""
    keep = {id(p) for p in trainable_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


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


def apply_method(
    model: nn.Module, cfg: MethodConfig, modules_to_save: list[str] | None = None, tokenizer: Any = None
) -> Injection:
    """Apply the method ``cfg`` describes to ``model`` in place, as the adapter "default" that
    trains; freeze everything else.

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
    saved = resolve_modules_to_save(model, modules_to_save)
    routing = Routing((DEFAULT,))
    attached = method_of(cfg).attach(model, cfg, Attachment(DEFAULT, routing, saved, tokenizer))
    injection = Injection(
        method=cfg,
        replaced=attached.replaced,
        modules_to_save=saved,
        params=attached.params,
        schedule=attached.schedule,
        routing=routing,
        methods={DEFAULT: cfg},
    )
    model.peftkit = injection
    set_trainable(model)
    with torch.no_grad():
        injection.originals = {
            k: t.detach().clone()
            for k, t in trainable_state(model).items()
            if k in injection.params or is_under(k, saved)
        }
    return injection


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes as its base did before any adapter was put on it, exactly:
    no layer update, virtual token or bottleneck applies, and tensors trained in place (heads,
    BitFit's biases, full fine-tuning's weights) hold their starting values. Outside, all is as
    it was. Gradients flow as usual (no adapter tensor receives one inside).

    Raises:
        PeftkitError: an adapter is merged into the base weights (unmerge it first).
    """
    inj = injection_of(model)
    merged = [n for n, m in model.named_modules() if getattr(m, "merged", None)]
    if merged:
        raise PeftkitError(
            f"an adapter is merged into {merged[0]}",
            "adapter",
            "unmerge the adapters before running the base without them",
        )
    routing = inj.routing
    before = routing.active, routing.rows
    routing.active, routing.rows = (), None
    swapped = []
    if not inj.disabled:  # the outermost one swaps the starting values in (and out again)
        live = dict(model.named_parameters()) | dict(model.named_buffers())
        swapped = [(live[k], t) for k, t in inj.originals.items() if k in live]
    for tensor, original in swapped:
        tensor.data, original.data = original.data, tensor.data
    inj.disabled += 1
    try:
        yield
    finally:
        inj.disabled -= 1
        for tensor, original in swapped:
            tensor.data, original.data = original.data, tensor.data
        routing.active, routing.rows = before


@contextmanager
def active_adapters(model: nn.Module, *names: str) -> Iterator[None]:
    """Inside, every row of ``model``'s passes uses the adapters ``names`` (a frozen named
    adapter beside the trained one, or the trained "default"); restored after."""
    routing = injection_of(model).routing
    before = routing.active
    routing.active = tuple(names)
    try:
        yield
    finally:
        routing.active = before


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
    """Raise the one-line error when an active adapter's method cannot merge into the base."""
    inj = injection_of(model)
    for name in inj.routing.active:
        if name in inj.methods:
            _refuse_unmergeable(inj.methods[name])


def _mergeable(model: nn.Module) -> list[tuple[str, Any]]:
    """The adapted layers that merge: each holds a ``base_layer`` and merges the active
    adapters into it (``merge()``, ``unmerge()``)."""
    check_mergeable(model)
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, AdapterModule) and hasattr(m, "merge") and hasattr(m, "base_layer")
    ]
    quantized = [n for n, m in found if is_quantized(m.base_layer)]
    if quantized:  # adding a float update to packed 4-bit or int8 weights would lose it or fail
        raise PeftkitError(
            f"cannot merge into quantized weights ({quantized[0]})",
            "merge",
            "dequantize the base first (peftkit merge does), or use the adapter unmerged",
        )
    return found


def merge(model: nn.Module) -> None:
    """Merge the active adapters' updates into the base weights (reversible with :func:`unmerge`)."""
    for _, module in _mergeable(model):
        module.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    for _, module in _mergeable(model):
        module.unmerge()


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge the active adapters, then put plain modules back everywhere; returns the layers
    merged.

    Afterwards ``model`` is an ordinary model with no peftkit modules in it, equal to the base
    with its active adapters: every wrapper gives back what stands in its place (``unload()``:
    a merged layer's base, a head bank's active copy); heads trained in place keep their weights.
    """
    merged = [name for name, _ in _mergeable(model)]
    wrappers = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "unload", None))]
    for name, module in wrappers:
        replace_module(model, name, module.unload())
    for name in [n for n, _ in model.named_children() if n.startswith("peftkit_")]:
        delattr(model, name)  # state the layers shared (VeRA's projections)
    if hasattr(model, "peftkit"):
        del model.peftkit
    return merged
