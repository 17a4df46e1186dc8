"""Generation with an adapted causal LM: batches of prompts, left-padded, greedy or sampled
(:func:`generate`), and step by step over a batch that rows join and leave (:class:`StepDecoder`,
for a server's continuous batching)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: one decoding step: ``(ids, mask, positions, kv) -> (logits, kv)`` (see :meth:`StepDecoder._forward`)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], tuple[torch.Tensor, list]]


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
    stop_ids: list[int] | None = None,
    around: Callable[[list[int]], Any] | None = None,
) -> list[str]:
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
        idx = order[start : start + batch_size]
        ids, mask = left_padded([prompts[i] for i in idx], pad_id, device)
        width = ids.shape[1]
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        with around(idx) if around else nullcontext():
            new = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stop_ids or tokenizer.eos_token_id,
                streamer=streamer,
                **sampling,
            )[:, width:]
        for row, i in zip(new, idx):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return answers


@dataclass
class Sequence:
    """One prompt being answered token by token (:class:`StepDecoder`).

    ``tokens`` grows by one per step until a stop id or ``max_new`` tokens; ``adapter`` is the
    row's adapter for ``around`` (None: the base). ``finish`` is "stop" or "length" once done.
    """

    prompt: list[int]
    max_new: int
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    stop_token: int | None = None  # the stop id that ended it (not in ``tokens``)

    def push(self, token: int) -> None:
        if token in self.stop_ids:
            self.finish, self.stop_token = "stop", token
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new:
            self.finish = "length"


class StepDecoder:
    """Continuous batching: sequences join and leave a running batch between decoding steps.

    The batch keeps one key/value cache, left-padded: ``(rows, kv_heads, T, head_dim)`` per layer
    and a ``(rows, T)`` mask of real positions. :meth:`add` runs the new prompts' prefill and
    pads either side's cache on the left so they stack; :meth:`step` decodes one token for every
    row (positions counted from each row's own first token, so padding changes nothing);
    finished rows leave and columns no row needs are cut. ``around(adapters)`` is entered around
    each forward pass (which adapter each row uses). Sampled tokens are drawn from ``rng`` (a
    training run passes torch's global generator, which its checkpoints keep), else from a
    generator of the decoder's own, seeded with ``seed``. ``decode_step``, when given, is asked
    inside ``around`` at every step after prefill for a function that computes the step in place
    of the model's forward, with the same inputs and outputs, or None for the forward
    (:attr:`peftkit.accel.DecodeProducts.step`).
    """

    def __init__(
        self,
        model: nn.Module,
        pad_id: int,
        around: Callable[[list[str | None]], Any] | None = None,
        seed: int | None = None,
        rng: torch.Generator | None = None,
        decode_step: Callable[[], Step | None] | None = None,
    ):
        self.model, self.pad_id, self.around, self.decode_step = model, pad_id, around, decode_step
        self.rows: list[Sequence] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask: torch.Tensor | None = None
        self.device = next(model.parameters()).device
        self.rng = rng
        if rng is None:
            self.rng = torch.Generator(device=self.device)
            if seed is not None:
                self.rng.manual_seed(seed)

    def run(self, rows: list[Sequence], copies: int = 1) -> list[Sequence]:
        """Decode ``rows`` to their ends, the finished leaving the batch as they finish
        (``copies``: as :meth:`add` takes it)."""
        self.add(rows, copies)
        while self.rows:
            self.drop(lambda r: r.finish is not None)
            self.step()
        return rows

    @torch.inference_mode()
    def add(self, rows: list[Sequence], copies: int = 1) -> None:
        """Prefill ``rows`` (one forward pass) and give each its first token. With ``copies`` > 1
        every run of that many rows shares one prompt (and adapter), prefilled once for all."""
        if not rows:
            return
        firsts = rows[::copies]
        ids, mask = left_padded([r.prompt for r in firsts], self.pad_id, self.device)
        width = ids.shape[1]
        logits, kv = self._forward(firsts, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), [])
        if copies > 1:
            logits, mask = logits.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
            kv = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in kv]
        virtual = kv[0][0].shape[-2] - width if kv else 0
        if virtual > 0:  # a prompt-tuned adapter put its virtual tokens first: the mask covers the cache
            mask, width = torch.cat([mask.new_ones(len(rows), virtual), mask], dim=1), width + virtual
        if self.rows:
            old, new = self.mask.shape[1], width
            self.kv = [
                (
                    torch.cat([_pad_left(k0, new - old), _pad_left(k1, old - new)]),
                    torch.cat([_pad_left(v0, new - old), _pad_left(v1, old - new)]),
                )
                for (k0, v0), (k1, v1) in zip(self.kv, kv)
            ]
            self.mask = torch.cat([_pad_left(self.mask, new - old, -1), _pad_left(mask, old - new, -1)])
        else:
            self.kv, self.mask = kv, mask
        self.rows += rows
        self._choose(rows, logits)

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every unfinished row."""
        if not self.rows:
            return
        ids = torch.tensor([[r.tokens[-1] if r.tokens else self.pad_id] for r in self.rows], device=self.device)
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        fast: Step | None = None
        with self.around([r.adapter for r in self.rows]) if self.around else nullcontext():
            if self.decode_step is not None and (fast := self.decode_step()) is not None:
                logits, self.kv = fast(ids, self.mask, positions, self.kv)
        if fast is None:
            logits, self.kv = self._forward(self.rows, ids, self.mask, positions, self.kv)
        self._choose(self.rows, logits)

    def drop(self, gone: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take the rows ``gone`` picks (finished, or no longer wanted) out of the batch."""
        leaving = [gone(r) for r in self.rows]
        if not any(leaving):
            return []
        keep = [i for i, out in enumerate(leaving) if not out]
        left = [r for r, out in zip(self.rows, leaving) if out]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.kv, self.mask = [], None
            return left
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row left
        self.mask = mask[:, first:]
        self.kv = [(k[index, :, first:], v[index, :, first:]) for k, v in self.kv]
        return left

    def _forward(
        self,
        rows: list[Sequence],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        with self.around([r.adapter for r in rows]) if self.around else nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[:, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    def _choose(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        for row, token in zip(rows, sample(logits, [r.temperature for r in rows], [r.top_p for r in rows], self.rng)):
            if row.finish is None:
                row.push(int(token))


def sample(
    logits: torch.Tensor, temperature: list[float], top_p: list[float], rng: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of ``(rows, vocab)`` logits: the most likely where the row's temperature
    is 0, else drawn from the softmax at that temperature, kept to the smallest set of tokens
    whose probability reaches ``top_p`` (at least one)."""
    chosen = logits.argmax(-1)
    hot = [i for i, t in enumerate(temperature) if t > 0]
    if not hot:
        return chosen
    index = torch.tensor(hot, device=logits.device)
    temp = torch.tensor([temperature[i] for i in hot], device=logits.device)[:, None]
    keep = torch.tensor([top_p[i] for i in hot], device=logits.device)[:, None]
    probs = (logits[index] / temp).softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    outside = ordered.cumsum(-1) - ordered >= keep  # the mass before a token already reaches top_p
    ordered = ordered.masked_fill(outside, 0.0)
    picked = torch.multinomial(ordered, 1, generator=rng)
    chosen[index] = order.gather(-1, picked)[:, 0]
    return chosen


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one ``(rows, width)`` batch padded on the left, and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _pad_left(t: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    """``t`` with ``n`` zero columns before the others along ``dim`` (nothing when ``n`` <= 0)."""
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
