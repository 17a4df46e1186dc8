"""Generation's products: every linear layer multiplies with a weight prepared for decoding.

Decoding a token reads every weight of the model once and multiplies it by one row per
sequence, so its time is the time to stream the weights. Eager PyTorch streams them as they
are: float32, an adapter's update computed apart from its base, and on the CPU repacked into
oneDNN's layout at every call. :class:`DecodeProducts`, entered around a generation, prepares
each linear layer once instead: the active adapters' weight differences added to the base weight
(the methods' own ``delta_weight``, as merging does), cast to the compute dtype (bf16 halves
the bytes) and prepacked by oneDNN. Layers that read the same input (a LLaMA block's query, key
and value projections; its gate and up projections) share one product over their stacked
weights, computed once per input. Leaving restores the layers' own forwards; nothing in the
model changes. ``peftkit serve --decode`` keeps one set for the adapter its batch uses
(``keep``).

With the products that fast, transformers' own per-layer work (cache objects, masks, rotary
tables, norms in several passes) costs as much as the products. For LLaMA-architecture models
:attr:`DecodeProducts.step` is a decoding step of its own: one new token per row, the same
operations as the model's forward written out once (``bench/decode.py`` measures both against
llama.cpp). It stands aside, leaving ``step`` None, for any model it does not know exactly:
other architectures, hooks (prompt and prefix tuning), or replaced norms and blocks. Linear
layers it was not given a product for it calls as modules, so adapters that wrap them
(bottleneck, IA3, per-row routing) compute as they always do.

Layers left unprepared: quantized ones, adapted layers whose updates are not weight
differences (IA3's input scaling, DoRA's norms), and adapted layers while rows are routed to
different adapters. Valid only while the weights and the active adapters stay as they were at
entry (one generation call), and without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..inject import is_plain_linear, linear_shape
from ..methods.layer import AdaptedLinear, AdditiveUpdate, Update
from ..methods.lora import LoRAUpdate
from .frozen import FrozenProduct, can_pack

Forward = Callable[[torch.Tensor], torch.Tensor]
KV = list[tuple[torch.Tensor, torch.Tensor]]


class DecodeProducts:
    """Prepared products of ``model``'s linear layers for one generation (see the module docstring).

    Args:
        model: the adapted model (its active adapters are merged into the prepared weights).
        dtype: the dtype the products multiply in; their outputs come back in the input's dtype.
        keep: prepare at the first entry only and reuse that at the next ones, for a caller that
            knows the weights, adapters and routing stay as they were (a server's decoding steps
            for one adapter); without it every entry prepares afresh.

    Attributes:
        layers: how many layers multiply with a prepared product (while entered).
        shared: the layers that share a stacked product, each with it (while entered).
        step: ``(ids, mask, positions, kv) -> (logits, kv)``, one decoding step for rows of one
            new token each, as :class:`peftkit.generation.StepDecoder` takes it; None where the
            model is not one it computes exactly.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep: bool = False):
        self.model, self.dtype, self.keep = model, dtype, keep
        self._saved: list[tuple[nn.Module, Any]] | None = None
        self._kept: tuple[dict[nn.Module, Forward], dict[nn.Module, Shared], LlamaStep | None] | None = None
        self.layers = 0
        self.shared: dict[nn.Module, Shared] = {}
        self._recent = Recent()
        self.step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KV], tuple[torch.Tensor, KV]] | None = None

    def _weights(self) -> dict[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]:
        """Each layer that can be prepared, with how to get its ``(out, in)`` weight and its bias
        (merging is left until its product is made, so one merged weight exists at a time)."""
        out: dict[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]] = {}
        adapted = [m for m in self.model.modules() if isinstance(m, AdaptedLinear)]
        inside = {id(m.base_layer) for m in adapted} | {id(x) for m in adapted for x in m.updates.modules()}
        for module in self.model.modules():
            if isinstance(module, AdaptedLinear):
                if self._mergeable(module):
                    out[module] = lambda m=module: (self._merged(m), m.base_layer.bias)
            elif is_plain_linear(module) and id(module) not in inside and module.weight.is_floating_point():
                out[module] = lambda m=module: (m.weight.t() if linear_shape(m)[2] else m.weight, m.bias)
        return out

    @staticmethod
    def _mergeable(layer: AdaptedLinear) -> bool:
        """Whether every active update of ``layer`` is a weight difference it can add."""
        if layer.routing.rows is not None or layer.merged or not is_plain_linear(layer.base_layer):
            return False
        updates = layer.updates._modules
        return all(_additive(u) for n in layer.routing.active if (u := updates.get(n)) is not None)

    @torch.no_grad()
    def _merged(self, layer: AdaptedLinear) -> torch.Tensor:
        """The ``(out, in)`` weight of a :meth:`_mergeable` layer with its active updates added."""
        updates = layer.updates._modules
        deltas = [_delta(u) for n in layer.routing.active if (u := updates.get(n)) is not None]
        base = layer.base_layer
        weight = base.weight.t() if linear_shape(base)[2] else base.weight
        if not deltas:
            return weight
        weight = weight.float().clone()
        for d in deltas:
            weight += d.float()
        return weight

    def _product(self, weight: torch.Tensor, bias: torch.Tensor | None) -> FrozenProduct:
        pack = weight.device.type == "cpu" and can_pack(self.dtype)
        return FrozenProduct(weight, bias, self.dtype, pack, input_grad=False)

    @torch.no_grad()
    def _forwards(self) -> tuple[dict[nn.Module, Forward], dict[nn.Module, Shared]]:
        """The prepared forward of every layer that has one, and the shared product of each
        layer in a group."""
        weights = self._weights()
        forwards: dict[nn.Module, Forward] = {}
        shared: dict[nn.Module, Shared] = {}
        for group in _groups(self.model):
            if not all(m in weights for m in group):
                continue
            parts = [weights.pop(m)() for m in group]
            bias = None
            if any(b is not None for _, b in parts):
                bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
            stacked = self._product(torch.cat([w.float() for w, _ in parts]), bias)
            product = Shared(stacked, [w.shape[0] for w, _ in parts], self._recent)
            for i, module in enumerate(group):
                forwards[module], shared[module] = product.forward_of(i), product
        for module, get in weights.items():
            forwards[module] = _forward(self._product(*get()))
        return forwards, shared

    def __enter__(self) -> DecodeProducts:
        if self._saved is not None:
            raise RuntimeError("DecodeProducts is already entered")
        kept = self._kept
        forwards, self.shared = kept[:2] if kept is not None else self._forwards()
        self._saved = [(m, m.__dict__.get("forward")) for m in forwards]
        for module, forward in forwards.items():
            module.forward = forward
        self.layers = len(forwards)
        # built with the forwards in place: it calls them directly
        self.step = kept[2] if kept is not None else LlamaStep.of(self.model, self.shared)
        if self.keep:
            self._kept = forwards, self.shared, self.step
        return self

    def __exit__(self, *exc: object) -> None:
        for module, previous in reversed(self._saved or []):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved, self.step, self.shared = None, None, {}
        self._recent.slot = None


