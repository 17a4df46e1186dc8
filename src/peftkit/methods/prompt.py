"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings.

A forward pre-hook on the model turns ``input_ids`` into ``inputs_embeds`` with the
``num_virtual_tokens`` learned vectors in front, and extends ``attention_mask``,
``token_type_ids`` (zeros) and token-level ``labels`` (ignored) to match. Position ids a caller
gives are recounted from the widened mask: the first real token of every row, padded or not,
sits at position ``num_virtual_tokens``, in the first generation step and every cached one.
The weights are ``peft``'s ``PROMPT_TUNING`` ones, and its files (``prompt_embeddings``, heads under
``base_model.<path>``) are read and written as ``peft`` does. On a BERT-style classifier the
first virtual token takes the place the pooler reads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..config import IGNORE_INDEX
from ..errors import PeftkitError
from .base import Attached, Attachment
from .configs import PROMPT_KEY, PromptTuningConfig
from .layer import DEFAULT, Routing


class PromptEmbedding(nn.Module):
    """The learned virtual tokens, ``(num_virtual_tokens, hidden)``; saved as ``prompt_embeddings``."""

    top_level = True

    def __init__(self, init: torch.Tensor, routing: Routing, adapter: str = DEFAULT):
        super().__init__()
        self.embedding = nn.Parameter(init)
        self.routing, self.adapter = routing, adapter

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding} if name == self.adapter else {}

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.embedding} if name == self.adapter else {}

    def peft_fields(self) -> dict[str, Any]:
        return {"token_dim": self.embedding.shape[1]}


def as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments as keywords (``input_ids`` may come positionally)."""
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
        if len(args) > 1:
            raise TypeError(f"call {type(module).__name__} with keyword arguments after input_ids")
    return kwargs


def cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the key/value cache of a generation step (0 outside generation)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def prepend_prompt(
    prompt: torch.Tensor, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """A forward call's arguments with the virtual tokens ``prompt`` ``(n, hidden)`` in front of
    every row's embeddings (the masks, token types and labels widened to match).

    Position ids the caller gave (``generate`` does) were counted without the virtual tokens; they
    are recounted from the widened mask, so a row's first real token sits at position ``n``
    whatever padding stands before it. On a later generation step the virtual tokens are already
    in the key/value cache: only the mask and positions are widened.
    """
    kwargs = as_kwargs(model, args, kwargs)
    n, cached = prompt.shape[0], cache_length(kwargs)
    if cached:
        new = kwargs["input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"].shape[1]
        _widen_mask_and_positions(kwargs, n, new, cached)
        return (), kwargs
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    batch = embeds.shape[0]
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], 1)
    _widen_mask_and_positions(kwargs, n, n + embeds.shape[1], 0)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], 1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], 1)
    return (), kwargs


def _widen_mask_and_positions(kwargs: dict[str, Any], n: int, new: int, cached: int) -> None:
    """Give the attention mask ``n`` leading ones where it does not count the virtual tokens yet
    (it should cover ``cached + new`` positions), and recount caller-given position ids from it
    for the ``new`` positions of this call."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == cached + new - n:
        mask = kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)
    if kwargs.get("position_ids") is None:
        return
    if mask is None or mask.dim() != 2 or mask.shape[1] != cached + new:
        kwargs["position_ids"] = None  # the model numbers the positions itself, virtual tokens first
        return
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs["position_ids"] = positions[:, -new:]


def _prompt_hook(
    module: PromptEmbedding, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    if not module.routing.on(module.adapter):
        return args, kwargs
    return prepend_prompt(module.embedding, model, args, kwargs)


def attach_prompt(model: nn.Module, cfg: PromptTuningConfig, at: Attachment) -> Attached:
    """Give ``model`` learned virtual tokens before its input embeddings (a forward pre-hook)."""
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise PeftkitError(
            f"{type(model).__name__} has no input embeddings",
            "method.name",
            "prompt tuning needs a transformer with a token embedding",
        )
    weight = embeddings.weight
    with torch.no_grad():
        tokenizer = at.tokenizer
        if cfg.init == "text":
            if tokenizer is None:
                raise PeftkitError(
                    "init_text needs the model's tokenizer",
                    "method.init_text",
                    "use init: random or vocab, or load the model with its tokenizer",
                )
            ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PeftkitError("init_text has no tokens", "method.init_text", "write a sentence")
            ids = (ids * cfg.num_virtual_tokens)[: cfg.num_virtual_tokens]
            init = weight[torch.tensor(ids, device=weight.device)].clone()
        elif cfg.init == "vocab":
            ids = torch.randint(0, weight.shape[0], (cfg.num_virtual_tokens,), device=weight.device)
            init = weight[ids].clone()
        else:
            init = torch.randn(cfg.num_virtual_tokens, weight.shape[1], device=weight.device) * weight.std()
    prompt = PromptEmbedding(init.to(weight.dtype), at.routing, at.name)
    model.add_module("peftkit_prompt", prompt)  # moves and saves with the model
    model.register_forward_pre_hook(functools.partial(_prompt_hook, prompt), with_kwargs=True)
    return Attached()
