"""Several named adapters on one base: switch between them, turn them all off, or give every row
of a batch its own adapter in one forward pass.

Each targeted linear layer becomes an :class:`AdapterBank`: the frozen layer plus, per adapter
that targets it, its LoRA factors or IA3 vector (the adapter's own tensors; the base is shared).
Each saved module (a classification head) becomes a :class:`HeadBank`: the base's module plus
one copy per adapter that saved it, so a head never serves another adapter's rows.

Every bank of a model reads one :class:`Routing`: either one active adapter for the whole batch
(``None``: the base alone, exactly), or one adapter slot per row. For a mixed batch, a bank
gathers each row's LoRA factors from the slots stacked once per change (ranks padded with
zeros) and computes all rows' low-rank products in two batched products, the base product
once for the whole batch (the gathered-matmul idea of Punica and S-LoRA). Heads group the rows
per adapter; heads with fewer labels fill the remaining logits with ``-inf``, so a row's softmax
over the whole width equals the one over its own labels.

LoRA and IA3 adapters compose here, on the same linear layers too, because a row uses one
adapter: a row of a LoRA adapter sees IA3 vectors of ones, a row of an IA3 adapter a zero
update. Prompt and prefix adapters sit beside them (:mod:`.named_tokens`); their rows take a
forward pass of their own (:meth:`NamedAdapters.forward_rows`). Methods that add layers
(bottleneck) and in-place methods (BitFit, full fine-tuning) change what every adapter's rows
see, so they are refused on one line.
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
from ..inject import is_linear, linear_shape, name_matches, replace_module
from .base import resolve_modules_to_save
from .configs import IA3Config, LoraConfig, MethodConfig
from .named_tokens import TOKEN_METHODS, TokenAdapters

#: what a name may look like: it becomes a module key, a file folder and a served model id
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
#: the methods whose adapters share one base here
COMPOSABLE = (LoraConfig, IA3Config, *TOKEN_METHODS)


def check_name(name: str) -> str:
    """``name`` if it can name an adapter (letters, digits, ``_`` and ``-``; 64 at most)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PeftkitError(f"adapter name {name!r} is not allowed", "adapter",
                           "use letters, digits, '_' and '-' (at most 64), starting with a letter or digit")
    return name


class Routing:
    """Which adapter each row of the next forward pass uses; shared by all banks of one model.

    Attributes:
        active: the adapter for every row when ``rows`` is None (None: the base alone).
        rows: ``(batch,)`` slot indices, one per row, or None; slot 0 is the base alone.
        slots: the adapter name of each slot (index 0 is None).
    """

    def __init__(self) -> None:
        self.active: str | None = None
        self.rows: torch.Tensor | None = None
        self.slots: list[str | None] = [None]


@dataclass
class _LoRA:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


@dataclass
class _IA3:
    vector: torch.Tensor  # (in,) for feed-forward layers, else (out,)
    feedforward: bool