class Recent:
    """The one stacked output kept, of whichever group multiplied last: a group's layers run one
    after another, so no other needs keeping (a model's worth of them would hold every block's
    activations of a prefill)."""

    def __init__(self) -> None:
        self.slot: tuple[Shared, torch.Tensor, int, torch.Tensor] | None = None


class Shared:
    """One product over the stacked weights of layers that read the same input; each layer's
    output is its slice. The output is kept (:class:`Recent`) until another group multiplies, so
    the group multiplies once per input: an input is recognised as the same tensor object,
    unmodified where autograd counts versions (inference tensors have no count; the layers'
    callers do not modify inputs in between)."""

    def __init__(self, product: FrozenProduct, sizes: list[int], recent: Recent):
        self.product, self.recent = product, recent
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked product of ``x`` (in the product's dtype)."""
        slot, version = self.recent.slot, -1 if x.is_inference() else x._version
        if slot is None or slot[0] is not self or slot[1] is not x or slot[2] != version:
            slot = self.recent.slot = (self, x, version, self.product.forward(x.to(self.product.dtype)))
        return slot[3]

    def forward_of(self, i: int) -> Forward:
        start, end = self.bounds[i]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.output(x)[..., start:end].to(x.dtype)

        return forward


def _groups(model: nn.Module) -> list[list[nn.Module]]:
    """Layers of ``model`` that read one input: a LLaMA-style block's query, key and value
    projections, and its gate and up projections."""
    groups = []
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            members = [getattr(module, n, None) for n in names]
            if all(isinstance(m, nn.Module) for m in members):
                groups.append(members)
    return groups


class LlamaStep:
    """One decoding step of a LLaMA-architecture causal LM: every row one new token, the
    key/value cache and mask left-padded as :class:`peftkit.generation.StepDecoder` keeps them.

    The operations are the model's own (RMS norms in float32, rotary embeddings, attention over
    the cache, SiLU-gated MLP, the output layer), written out for a single position: no cache
    object, no 4-D mask, one rotary table per step, query and key rotated together, attention of
    one query as two products. Layers are called as modules except where a shared product of
    their group is at hand.
    """

    def __init__(self, model: nn.Module, shared: dict[nn.Module, Shared]):
        inner = model.model
        config = model.config
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(inner.rotary_emb.attention_scaling)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.scale = inner.layers[0].self_attn.scaling
        self.blocks = [
            _Block(block, shared.get(block.self_attn.q_proj), shared.get(block.mlp.gate_proj))
            for block in inner.layers[: config.num_hidden_layers]
        ]

    @classmethod
    def of(cls, model: nn.Module, shared: dict[nn.Module, Shared]) -> LlamaStep | None:
        """The step for ``model``, or None where it would not compute what the model does."""
        try:
            from transformers.models.llama import modeling_llama as llama
        except ImportError:  # pragma: no cover - transformers is a dependency
            return None
        if type(model) is not llama.LlamaForCausalLM or getattr(model.config, "pretraining_tp", 1) > 1:
            return None
        config, inner = model.config, model.model
        if config.hidden_act != "silu" or getattr(inner.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):
            return None
        kinds = [(model, llama.LlamaForCausalLM), (inner, llama.LlamaModel), (inner.norm, llama.LlamaRMSNorm)]
        kinds.append((inner.embed_tokens, nn.Embedding))
        for block in inner.layers:
            kinds += [(block, llama.LlamaDecoderLayer), (block.self_attn, llama.LlamaAttention)]
            kinds += [(block.mlp, llama.LlamaMLP), (block.input_layernorm, llama.LlamaRMSNorm)]
            kinds.append((block.post_attention_layernorm, llama.LlamaRMSNorm))
        if not all(type(m) is kind and _plain(m) for m, kind in kinds):
            return None
        return cls(model, shared)

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """Logits ``(rows, vocab)`` (float32) for ``ids`` ``(rows, 1)`` at ``positions``
        ``(rows, 1)``, given the cache of the earlier tokens and the ``(rows, T + 1)`` mask of real
        positions (the new token last); with the cache grown by the new token. The cache handed in
        must be the one the last call returned, or a new one: the step grows it in place."""
        rows, heads, kv_heads, dim = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        hidden = self.embed(ids)  # (rows, 1, width)
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (rows, 1, 1, dim)
        cos, sin = (angles.cos() * self.rope_scale).to(hidden.dtype), (angles.sin() * self.rope_scale).to(hidden.dtype)
        padding = None if bool(mask.all()) else ~mask.bool()[:, None, None, :]
        grown = []
        for block, (keys, values) in zip(self.blocks, kv):
            x = _rms(hidden, block.norm1)
            y = block.qkv(x).to(hidden.dtype).view(rows, 1, heads + 2 * kv_heads, dim)
            qk = _rotate(y[:, :, : heads + kv_heads], cos, sin)[:, 0]  # (rows, heads + kv_heads, dim)
            keys, values = block.cache.grow(keys, values, qk[:, heads:], y[:, 0, heads + kv_heads :])
            grown.append((keys, values))
            q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, dim) * self.scale
            scores = q @ keys.transpose(-1, -2)  # (rows, kv_heads, group, T + 1)
            if padding is not None:
                scores = scores.masked_fill(padding, float("-inf"))
            out = scores.softmax(-1, dtype=torch.float32).to(values.dtype) @ values
            hidden = hidden + block.o_proj(out.reshape(rows, 1, heads * dim))
            gate, up = block.gate_up(_rms(hidden, block.norm2)).to(hidden.dtype).chunk(2, dim=-1)
            hidden = hidden + block.down_proj(torch.nn.functional.silu(gate) * up)
        return self.head(_rms(hidden, self.norm))[:, -1].float(), grown


