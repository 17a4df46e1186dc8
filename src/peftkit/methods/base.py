"""What every method shares: the adapted layer, the adapter protocol, attaching, freezing,
reports, adapters off, and merging.

A method that updates linear layers writes one :class:`Update` subclass (one adapter's tensors
on one layer, and its maths, in ``forward``) and attaches with :func:`wrap_targets`; the
:class:`AdaptedLinear` it wraps a layer in holds any number of named adapters' updates, of any
such methods, and routes them (:class:`Routing`): the active ones for every row, one per row of
a mixed batch, or none (the base exactly). Other methods add modules that implement
:class:`AdapterModule`, or train some of the base's own parameters in place (BitFit's biases,
full fine-tuning's everything). The protocol, the in-place parameter names and the modules
saved whole (``modules_to_save``, usually the task head) are the one source of truth for what
is trainable and what an adapter file holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_linear, is_under, linear_shape, replace_module, select_targets
from ..quantize import is_quantized
from .configs import DEFAULT_ADAPTER, MethodConfig
from .registry import check_mergeable as _refuse_unmergeable
from .registry import method_of

#: the name of the adapter a method puts on a model to train (peft's name for it too)
DEFAULT = DEFAULT_ADAPTER


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


class Routing:
    """Which adapters the next forward pass of one model uses; every adapted module of the model
    reads the same one.

    Attributes:
        active: the adapters applied to every row when ``rows`` is None (empty: the base alone).
        rows: ``(batch,)`` slot indices, one per row, or None; slot 0 is the base alone.
        slots: the adapter name of each slot (index 0 is None).
    """

    def __init__(self, active: tuple[str, ...] = ()) -> None:
        self.active: tuple[str, ...] = active
        self.rows: torch.Tensor | None = None
        self.slots: list[str | None] = [None, *active]

    def on(self, name: str) -> bool:
        """Whether adapter ``name`` applies to every row of the next pass."""
        return self.rows is None and name in self.active

    def row_names(self) -> set[str | None]:
        """The adapters the rows of a mixed pass name (None: the base)."""
        assert self.rows is not None
        return {self.slots[s] for s in self.rows.unique().tolist()}


class Update(nn.Module):
    """One adapter's tensors on one linear layer, and its maths: subclassed once per method.

    ``forward(x, out, base)`` takes the layer's input ``x`` and the frozen layer's output ``out``
    (computed on ``x`` scaled by :meth:`input_scale`) and returns the adapted output; this is the
    only place a method's per-layer computation is written. ``tensors()`` are the tensors an
    adapter file holds for this layer, under peft's names relative to the layer.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        weight = base.weight
        #: the dtype the update computes in (float32 over integer-quantized weights)
        self.dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.device = weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    def input_scale(self) -> torch.Tensor | None:
        """``(in,)`` factors the base layer's input is multiplied by (IA3 on feed-forward layers)."""
        return None

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, base: nn.Module) -> None:
        raise NotImplementedError

    def unmerge(self, base: nn.Module) -> None:
        raise NotImplementedError


