"""Several named adapters on one base: switch between them, turn them all off, or give every row
of a batch its own adapter in one forward pass.

The layers do the work (:class:`~.base.AdaptedLinear` holds every adapter's update of one
linear layer and computes mixed rows); this module loads adapters under names, checks their
tensors against the base, and routes rows. Each saved module (a classification head) becomes a
:class:`HeadBank`: the base's module plus one copy per adapter that saved it, so a head never
serves another adapter's rows. Heads group the rows per adapter; heads with fewer labels fill
the remaining logits with ``-inf``, so a row's softmax over the whole width equals the one over
its own labels.

Adapters of every method that updates linear layers compose here, on the same layers too,
because a row uses one adapter. Prompt, P-tuning and prefix adapters sit beside them
(:mod:`.named_tokens`); their rows take a forward pass of their own
(:meth:`NamedAdapters.forward_rows`). Methods that add layers (bottleneck) and in-place methods
(BitFit, full fine-tuning) change what every adapter's rows see, so they are refused on one
line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import replace_module
from .base import Attached, Attachment, Injection, adapter_state_dict, merge_and_unload, resolve_modules_to_save
from .configs import LoraConfig, MethodConfig
from .layer import AdaptedLinear, Routing
from .named_tokens import TOKEN_METHODS, TokenAdapters
from .registry import method_of

#: what a name may look like: it becomes a module key, a file folder and a served model id
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def check_name(name: str) -> str:
    """``name`` if it can name an adapter (letters, digits, ``_`` and ``-``; 64 at most)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PeftkitError(
            f"adapter name {name!r} is not allowed",
            "adapter",
            "use letters, digits, '_' and '-' (at most 64), starting with a letter or digit",
        )
    return name


class HeadBank(nn.Module):
    """A saved module (a task head) with one copy per adapter; the base's own serves the rest."""

    def __init__(self, base_module: nn.Module, routing: Routing):
        super().__init__()
        self.base_module = base_module
        self.copies = nn.ModuleDict()
        self.routing = routing

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self.routing.rows
        if rows is None:
            active = next((n for n in self.routing.active if n in self.copies), None)
            return self._module(active)(x, *args, **kwargs)
        present = rows.unique().tolist()
        if len(present) == 1:
            return self._module(self.routing.slots[present[0]])(x, *args, **kwargs)
        parts = []
        for slot in present:
            idx = (rows == slot).nonzero().squeeze(1)
            parts.append((idx, self._module(self.routing.slots[slot])(x[idx], *args, **kwargs)))
        return gather_rows(parts, x.shape[0])

    def unload(self) -> nn.Module:
        """The active adapter's copy (or the base's module), to stand in this bank's place."""
        return self._module(next((n for n in self.routing.active if n in self.copies), None))

    def _module(self, name: str | None) -> nn.Module:
        return self.copies[name] if name is not None and name in self.copies else self.base_module


def gather_rows(parts: list[tuple[Any, torch.Tensor]], n: int) -> torch.Tensor:
    """One ``(n, ..., width)`` output from each group's rows ``(indices, outputs)``; a narrower
    group's missing logits are ``-inf``, so its softmax over the full width is its own."""
    width = max(p.shape[-1] for _, p in parts)
    first = parts[0][1]
    out = first.new_full((n, *first.shape[1:-1], width), float("-inf"))
    for idx, p in parts:
        out[idx, ..., : p.shape[-1]] = p
    return out


@dataclass
class NamedAdapter:
    """What one loaded adapter put on the model."""

    name: str
    method: MethodConfig
    layers: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    in_place: list[str] = field(default_factory=list)  #: base parameters it was loaded into (BitFit, full)


