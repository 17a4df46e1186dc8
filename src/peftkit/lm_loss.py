"""Next-token loss for causal LMs without materialising the logits of the whole batch.

A decoder's logits are ``tokens x vocabulary`` floats: 49,152 per token for SmolLM2, so a
batch of 4 x 128 tokens holds 100 MB of logits, and the usual loss keeps two or three more
copies (shifted, log-softmax, gradient). :func:`causal_lm_loss` runs the model up to its
output layer, then computes the loss and its gradient a few dozen tokens at a time: the
largest extra tensor is one chunk's logits, and what stays for backward is the gradient
with respect to the hidden states (``tokens x hidden``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .config import IGNORE_INDEX as IGNORE
from .inject import output_embedding

CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MiB in float32)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_items: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    across_processes: bool = False,
    **inputs: Any,
) -> torch.Tensor:
    """Mean cross-entropy of ``labels[:, 1:]`` given the hidden state one position earlier.

    Args:
        model: a ``*ForCausalLM`` model (methods applied or not).
        labels: token ids, ``-100`` where no loss is taken (prompt, padding).
        num_items: divide by this many labelled tokens instead of this batch's count
            (gradient accumulation over batches of different sizes).
        across_processes: under data parallelism, divide by the labelled tokens of every
            process's batch (over the number of processes, since DDP averages the gradients),
            so several processes compute the loss of one batch of them all.
        inputs: other model inputs (``position_ids``, ...).
    """
    hidden = final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, **inputs)
    if hidden.shape[1] > labels.shape[1]:  # a soft prompt was prepended: no loss on its positions
        pad = labels.new_full((labels.shape[0], hidden.shape[1] - labels.shape[1]), IGNORE)
        labels = torch.cat([pad, labels], dim=1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(states.device)
    keep = targets != IGNORE
    states, targets = states[keep], targets[keep]
    count = num_items if num_items is not None else max(int(keep.sum()), 1)
    if num_items is None and across_processes and dist.is_available() and dist.is_initialized():
        every = keep.sum().to(torch.float64)
        dist.all_reduce(every)
        count = max(float(every), 1.0) / dist.get_world_size()
    head = output_embedding(model)
    rows = max(1, chunk_elements // head.weight.shape[0])
    if type(head) is nn.Linear:
        total = _ChunkedLinearCrossEntropy.apply(states, head.weight, head.bias, targets, rows)
    else:  # a wrapped head (LoRA on it, say): one chunk's logits at a time, recomputed in backward
        total = sum(
            checkpoint(_chunk_loss, head, states[s : s + rows], targets[s : s + rows], use_reentrant=False)
            for s in range(0, len(targets), rows)
        )
    return total / count


def final_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """The model's last hidden states, taken as they enter the output layer, which then runs on
    zero positions; going through the top-level forward keeps every method's hooks in play."""
    captured: list[torch.Tensor] = []

    def take(_module: nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][..., :0, :],)

    handle = output_embedding(model).register_forward_pre_hook(take)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def _chunk_loss(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``states @ weight.T + bias``; gradients computed chunk by chunk in
    forward (softmax minus one-hot), so backward only scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        states: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        want_w, want_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        for s in range(0, len(targets), rows):
            h, y = states[s : s + rows], targets[s : s + rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d loss / d logits
            g = probs.to(states.dtype)
            if grad_states is not None:
                grad_states[s : s + rows] = g @ weight
            if want_w:
                grad_w.addmm_(g.t(), h)
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_states, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_states, grad_w, grad_b = ctx.saved_tensors
        scale = lambda t: None if t is None else t * grad.to(t.dtype)
        return scale(grad_states), scale(grad_w), scale(grad_b), None, None