class AdditiveUpdate(Update):
    """An update that is a weight difference ``dW``: merging adds ``delta_weight()`` (``out x
    in``) to the base weight, in the base's own layout, and unmerging takes it out."""

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _in_layout(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.add_(self._in_layout().to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.weight.sub_(self._in_layout().to(base.weight.dtype))


class AdaptedLinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, quantized ones included, or ``Conv1D``) and the
    updates of any number of named adapters, of any methods that update linear layers.

    The model's :class:`Routing` says which apply: the active ones to every row, or one per row
    of a mixed batch (each row's update computed on its own rows, the base product once for the
    whole batch), or none (the base layer exactly). Shapes: input ``(batch, ..., in_features)``,
    output ``(batch, ..., out_features)``.

    Attributes:
        base_layer: the frozen layer.
        updates: adapter name -> its :class:`Update` here.
        merged: the adapters whose updates are folded into ``base_layer``'s weights.
        product: a prepared frozen product (:mod:`peftkit.accel` sets it around training steps);
            an update that can fuse with it (``fused``) then computes as one node.
    """

    #: :func:`peftkit.inject.linear_layer_names` sees this module as the linear layer it wraps
    wraps_layer = True

    def __init__(self, base_layer: nn.Module, routing: Routing | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.updates = nn.ModuleDict()
        self.routing = routing if routing is not None else Routing((DEFAULT,))
        self.merged: list[str] = []
        self.product: Any = None

    # ---- slots ----
    def add(self, name: str, update: Update) -> None:
        """Put adapter ``name``'s update on this layer."""
        self.updates[name] = update

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise PeftkitError(f"adapter {name!r} is merged", "adapter", "unmerge it first")
        if name in self.updates:
            del self.updates[name]

    def update_of(self, name: str = DEFAULT) -> Update | None:
        return self.updates._modules.get(name)

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        update = self.update_of(name)
        return {} if update is None else update.tensors()

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        update = self.update_of(name)
        return {} if update is None else update.export_state()

    # ---- the forward pass ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routing.rows
        if rows is not None:
            return self._mixed(x, rows)
        updates = self.updates._modules
        active = [u for n in self.routing.active if (u := updates.get(n)) is not None and n not in self.merged]
        if not active:
            return self.base_layer(x)
        if len(active) == 1 and self.product is not None:
            fused = getattr(active[0], "fused", None)
            if fused is not None and active[0].can_fuse():
                return fused(x, self.product)
        return self._run(x, active)

    def _run(self, x: torch.Tensor, active: list[Update]) -> torch.Tensor:
        h = x
        for u in active:
            scale = u.input_scale()
            if scale is not None:
                h = (h * scale).to(x.dtype)
        out = self.base_layer(h)
        for u in active:
            out = u(x, out, self.base_layer)
        return out

    def _mixed(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if rows.shape[0] != n:
            raise RuntimeError(
                f"a mixed-adapter batch of {rows.shape[0]} rows met an input of {n} rows; "
                "mixed batches need batch-first inputs"
            )
        present = rows.unique().tolist()
        groups = {s: u for s in present if (u := self.update_of(self.routing.slots[s] or "")) is not None}
        if self.merged and groups:
            raise PeftkitError(
                "a layer with merged adapters cannot take a mixed batch", "adapter", "unmerge the adapters first"
            )
        if not groups:
            return self.base_layer(x)
        if len(present) == 1:
            return self._run(x, list(groups.values()))
        per_row = (n,) + (1,) * (x.ndim - 2) + (-1,)
        scales = {s: v for s, u in groups.items() if (v := u.input_scale()) is not None}
        h = x
        if scales:
            factors = torch.ones(n, self.in_features, device=x.device, dtype=next(iter(scales.values())).dtype)
            for s, v in scales.items():
                factors[rows == s] = v.flatten()
            h = (x * factors.view(per_row)).to(x.dtype)
        out = self.base_layer(h)
        stacked = type(next(iter(groups.values())))
        mixed = getattr(stacked, "mixed_rows", None)
        if mixed is not None and all(type(u) is stacked for u in groups.values()) and not torch.is_grad_enabled():
            return mixed(groups, x, out, rows, self)
        for s, u in groups.items():
            idx = (rows == s).nonzero().squeeze(1)
            out = out.index_copy(0, idx, u(x[idx], out[idx], self.base_layer))
        return out

    # ---- merging ----
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the active adapters' updates (or ``names``') into the base weights."""
        for name in names if names is not None else list(self.routing.active):
            update = self.update_of(name)
            if update is not None and name not in self.merged:
                update.merge(self.base_layer)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Take every merged update out again, the last merged first."""
        while self.merged:
            self.updates[self.merged.pop()].unmerge(self.base_layer)

    def unload(self) -> nn.Module:
        """The base layer with the active adapters merged into it, to stand in this layer's place."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={list(self.updates)}, merged={self.merged}"


def wrap_targets(
    model: nn.Module, targets: list[str], make: Callable[[str, nn.Module], Update], name: str, routing: Routing
) -> None:
    """The shared "find targets, wrap them": give each layer in ``targets`` adapter ``name``'s
    update ``make(path, base_layer)``, wrapping it in an :class:`AdaptedLinear` on first use."""
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, AdaptedLinear):
            if not is_linear(module):
                raise PeftkitError(f"{path} is not a linear layer", "method.target_modules", "target linear layers")
            module = AdaptedLinear(module, routing)
            replace_module(model, path, module)
        module.add(name, make(path, module.base_layer))


def chosen_layers(model: nn.Module, cfg: Any, modules_to_save: list[str]) -> list[str]:
    """The linear layers ``cfg`` targets (``target_modules``, ``exclude_modules`` and, where the
    config has them, ``layers_to_transform``/``layers_pattern``), never inside a saved module.

    Raises:
        PeftkitError: nothing left to adapt.
    """
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
    in_layers = getattr(cfg, "in_layers", None)
    targets = [n for n in targets if in_layers is None or in_layers(n)]
    if not targets:
        raise PeftkitError(
            f"layers_to_transform {getattr(cfg, 'layers_to_transform', None)!r} leaves no targeted layer",
            "method.layers_to_transform",
            "name block indices the model has",
        )
    return targets


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