class AdapterBank(nn.Module):
    """A frozen linear layer with the LoRA and IA3 updates of several named adapters.

    Each adapter's tensors are non-persistent buffers of the bank (``<name>__A``, ``<name>__B``
    for LoRA, ``<name>__v`` for IA3), so ``model.to(...)`` moves them and they never count as trainable parameters. Shapes: input
    ``(batch, ..., in_features)``, output ``(batch, ..., out_features)``; in a mixed batch, row
    ``i`` uses the adapter of slot ``routing.rows[i]``.
    """

    STACKS = ("stack_A", "stack_B", "stack_in", "stack_out")

    def __init__(self, base_layer: nn.Module, routing: Routing):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.routing = routing
        self.kinds: dict[str, tuple[str, float | bool]] = {}  # name -> ("lora", scaling) | ("ia3", feedforward)
        for key in self.STACKS:
            self.register_buffer(key, None, persistent=False)

    def add(self, name: str, update: _LoRA | _IA3) -> None:
        if isinstance(update, _LoRA):
            self.register_buffer(f"{name}__A", update.A, persistent=False)
            self.register_buffer(f"{name}__B", update.B, persistent=False)
            self.kinds[name] = ("lora", update.scaling)
        else:
            self.register_buffer(f"{name}__v", update.vector, persistent=False)
            self.kinds[name] = ("ia3", update.feedforward)

    def remove(self, name: str) -> None:
        self.kinds.pop(name, None)
        for leaf in ("A", "B", "v"):
            self._buffers.pop(f"{name}__{leaf}", None)

    def update(self, name: str | None) -> _LoRA | _IA3 | None:
        """The update of adapter ``name`` on this layer, or None."""
        kind = self.kinds.get(name) if name is not None else None
        if kind is None:
            return None
        if kind[0] == "lora":
            return _LoRA(self._buffers[f"{name}__A"], self._buffers[f"{name}__B"], kind[1])
        return _IA3(self._buffers[f"{name}__v"], bool(kind[1]))

    def restack(self) -> None:
        """Stack every slot's update for mixed batches (zeros and ones where a slot has none)."""
        slots = self.routing.slots
        updates = {s: u for s, n in enumerate(slots) if (u := self.update(n)) is not None}
        loras = {s: u for s, u in updates.items() if isinstance(u, _LoRA)}
        ia3s = {s: u for s, u in updates.items() if isinstance(u, _IA3)}
        device = self.base_layer.weight.device
        dtype = next((u.A.dtype for u in loras.values()), None) or next(
            (u.vector.dtype for u in ia3s.values()), torch.float32)
        stacks: dict[str, torch.Tensor | None] = dict.fromkeys(self.STACKS)
        if loras:
            rank = max(u.A.shape[0] for u in loras.values())
            a = torch.zeros(len(slots), self.in_features, rank, device=device, dtype=dtype)
            b = torch.zeros(len(slots), rank, self.out_features, device=device, dtype=dtype)
            for s, u in loras.items():
                a[s, :, :u.A.shape[0]] = u.A.t()
                b[s, :u.B.shape[1]] = u.B.t() * u.scaling
            stacks["stack_A"], stacks["stack_B"] = a, b  # (S, in, r), (S, r, out)
        for key, ff, width in (("stack_in", True, self.in_features), ("stack_out", False, self.out_features)):
            chosen = {s: u for s, u in ia3s.items() if u.feedforward == ff}
            if chosen:
                v = torch.ones(len(slots), width, device=device, dtype=dtype)
                for s, u in chosen.items():
                    v[s] = u.vector
                stacks[key] = v
        for key, t in stacks.items():
            self.register_buffer(key, t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routing.rows
        if rows is not None:
            return self._mixed(x, rows)
        update = self.update(self.routing.active)
        if update is None:
            return self.base_layer(x)
        if isinstance(update, _IA3):
            if update.feedforward:
                return self.base_layer((x * update.vector).to(x.dtype))
            out = self.base_layer(x)
            return (out * update.vector).to(out.dtype)
        out = self.base_layer(x)
        h = x.to(update.A.dtype).reshape(-1, self.in_features) @ update.A.t()
        flat = torch.addmm(out.reshape(-1, out.shape[-1]).to(h.dtype), h, update.B.t(), alpha=update.scaling)
        return flat.view(out.shape).to(out.dtype)

    def _mixed(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if rows.shape[0] != n:
            raise RuntimeError(f"a mixed-adapter batch of {rows.shape[0]} rows met an input of {n} rows; "
                               "mixed batches need batch-first inputs")
        per_row = (n,) + (1,) * (x.ndim - 2) + (-1,)
        h = x if self.stack_in is None else (x * self.stack_in[rows].view(per_row)).to(x.dtype)
        out = self.base_layer(h)
        if self.stack_out is not None:
            out = (out * self.stack_out[rows].view(per_row)).to(out.dtype)
        if self.stack_A is None:
            return out
        flat = x.reshape(n, -1, self.in_features).to(self.stack_A.dtype)
        delta = torch.bmm(torch.bmm(flat, self.stack_A[rows]), self.stack_B[rows])
        return out + delta.view(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.kinds)}"


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
            return self._module(self.routing.active)(x, *args, **kwargs)
        present = rows.unique().tolist()
        if len(present) == 1:
            return self._module(self.routing.slots[present[0]])(x, *args, **kwargs)
        parts = []
        for slot in present:
            idx = (rows == slot).nonzero().squeeze(1)
            parts.append((idx, self._module(self.routing.slots[slot])(x[idx], *args, **kwargs)))
        return gather_rows(parts, x.shape[0])

    def _module(self, name: str | None) -> nn.Module:
        return self.copies[name] if name is not None and name in self.copies else self.base_module


def gather_rows(parts: list[tuple[Any, torch.Tensor]], n: int) -> torch.Tensor:
    """One ``(n, ..., width)`` output from each group's rows ``(indices, outputs)``; a narrower
    group's missing logits are ``-inf``, so its softmax over the full width is its own."""
    width = max(p.shape[-1] for _, p in parts)
    first = parts[0][1]
    out = first.new_full((n, *first.shape[1:-1], width), float("-inf"))
    for idx, p in parts:
        out[idx, ..., :p.shape[-1]] = p
    return out


@dataclass
class NamedAdapter:
    """What one loaded adapter put on the model."""

    name: str
    method: MethodConfig
    layers: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)