class _Block:
    """A decoder block's parts as the step calls them: shared products where there are some,
    else the layers' forwards (directly where no hook needs ``__call__``)."""

    def __init__(self, block: nn.Module, qkv: Shared | None, gate_up: Shared | None):
        attn, mlp = block.self_attn, block.mlp
        self.norm1, self.norm2 = block.input_layernorm, block.post_attention_layernorm
        self.o_proj, self.down_proj = _call(attn.o_proj), _call(mlp.down_proj)
        self.qkv = (
            qkv.output if qkv is not None else _concat([_call(attn.q_proj), _call(attn.k_proj), _call(attn.v_proj)])
        )
        self.gate_up = gate_up.output if gate_up is not None else _concat([_call(mlp.gate_proj), _call(mlp.up_proj)])
        self.cache = _Cache()


class _Cache:
    """A block's keys and values, grown by one position per step in place: the cache tensors
    are views of a buffer with room for more positions. Tensors that are not (after a batch
    changed) are copied into a new buffer."""

    ROOM = 64

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def grow(
        self, keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys`` and ``values`` ``(rows, kv_heads, T, dim)`` with ``key`` and ``value``
        ``(rows, kv_heads, dim)`` appended."""
        length = keys.shape[2]
        if not (self._holds(self.keys, keys) and self._holds(self.values, values)):
            shape = (*keys.shape[:2], length + self.ROOM, keys.shape[3])
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
            self.keys[:, :, :length], self.values[:, :, :length] = keys, values
        assert self.keys is not None and self.values is not None
        self.keys[:, :, length], self.values[:, :, length] = key, value
        return self.keys[:, :, : length + 1], self.values[:, :, : length + 1]

    @staticmethod
    def _holds(buffer: torch.Tensor | None, view: torch.Tensor) -> bool:
        """Whether ``view`` is the start of ``buffer`` and it has room for one more position."""
        return (
            buffer is not None
            and view.data_ptr() == buffer.data_ptr()
            and view.shape[:2] == buffer.shape[:2]
            and view.stride() == buffer.stride()
            and view.shape[2] < buffer.shape[2]
        )


def _call(module: nn.Module) -> Forward:
    """The module's forward, without ``__call__`` where it has no hooks."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs)
    return module if any(hooks) else module.forward


def _concat(layers: list[Forward]) -> Forward:
    return lambda x: torch.cat([layer(x) for layer in layers], dim=-1)


def _plain(module: nn.Module) -> bool:
    """No hooks and no forward of its own: the module computes what its class says."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs)
    return not any(hooks) and "forward" not in module.__dict__


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LLaMA's RMS norm, computed as its module does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _additive(update: Update) -> bool:
    """Whether the update is a weight difference (not IA3's input scaling, DoRA's row norms or a
    LoRA bias)."""
    if isinstance(update, LoRAUpdate):
        return update.lora_magnitude_vector is None and update.lora_B.bias is None
    return isinstance(update, AdditiveUpdate) and update.input_scale() is None


def _delta(update: Update) -> torch.Tensor:
    """An :func:`_additive` update's ``(out, in)`` weight difference."""
    if isinstance(update, LoRAUpdate):
        delta = update.delta_weight()  # in the base's layout
        return delta.T if update.fan_in_fan_out else delta
    assert isinstance(update, AdditiveUpdate)
    return update.delta_weight()


def _forward(product: FrozenProduct) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return product.forward(x.to(product.dtype)).to(x.dtype)

    return forward