class NamedAdapters:
    """Named adapters on one model (changed in place): one active, or one per row. Any method
    that updates linear layers (LoRA and its variants, VeRA, LoHa, LoKr, AdaLoRA, IA3) and the
    prompt, P-tuning and prefix methods compose; on a model with a trained adapter
    (:func:`~.base.apply_method`) they are frozen adapters beside it.

    Example::

        adapters = NamedAdapters(model)
        adapters.add("sst2", cfg_a, state_a); adapters.add("imdb", cfg_b, state_b)
        adapters.set_active("imdb")             # every row: imdb
        with adapters.per_row(["sst2", None, "imdb"]):
            logits = model(**batch).logits      # row 0 sst2, row 1 the base alone, row 2 imdb
    """

    def __init__(self, model: nn.Module):
        injection = getattr(model, "peftkit", None)
        if injection is None:
            injection = Injection(method=None, routing=Routing(()))
            model.peftkit = injection
        self.model = model
        self.injection: Injection = injection
        self.routing: Routing = injection.routing
        self.tokens = TokenAdapters(model, self.routing)
        self.adapters: dict[str, NamedAdapter] = {}
        #: the adapter that is the only one on this base (one that changes what every row sees)
        self.solo: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active(self) -> str | None:
        return self.routing.active[0] if self.routing.active else None

    def add(
        self, name: str, method: MethodConfig, state: dict[str, torch.Tensor], where: str = "adapter"
    ) -> NamedAdapter:
        """Put the adapter ``method`` + ``state`` (tensors keyed by module path, as in its file)
        on the model, frozen.

        Raises:
            PeftkitError: a name already used or not allowed, a method that does not compose, or
                tensors that do not fit this base; nothing is changed then.
        """
        check_name(name)
        if name in self.adapters or name in self.routing.slots:
            raise PeftkitError(
                f"an adapter named {name!r} is already loaded", where, "give each adapter its own name (NAME=DIR)"
            )
        if self.solo is not None:
            alone = self.adapters[self.solo].method
            raise PeftkitError(
                f"the {alone.name} adapter {self.solo!r} changes what every row sees, so no other adapter can "
                "share its base",
                where,
                f"load {self.solo!r} alone (--adapter DIR)",
            )
        if not shares_a_base(method) and (self.adapters or self.injection.method is not None):
            variant = method.variant() if isinstance(method, LoraConfig) else None
            raise PeftkitError(
                f"{f'LoRA adapters with {variant}' if variant else f'{method.name} adapters'} cannot share a base "
                "with other adapters",
                where,
                "named adapters take the methods that update linear layers (PiSSA/OLoRA saved as plain LoRA), "
                "and prompt, P-tuning and prefix adapters; load this one alone (--adapter DIR)",
            )
        heads = resolve_modules_to_save(self._plain_view(), list(method.modules_to_save or []))
        head_states = {h: {k[len(h) + 1 :]: t for k, t in state.items() if k.startswith(h + ".")} for h in heads}
        head_copies = {h: self._head_copy(h, s, where) for h, s in head_states.items() if s}
        rest = {k: t for k, t in state.items() if not is_under_any(k, heads)}
        attached = Attached()
        if isinstance(method, TOKEN_METHODS):
            self.tokens.add(name, method, self.tokens.check(method, rest, where))
        else:
            attached = self._attach(name, method, rest, heads, where)
        for path, module in head_copies.items():
            self._wrapped(path).copies[name] = module
        entry = NamedAdapter(name, method, attached.replaced, sorted(head_copies), attached.params)
        self.adapters[name] = entry
        self.injection.methods[name] = method
        self.routing.slots.append(name)
        if not shares_a_base(method):
            self.solo = name
        return entry

    def _attach(
        self, name: str, method: MethodConfig, state: dict[str, torch.Tensor], heads: list[str], where: str
    ) -> list[str]:
        """Give the layers adapter ``name``'s updates (the method's own attach) and copy its
        tensors in; on any error the layers are as they were."""
        fix = "load it onto the base model it was trained with (--model)"
        try:
            attached = method_of(method).attach(self.model, method, Attachment(name, self.routing, heads))
            expected = adapter_state_dict(self.model, name)
            params = dict(self.model.named_parameters())
            in_place = {path: params[path] for path in attached.params}  # BitFit's biases, full's every weight
            expected.update(in_place)
            for key, target in expected.items():
                got = state.get(key)
                if got is None:
                    raise PeftkitError(f"the adapter has no tensor for {key}", where, fix)
                if tuple(got.shape) != tuple(target.shape):
                    raise PeftkitError(
                        f"the adapter's tensors do not fit this model: {key} has shape "
                        f"{tuple(got.shape)}, the model expects {tuple(target.shape)}",
                        where,
                        fix,
                    )
            extra = sorted(set(state) - set(expected))
            if extra:
                raise PeftkitError(f"the adapter has a tensor this model has no place for ({extra[0]})", where, fix)
            with torch.no_grad():  # the base's own values first, for adapters_disabled and delete
                self.injection.originals.update({k: t.detach().clone() for k, t in in_place.items()})
                for key, target in expected.items():
                    target.copy_(state[key].to(target.dtype))
            for update in self._updates(name):
                update.requires_grad_(False)
            for tensor in expected.values():
                tensor.requires_grad_(False)
        except PeftkitError:
            self._detach(name)
            raise
        except (AttributeError, ValueError) as e:  # targets this base does not have
            self._detach(name)
            raise PeftkitError(f"the adapter does not fit this model ({e})", where, fix) from None
        return attached

    def _updates(self, name: str) -> list[nn.Module]:
        return [
            u for m in self.model.modules() if isinstance(m, AdaptedLinear) and (u := m.update_of(name)) is not None
        ]

    def _detach(self, name: str) -> None:
        """Take adapter ``name``'s layer updates and shared modules off the model."""
        for path, module in list(self.model.named_modules()):
            slots = getattr(module, "updates", None)  # an adapted layer: AdaptedLinear, TunedNorm
            if isinstance(slots, nn.ModuleDict) and name in slots:
                module.remove(name)
                if not slots:
                    replace_module(self.model, path, module.base_layer)
            elif getattr(module, "adapter", None) == name and hasattr(module, "base_layer"):  # a bottleneck
                replace_module(self.model, path, module.base_layer)
        for child in [n for n, m in self.model.named_children() if getattr(m, "adapter", None) == name]:
            delattr(self.model, child)

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter of every row (None: the base alone).

        Raises:
            PeftkitError: None while an adapter trained in place (BitFit, full) holds the base's
                own weights; :func:`~.base.adapters_disabled` runs the base then.
        """
        if name is not None:
            self._known(name)
        elif self.solo is not None and self.adapters[self.solo].in_place:
            raise PeftkitError(
                f"the {self.adapters[self.solo].method.name} adapter {self.solo!r} is loaded into the base's own "
                "weights",
                "adapter",
                "run the base with peftkit.adapters_disabled(model), which puts the starting values back",
            )
        self.routing.active = () if name is None else (name,)

    def disable(self) -> None:
        """The base alone, until :meth:`set_active` names an adapter again."""
        self.set_active(None)

    def delete(self, name: str) -> None:
        """Take the adapter ``name`` off the model (its layers and heads)."""
        entry = self._known(name)
        self._detach(name)
        live = dict(self.model.named_parameters())
        with torch.no_grad():
            for path in entry.in_place:  # the base's own values back
                live[path].copy_(self.injection.originals.pop(path))
        for path in entry.heads:
            del self.model.get_submodule(path).copies[name]
        self.tokens.remove(name)
        del self.adapters[name]
        self.injection.methods.pop(name, None)
        self.routing.slots.remove(name)
        if self.solo == name:
            self.solo = None
        if name in self.routing.active:
            self.routing.active = tuple(n for n in self.routing.active if n != name)

    @contextmanager
    def per_row(self, names: Sequence[str | None]) -> Iterator[None]:
        """Inside, row ``i`` of every forward pass uses adapter ``names[i]`` (None: the base).

        Raises:
            PeftkitError: an unknown name, or rows of a prompt or prefix adapter among other
                adapters' rows (:meth:`forward_rows` runs those apart).
        """
        for n in set(names) - {None}:
            self._known(n)
        if len(set(names)) == 1:  # every row the same adapter: no routing per row
            with self.using(names[0]):
                yield
            return
        if self.solo is not None:
            raise PeftkitError(
                f"the {self.adapters[self.solo].method.name} adapter {self.solo!r} changes what every row sees; its "
                "rows cannot share a pass with the base's",
                "adapter",
                "give every row the same adapter",
            )
        apart = [n for n in dict.fromkeys(names) if n in self.tokens]
        if apart and len(set(names)) > 1:
            raise PeftkitError(
                f"rows of the {self.adapters[apart[0]].method.name} adapter {apart[0]!r} cannot "
                "share a forward pass with other adapters' rows",
                "adapter",
                "call NamedAdapters.forward_rows, which gives them a pass of their own",
            )
        slot = {n: i for i, n in enumerate(self.routing.slots)}
        device = next(self.model.parameters()).device
        self.routing.rows = torch.tensor([slot[n] for n in names], dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.routing.rows = None

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Inside, every row uses ``name``; the active adapter is restored after."""
        before = self.routing.active
        self.set_active(name)
        try:
            yield
        finally:
            self.routing.active = before

    def forward_rows(self, names: Sequence[str | None], **batch: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``batch`` (batch-first tensors), row ``i`` under adapter
        ``names[i]``: one pass for the rows of LoRA/IA3 adapters and the base, one more per
        prompt or prefix adapter among the rows. Token-level logits are the real tokens' (a
        prompt adapter's virtual positions are dropped)."""
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.tokens else None, []).append(i)
        parts = []
        for idx in groups.values():
            index = torch.tensor(idx, device=next(iter(batch.values())).device)
            rows = batch if len(groups) == 1 else {k: v[index] for k, v in batch.items()}
            with self.per_row([names[i] for i in idx]):
                logits = self.model(**rows).logits
            prompt = self.tokens.prompts.get(names[idx[0]])
            if prompt is not None and logits.ndim == 3:
                logits = logits[:, prompt.shape[0] :]
            if len(groups) == 1:
                return logits
            parts.append((index, logits))
        return gather_rows(parts, len(names))

    def merge_and_unload(self, name: str) -> list[str]:
        """Fold adapter ``name`` into the base weights and put plain modules back everywhere (its
        head copies where heads were): :func:`~.base.merge_and_unload` with ``name`` active.
        Afterwards the model is an ordinary model, equal to the base with this adapter.

        Raises:
            PeftkitError: a method that does not merge, or quantized base weights.
        """
        self.set_active(name)
        merged = merge_and_unload(self.model)
        self.tokens.remove(name)
        self.adapters.clear()
        return merged

    def adds_tokens(self, name: str | None) -> bool:
        """Whether ``name`` is a prompt or prefix adapter (its rows take passes of their own)."""
        return name in self.tokens

    # ---- the pieces ----
    def _known(self, name: str) -> NamedAdapter:
        if name not in self.adapters:
            raise PeftkitError(
                f"no adapter named {name!r} is loaded", "adapter", f"loaded: {', '.join(self.adapters) or 'none'}"
            )
        return self.adapters[name]

    def _plain_view(self) -> nn.Module:
        """The model as its plain module names see it (banks stand where their layers were)."""
        return _PlainNames(self.model)

    def _base_of(self, path: str) -> nn.Module | None:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, AdaptedLinear):
            return module.base_layer
        if isinstance(module, HeadBank):
            return module.base_module
        return module

    def _head_copy(self, path: str, state: dict[str, torch.Tensor], where: str) -> nn.Module:
        """A copy of the base's module at ``path`` holding the adapter's saved tensors (a head's
        output size may differ: linear layers take the saved shape)."""
        head = copy.deepcopy(self._base_of(path))
        expected = head.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise PeftkitError(
                f"the adapter's saved module {path} does not match this model's "
                f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})",
                where,
                "load it onto the base model it was trained with (--model)",
            )
        for key, t in state.items():
            owner, _, leaf = key.rpartition(".")
            module = head.get_submodule(owner) if owner else head
            old = getattr(module, leaf)
            if tuple(old.shape) == tuple(t.shape):
                with torch.no_grad():
                    old.copy_(t.to(old.dtype))
                continue
            fits = (leaf == "weight" and t.ndim == 2 and t.shape[1] == old.shape[1]) or (leaf == "bias" and t.ndim == 1)
            if not isinstance(module, nn.Linear) or not fits:
                raise PeftkitError(
                    f"adapter tensor {path}.{key} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}",
                    where,
                    "load it onto the base it was trained with",
                )
            setattr(module, leaf, nn.Parameter(t.to(old.device, old.dtype).clone(), requires_grad=False))
            module.out_features = t.shape[0]
        for p in head.parameters():
            p.requires_grad_(False)
        return head

    def _wrapped(self, path: str) -> HeadBank:
        """The head bank at ``path``, wrapping the module there on first use."""
        module = self.model.get_submodule(path)
        if not isinstance(module, HeadBank):
            module = HeadBank(module, self.routing)
            replace_module(self.model, path, module)
        return module


def shares_a_base(method: MethodConfig) -> bool:
    """Whether adapters of ``method`` can share a base with others: they leave the base as it is
    (the layer-updating methods, PiSSA/OLoRA excepted, whose base is a residual; and the virtual
    token ones). The others (bottleneck layers, BitFit, full fine-tuning) load alone."""
    if isinstance(method, TOKEN_METHODS):
        return True
    residual = isinstance(method, LoraConfig) and method.residual_init
    return method_of(method).named and not residual


def is_under_any(key: str, paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in paths)


class _PlainNames:
    """``named_modules`` of a model with named adapters, under the plain models' names."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        hidden: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(h) for h in hidden):
                continue
            if isinstance(module, AdaptedLinear):
                hidden.append(name + ".")
                yield name, module.base_layer
            elif isinstance(module, HeadBank):
                hidden.append(name + ".")
                yield name, module.base_module
            else:
                yield name, module
