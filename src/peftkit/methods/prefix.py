"""Prefix tuning: learned key/value prefixes in every self-attention layer.

Injected at the attention level, so encoders work as well as decoders on transformers 5.x
(no key/value cache is involved). peftkit registers one attention implementation,
``peftkit_prefix``: transformers' SDPA attention with this layer's prefix keys and values
concatenated in front of the real ones and the attention mask widened by as many
always-visible columns (padding on either side keeps its meaning; causal layers keep
their causality among the real tokens). Prefix keys carry no position, so rotary models
need no special care; on decoders the real tokens are numbered from
``num_virtual_tokens`` on, as ``peft`` does (it matters only for absolute positions, GPT-2).

With ``prefix_projection`` the prefixes are produced during training by a two-layer MLP
from a smaller embedding (Li & Liang's reparameterisation); files hold the projected
prefixes, like ``peft``'s ``PREFIX_TUNING`` (``prompt_embeddings`` of shape
``(num_virtual_tokens, layers * 2 * kv_heads * head_dim)``), so the MLP is not needed to
use the adapter.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from .base import Attached, Attachment
from .configs import PROMPT_KEY, PrefixTuningConfig
from .layer import DEFAULT, Routing
from .prompt import as_kwargs, cache_length

IMPLEMENTATION = "peftkit_prefix"
#: each prefixed attention layer -> a weak reference to its model's encoder (the attention function
#: gets only the layer); weak both ways, so a model with prefixes is freed like any other
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules that call transformers' attention interface, in order.

    Raises:
        PeftkitError: the model has none (its attention is computed in a way peftkit cannot reach).
    """

    def calls_interface(module: nn.Module) -> bool:
        code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
        return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names

    found = [m for m in model.modules() if calls_interface(m) and not getattr(m, "is_cross_attention", False)]
    if not found:
        raise PeftkitError(
            f"{type(model).__name__} has no attention layers peftkit can reach",
            "method.name",
            "prefix tuning needs attention through transformers' attention "
            "interface (BERT, RoBERTa, DistilBERT, LLaMA, Qwen2, GPT-2...); try lora or prompt",
        )
    if not getattr(model, "_supports_sdpa", False):
        raise PeftkitError(
            f"{type(model).__name__} does not support SDPA attention",
            "method.name",
            "prefix tuning builds on SDPA attention; try lora or prompt",
        )
    return found


def kv_shape(model: nn.Module) -> tuple[int, int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """The prefixes of every layer, stored flat as ``(P, layers * 2 * kv_heads * head_dim)``.

    Row ``p`` holds, for layer ``l``, its key at block ``2l`` and its value at ``2l + 1``,
    each ``kv_heads * head_dim`` wide: ``peft``'s layout.
    """

    top_level = True

    def __init__(
        self,
        cfg: PrefixTuningConfig,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        model: nn.Module,
        routing: Routing,
        adapter: str = DEFAULT,
    ):
        super().__init__()
        self.routing, self.adapter = routing, adapter
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.num_virtual_tokens = cfg.num_virtual_tokens
        ref = model.get_input_embeddings().weight
        width = num_layers * 2 * kv_heads * head_dim
        token_dim = kv_heads * head_dim
        self.encoder_hidden_size = cfg.encoder_hidden_size or token_dim
        opts = {"device": ref.device, "dtype": ref.dtype}
        if cfg.prefix_projection:
            self.embedding = nn.Parameter(torch.randn(cfg.num_virtual_tokens, token_dim, **opts))
            self.transform = nn.Sequential(
                nn.Linear(token_dim, self.encoder_hidden_size, **opts),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden_size, width, **opts),
            )
        else:
            self.embedding = nn.Parameter(torch.randn(cfg.num_virtual_tokens, width, **opts) * 0.02)
            self.transform = None
        self.layers: list[nn.Module] = []
        self.current: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # this forward's (key, value) per layer
        self.seen: dict[nn.Module, list[torch.Tensor]] | None = None  # recording a frozen forward's keys/values

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        if name != self.adapter:
            return {}
        params: dict[str, torch.Tensor] = {"embedding": self.embedding}
        if self.transform is not None:
            params.update({f"transform.{k}": v for k, v in self.transform.named_parameters()})
        return params

    def flat(self) -> torch.Tensor:
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.flat()} if name == self.adapter else {}

    def peft_fields(self) -> dict[str, Any]:
        return {
            "token_dim": self.kv_heads * self.head_dim,
            "num_attention_heads": self.kv_heads,
            "num_layers": self.num_layers,
            "encoder_hidden_size": self.encoder_hidden_size,
        }

    def key_values(self) -> torch.Tensor:
        """``(layers, 2, kv_heads, P, head_dim)``."""
        flat = self.flat().view(self.num_virtual_tokens, self.num_layers, 2, self.kv_heads, self.head_dim)
        return flat.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def init_from_activations(self, model: nn.Module) -> None:
        """Start from the keys and values the frozen model computes for random vocabulary tokens."""
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, self.num_virtual_tokens), device=self.embedding.device)
        self.seen = {}
        was_training = model.training
        model.eval()
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            kv = torch.stack([torch.stack(self.seen[layer]) for layer in self.layers])  # (L, 2, kv, P, d)
        finally:
            self.seen = None
            model.train(was_training)
        self.embedding.copy_(kv.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1))


