"""P-tuning: virtual tokens produced by a small trained encoder, prepended like prompt tuning's.

Trained embeddings ``(num_virtual_tokens, hidden)`` pass through an MLP (three linear layers
with ReLU between them, width ``encoder_hidden_size``), or a bidirectional LSTM followed by a
two-layer MLP; the result is prepended to the input embeddings exactly as prompt tuning does
(:func:`~.prompt.prepend_prompt`). The encoder only helps training: an adapter file holds its
output as ``prompt_embeddings`` (peft's ``P_TUNING`` layout), so a loaded adapter has no
encoder (``encoder: none``) and its prompts are the file's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from .base import Attached, Attachment
from .configs import PROMPT_KEY
from .layer import DEFAULT, Routing
from .prompt import prepend_prompt
from .tuner_configs import PTuningConfig


class PromptEncoder(nn.Module):
    """The embeddings and, while training, the encoder that turns them into the prompts."""

    top_level = True

    def __init__(
        self, cfg: PTuningConfig, hidden: int, device: Any, dtype: torch.dtype, routing: Routing, adapter: str = DEFAULT
    ):
        super().__init__()
        self.routing, self.adapter = routing, adapter
        n, width = cfg.num_virtual_tokens, cfg.encoder_hidden_size or hidden
        self.width = width
        self.embedding = nn.Embedding(n, hidden, device=device, dtype=dtype)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        kw = {"device": device, "dtype": dtype}
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                hidden,
                width,
                num_layers=cfg.encoder_num_layers,
                dropout=cfg.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                **kw,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * width, 2 * width, **kw), nn.ReLU(), nn.Linear(2 * width, hidden, **kw)
            )
        elif cfg.encoder == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, width, **kw),
                nn.ReLU(),
                nn.Linear(width, width, **kw),
                nn.ReLU(),
                nn.Linear(width, hidden, **kw),
            )

    def adapter_params(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters()) if name == self.adapter else {}

    def prompts(self) -> torch.Tensor:
        """The virtual tokens, ``(num_virtual_tokens, hidden)``."""
        out = self.embedding.weight
        if self.lstm_head is not None:
            out = self.lstm_head(out.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(out) if self.mlp_head is not None else out

    def export_state(self, name: str = DEFAULT) -> dict[str, torch.Tensor]:
        if name != self.adapter:
            return {}
        if self.mlp_head is None:  # no encoder: the embeddings are the prompts (and load back into them)
            return {PROMPT_KEY: self.embedding.weight}
        return {PROMPT_KEY: self.prompts().detach()}

    def peft_fields(self) -> dict[str, Any]:
        return {"token_dim": self.embedding.weight.shape[1], "encoder_hidden_size": self.width}


def _hook(module: PromptEncoder, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if not module.routing.on(module.adapter):
        return args, kwargs
    return prepend_prompt(module.prompts(), model, args, kwargs)


def attach_ptuning(model: nn.Module, cfg: PTuningConfig, at: Attachment) -> Attached:
    """Give ``model`` encoder-made virtual tokens before its input embeddings (a forward pre-hook)."""
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise PeftkitError(
            f"{type(model).__name__} has no input embeddings",
            "method.name",
            "P-tuning needs a transformer with a token embedding",
        )
    weight = embeddings.weight
    encoder = PromptEncoder(cfg, weight.shape[1], weight.device, weight.dtype, at.routing, at.name)
    model.add_module("peftkit_prompt", encoder)
    model.register_forward_pre_hook(functools.partial(_hook, encoder), with_kwargs=True)
    return Attached()