class NamedAdapters:
    """Named LoRA, IA3, prompt and prefix adapters on one model (changed in place); one active,
    or one per row.

    Example::

        adapters = NamedAdapters(model)
        adapters.add("sst2", cfg_a, state_a); adapters.add("imdb", cfg_b, state_b)
        adapters.set_active("imdb")             # every row: imdb
        with adapters.per_row(["sst2", None, "imdb"]):
            logits = model(**batch).logits      # row 0 sst2, row 1 the base alone, row 2 imdb
    """

    def __init__(self, model: nn.Module):
        if getattr(model, "peftkit", None) is not None:
            raise PeftkitError("this model already has a peftkit method applied", "adapter",
                               "load named adapters onto a fresh base model")
        self.model = model
        self.routing = Routing()
        self.tokens = TokenAdapters(model, self.routing)
        self.adapters: dict[str, NamedAdapter] = {}

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active(self) -> str | None:
        return self.routing.active

    def add(self, name: str, method: MethodConfig, state: dict[str, torch.Tensor],
            where: str = "adapter") -> NamedAdapter:
        """Put the adapter ``method`` + ``state`` (tensors keyed by module path) on the model.

        Raises:
            PeftkitError: a name already used or not allowed, a method that does not compose, or
                tensors that do not fit this base; nothing is changed then.
        """
        check_name(name)
        if name in self.adapters:
            raise PeftkitError(f"an adapter named {name!r} is already loaded", where,
                               "give each adapter its own name (NAME=DIR)")
        if not isinstance(method, COMPOSABLE):
            raise PeftkitError(f"{method.name} adapters cannot share a base with other adapters", where,
                               "named adapters take LoRA, IA3, prompt and prefix adapters; load this one alone "
                               "(--adapter DIR)")
        variant = method.variant() if isinstance(method, LoraConfig) else None
        if variant not in (None, "rank_pattern", "alpha_pattern"):
            raise PeftkitError(f"LoRA adapters with {variant} cannot share a base with other adapters yet", where,
                               "load this one alone (--adapter DIR)")
        heads = resolve_modules_to_save(self._plain_view(), list(method.modules_to_save or []))
        if isinstance(method, TOKEN_METHODS):
            tokens, updates = self.tokens.check(method, state, where), {}
        else:
            tokens, updates = None, self._updates(method, state, heads, where)
        head_states = {h: {k[len(h) + 1:]: t for k, t in state.items() if k.startswith(h + ".")} for h in heads}
        head_copies = {h: self._head_copy(h, s, where) for h, s in head_states.items() if s}
        if tokens is not None:
            self.tokens.add(name, method, tokens)
        for path, update in updates.items():
            self._wrapped(path, AdapterBank).add(name, update)
        for path, module in head_copies.items():
            self._wrapped(path, HeadBank).copies[name] = module
        entry = NamedAdapter(name, method, sorted(updates), sorted(head_copies))
        self.adapters[name] = entry
        self.routing.slots.append(name)
        self._restack()
        return entry

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter of every row (None: the base alone)."""
        if name is not None:
            self._known(name)
        self.routing.active = name

    def disable(self) -> None:
        """The base alone, until :meth:`set_active` names an adapter again."""
        self.routing.active = None

    def delete(self, name: str) -> None:
        """Take the adapter ``name`` off the model (its layers and heads)."""
        entry = self._known(name)
        for path in entry.layers:
            self.model.get_submodule(path).remove(name)
        for path in entry.heads:
            del self.model.get_submodule(path).copies[name]
        self.tokens.remove(name)
        del self.adapters[name]
        self.routing.slots.remove(name)
        if self.routing.active == name:
            self.routing.active = None
        self._restack()

    @contextmanager
    def per_row(self, names: Sequence[str | None]) -> Iterator[None]:
        """Inside, row ``i`` of every forward pass uses adapter ``names[i]`` (None: the base).

        Raises:
            PeftkitError: an unknown name, or rows of a prompt or prefix adapter among other
                adapters' rows (:meth:`forward_rows` runs those apart).
        """
        for n in set(names) - {None}:
            self._known(n)
        apart = [n for n in dict.fromkeys(names) if n in self.tokens]
        if apart and len(set(names)) > 1:
            raise PeftkitError(f"rows of the {self.adapters[apart[0]].method.name} adapter {apart[0]!r} cannot "
                               "share a forward pass with other adapters' rows", "adapter",
                               "call NamedAdapters.forward_rows, which gives them a pass of their own")
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
                logits = logits[:, prompt.shape[0]:]
            if len(groups) == 1:
                return logits
            parts.append((index, logits))
        return gather_rows(parts, len(names))

    def adds_tokens(self, name: str | None) -> bool:
        """Whether ``name`` is a prompt or prefix adapter (its rows take passes of their own)."""
        return name in self.tokens

    # ---- the pieces ----
    def _known(self, name: str) -> NamedAdapter:
        if name not in self.adapters:
            raise PeftkitError(f"no adapter named {name!r} is loaded", "adapter",
                               f"loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def _plain_view(self) -> nn.Module:
        """The model as its plain module names see it (banks stand where their layers were)."""
        return _PlainNames(self.model)

    def _base_of(self, path: str) -> nn.Module | None:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, AdapterBank):
            return module.base_layer
        if isinstance(module, HeadBank):
            return module.base_module
        return module

    def _updates(self, method: MethodConfig, state: dict[str, torch.Tensor], heads: list[str],
                 where: str) -> dict[str, _LoRA | _IA3]:
        """The adapter's update per layer path, every tensor checked against the base."""
        fix = "load it onto the base model it was trained with (--model)"
        leaves = ("lora_A.weight", "lora_B.weight") if isinstance(method, LoraConfig) else ("ia3_l",)
        paths: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            if any(key.startswith(h + ".") for h in heads):
                continue
            leaf = next((lf for lf in leaves if key.endswith("." + lf)), None)
            if leaf is None:
                raise PeftkitError(f"the adapter has a tensor this model has no place for ({key})", where, fix)
            paths.setdefault(key[:-len(leaf) - 1], {})[leaf] = t
        if not paths:
            raise PeftkitError("the adapter holds no update tensors", where, "save the adapter again")
        updates: dict[str, _LoRA | _IA3] = {}
        for path, tensors in paths.items():
            base = self._base_of(path)
            if base is None or not is_linear(base):
                raise PeftkitError(f"the adapter targets {path}, which is not a linear layer of this model",
                                   where, fix)
            in_f, out_f, _ = linear_shape(base)
            dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
            device = base.weight.device
            if isinstance(method, LoraConfig):
                a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
                if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f \
                        or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                    raise PeftkitError(f"the adapter's LoRA tensors for {path} do not fit a {in_f} -> {out_f} "
                                       "layer", where, fix)
                updates[path] = _LoRA(a.to(device, dtype), b.to(device, dtype), method.scaling_for(path))
            else:
                ff = name_matches(path, method.feedforward_modules)
                want = (1, in_f) if ff else (out_f, 1)
                v = tensors["ia3_l"]
                if tuple(v.shape) != want:
                    raise PeftkitError(f"adapter tensor {path}.ia3_l has shape {tuple(v.shape)}, the model "
                                       f"expects {want}", where, fix)
                updates[path] = _IA3(v.flatten().to(device, dtype), ff)
        return updates

    def _head_copy(self, path: str, state: dict[str, torch.Tensor], where: str) -> nn.Module:
        """A copy of the base's module at ``path`` holding the adapter's saved tensors (a head's
        output size may differ: linear layers take the saved shape)."""
        head = copy.deepcopy(self._base_of(path))
        expected = head.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise PeftkitError(f"the adapter's saved module {path} does not match this model's "
                               f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})", where,
                               "load it onto the base model it was trained with (--model)")
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
                raise PeftkitError(f"adapter tensor {path}.{key} has shape {tuple(t.shape)}, the model expects "
                                   f"{tuple(old.shape)}", where, "load it onto the base it was trained with")
            setattr(module, leaf, nn.Parameter(t.to(old.device, old.dtype).clone(), requires_grad=False))
            module.out_features = t.shape[0]
        for p in head.parameters():
            p.requires_grad_(False)
        return head

    def _wrapped(self, path: str, kind: type) -> Any:
        """The ``kind`` bank at ``path``, wrapping the module there on first use."""
        module = self.model.get_submodule(path)
        if not isinstance(module, kind):
            module = kind(module, self.routing)
            replace_module(self.model, path, module)
        return module

    def _restack(self) -> None:
        for module in self.model.modules():
            if isinstance(module, AdapterBank):
                module.restack()


class _PlainNames:
    """``named_modules`` of a model with named adapters, under the plain models' names."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        hidden: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(h) for h in hidden):
                continue
            if isinstance(module, AdapterBank):
                hidden.append(name + ".")
                yield name, module.base_layer
            elif isinstance(module, HeadBank):
                hidden.append(name + ".")
                yield name, module.base_module
            else:
                yield name, module
