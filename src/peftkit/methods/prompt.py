"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings.

A forward pre-hook on the model turns ``input_ids`` into ``inputs_embeds`` with the
``num_virtual_tokens`` learned vectors in front, and extends ``attention_mask``,
``token_type_ids`` (zeros) and token-level ``labels`` (-100) to match; ``position_ids`` are
dropped so the model numbers the longer sequence itself. That is ``peft``'s
``PROMPT_TUNING`` computation, and its files (``prompt_embeddings``, heads under
``base_model.<path>``) are read and written as ``peft`` does. On a BERT-style classifier the
first virtual token takes the place the pooler reads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import PeftkitError
from .base import Injection, MethodConfig, finish

INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
PROMPT_KEY = "prompt_embeddings"


class PromptLearningConfig(MethodConfig):
    """What prompt and prefix tuning share: virtual tokens, and peft's file keys for them."""

    num_virtual_tokens: int = Field(20, gt=0, description="number of learned virtual tokens")

    def file_key(self, key: str) -> str:
        return key if key == PROMPT_KEY else "base_model." + key

    def model_key(self, file_key: str) -> str:
        return file_key if file_key == PROMPT_KEY else file_key.removeprefix("base_model.")


class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    name: Literal["prompt"] = "prompt"
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="random vectors, embeddings of random vocabulary tokens, or of init_text")
    init_text: str | None = Field(None, description="text whose token embeddings start the prompt")

    @model_validator(mode="after")
    def _text_init(self) -> "PromptTuningConfig":
        if self.init_text and self.init == "random":
            self.init = "text"
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        return self

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        embeddings = model.get_input_embeddings()
        if embeddings is None:
            raise PeftkitError(f"{type(model).__name__} has no input embeddings", "method.name",
                               "prompt tuning needs a transformer with a token embedding")
        weight = embeddings.weight
        with torch.no_grad():
            if self.init == "text":
                if tokenizer is None:
                    raise PeftkitError("init_text needs the model's tokenizer", "method.init_text",
                                       "use init: random or vocab, or load the model with its tokenizer")
                ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise PeftkitError("init_text has no tokens", "method.init_text", "write a sentence")
                ids = (ids * self.num_virtual_tokens)[: self.num_virtual_tokens]
                init = weight[torch.tensor(ids, device=weight.device)].clone()
            elif self.init == "vocab":
                ids = torch.randint(0, weight.shape[0], (self.num_virtual_tokens,), device=weight.device)
                init = weight[ids].clone()
            else:
                init = torch.randn(self.num_virtual_tokens, weight.shape[1], device=weight.device) * weight.std()
        model.peftkit_prompt = PromptEmbedding(init.to(weight.dtype))
        model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
        return finish(model, self, modules_to_save=modules_to_save)

    def to_peft(self, injection: Injection, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": model.peftkit_prompt.embedding.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "prompt_tuning_init": INITS[self.init],
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": getattr(config, "_name_or_path", None) or None,
            "tokenizer_kwargs": None,
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "PromptTuningConfig":
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise PeftkitError("prompt tuning for encoder-decoder models is not supported", "adapter_config.json")
        # the file's weights replace any initialisation: loading needs no tokenizer
        return cls(num_virtual_tokens=cfg["num_virtual_tokens"], init="random",
                   modules_to_save=list(cfg.get("modules_to_save") or []))


class PromptEmbedding(nn.Module):
    """The learned virtual tokens, ``(num_virtual_tokens, hidden)``; saved as ``prompt_embeddings``."""

    top_level = True

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding}

    def export_state(self) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.embedding}


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


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    kwargs = as_kwargs(model, args, kwargs)
    if cache_length(kwargs):  # a later generation step: the prompt is already in the cache
        return (), kwargs
    prompt = model.peftkit_prompt.embedding
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    batch, n = embeds.shape[0], prompt.shape[0]
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], 1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], 1)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], 1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], 1)
    return (), kwargs
