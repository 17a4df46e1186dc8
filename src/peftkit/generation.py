"""Generation with an adapted causal LM: batches of prompts, left-padded, greedy or sampled."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, streamer: Any = None,
             stop_ids: list[int] | None = None, around: Callable[[list[int]], Any] | None = None) -> list[str]:
    """The decoded continuation of each prompt (greedy when ``temperature`` is 0), up to the
    first of ``stop_ids`` (default: the tokenizer's end of sequence). ``around(indices)``, when
    given, is a context manager entered around each batch (e.g. which adapter each row uses)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with around(idx) if around else nullcontext():
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=stop_ids or tokenizer.eos_token_id, streamer=streamer,
                                 **sampling)[:, width:]
        for row, i in zip(new, idx):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return answers