def _set_prefixes(
    enc: PrefixEncoder, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """The model's forward pre-hook: this forward's prefixes for every layer, and positions after them."""
    kwargs = as_kwargs(model, args, kwargs)
    if enc.seen is not None:  # recording the frozen model's own keys and values
        enc.current = {}
        return (), kwargs
    kv = enc.key_values() if enc.routing.on(enc.adapter) else None
    return (), route_prefixes(enc, kv, enc.layers, kwargs)


def route_prefixes(
    router: Any, kv: torch.Tensor | None, layers: list[nn.Module], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Point ``router.current`` (what :func:`add_prefix` reads) at this forward's prefixes ``kv``
    ``(layers, 2, kv_heads, P, head_dim)``, or at none; on decoders the real tokens' positions
    then start after the ``P`` prefixes."""
    if kv is None:
        router.current = {}
        return kwargs
    router.current = {layer: (kv[i, 0], kv[i, 1]) for i, layer in enumerate(layers)}
    if any(getattr(layer, "is_causal", False) for layer in layers):
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        positions = kwargs.get("position_ids")
        if positions is None:
            start = cache_length(kwargs)
            positions = torch.arange(start, start + ref.shape[1], device=ref.device).unsqueeze(0)
        kwargs["position_ids"] = positions + kv.shape[3]
    return kwargs


def _widen_mask(
    mask: torch.Tensor | None, n: int, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """The attention mask for ``n`` prefix keys in front of ``kv_len`` real ones."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    if mask.dtype == torch.bool:
        front = mask.new_ones(*mask.shape[:-1], n)
    else:
        front = mask.new_zeros(*mask.shape[:-1], n)
    return torch.cat([front, mask[..., :kv_len]], dim=-1)


def add_prefix(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple:
    """``(key, value, attention_mask, kwargs)`` with the layer's prefix keys/values in front and
    the mask widened to match; unchanged for a layer without prefixes. Any attention function
    that reads these (SDPA here; the speed layer's) computes prefix attention."""
    ref = _ENCODERS.get(module)
    enc = ref() if ref is not None else None
    if enc is None:
        return key, value, attention_mask, kwargs
    if enc.seen is not None:
        enc.seen[module] = [key[0].clone(), value[0].clone()]
    prefix = enc.current.get(module)
    if prefix is None:
        return key, value, attention_mask, kwargs
    pk, pv = prefix
    batch, n, kv_len = key.shape[0], pk.shape[1], key.shape[2]
    kwargs = dict(kwargs)
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    attention_mask = _widen_mask(attention_mask, n, query.shape[2], kv_len, causal, query.device)
    key = torch.cat([pk.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    kwargs["is_causal"] = False
    return key, value, attention_mask, kwargs


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """SDPA attention with the layer's prefix keys/values in front (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value, attention_mask, kwargs = add_prefix(module, query, key, value, attention_mask, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_prefix_attention(model: nn.Module, router: Any, layers: list[nn.Module]) -> None:
    """Make ``model`` attend through :func:`prefix_attention`, each of ``layers`` reading its
    prefixes from ``router`` (an object with ``current`` and ``seen``, held elsewhere: the link is weak)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, prefix_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = IMPLEMENTATION
    for layer in layers:
        _ENCODERS[layer] = weakref.ref(router)


def attach_prefix(model: nn.Module, cfg: PrefixTuningConfig, at: Attachment) -> Attached:
    """Give every self-attention layer of ``model`` learned key/value prefixes, in place."""
    layers = attention_layers(model)
    kv_heads, head_dim = kv_shape(model)
    encoder = PrefixEncoder(cfg, len(layers), kv_heads, head_dim, model, at.routing, at.name)
    model.add_module("peftkit_prefix", encoder)  # moves and saves with the model
    encoder.layers = layers  # a plain list: the layers stay registered where they are
    use_prefix_attention(model, encoder, layers)
    model.register_forward_pre_hook(functools.partial(_set_prefixes, encoder), with_kwargs=True)
    if cfg.init == "vocab" and not cfg.prefix_projection:
        encoder.init_from_activations(model)
    return Attached()
