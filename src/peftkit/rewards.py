"""What scores a GRPO completion: the recipe's ``rewards:`` items, each with a weight.

- :class:`FunctionReward`: a Python function ``"path/to/file.py:name"`` or ``"module:name"``,
  called as TRL calls its reward functions: ``fn(prompts=..., completions=..., completion_ids=...,
  **columns)`` with one entry per completion (the rows' other columns repeated for each of a
  prompt's completions), returning one float (or None) per completion.
- :class:`AdapterReward`: a classifier adapter's probability of one label, or a reward adapter's
  score, of the prompt and completion as one text. On the policy's own base it is a frozen named
  adapter whose head is kept apart (:class:`ScoreHead`, :func:`shared_scorer`); otherwise the
  entry point loads it on a base of its own and hands in the scorer.

A reward that raises or returns the wrong number of values stops the run on one line naming it
(:class:`~peftkit.errors.PeftkitError`); the checkpoints written so far stand.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PeftkitError
from .methods.base import active_adapters


@dataclass
class ScoreHead:
    """A classifier's or reward model's head, used on a causal-LM base's last hidden states: a
    text's logits are the head at its last token that is not padding (as
    ``...ForSequenceClassification`` takes it)."""

    weight: torch.Tensor  # (outputs, hidden)
    bias: torch.Tensor | None
    pad_id: int | None

    @classmethod
    def split_off(
        cls, state: dict[str, torch.Tensor], keep: list[str], pad_id: int | None, outputs: int | None = 1
    ) -> tuple[Any, dict]:
        """The head (the adapter's saved module with ``outputs`` rows; None: any number) and the
        other tensors; (None, state) when there is no such head."""
        head = next((m for m in keep if state.get(f"{m}.weight") is not None), None)
        if head is None or (outputs is not None and state[f"{head}.weight"].shape[0] != outputs):
            return None, state
        rest = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        return cls(state[f"{head}.weight"].float(), state.get(f"{head}.bias"), pad_id), rest

    def scores(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``(rows, outputs)`` logits from ``(rows, T, hidden)`` states."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = input_ids != self.pad_id if self.pad_id is not None else torch.ones_like(input_ids, dtype=torch.bool)
        last = (positions * real).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0]), last].float()
        out = pooled @ self.weight.T.to(pooled.device)
        return out + self.bias.float().to(out.device) if self.bias is not None else out


@dataclass
class Completions:
    """One batch of sampled completions, as the rewards see them (one entry per completion)."""

    prompts: list[Any]  # the prompt as the data gave it: a string, or a list of chat messages
    completions: list[Any]  # the text; for chat prompts [{"role": "assistant", "content": text}]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]]  # the rows' other columns, repeated per completion
    texts: list[str]  # prompt and completion as one text (what an adapter reward scores)


class FunctionReward:
    """A user's reward function (see the module docstring)."""

    def __init__(self, title: str, function: Callable[..., Any], weight: float, where: str):
        self.title, self.function, self.weight, self.where = title, function, weight, where

    def __call__(self, batch: Completions) -> list[float]:
        try:
            values = self.function(
                prompts=batch.prompts,
                completions=batch.completions,
                completion_ids=batch.completion_ids,
                **batch.columns,
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise PeftkitError(
                f"reward function {self.title} raised {type(exc).__name__}: {first}",
                self.where,
                "fix the function; the checkpoints written so far are intact (resume=auto continues)",
            ) from None
        return _floats(values, len(batch.completions), f"reward function {self.title}", self.where)


class AdapterReward:
    """A classifier or reward adapter's score of each completion (see the module docstring)."""

    def __init__(self, title: str, scorer: Callable[[list[str]], list[float]], weight: float, where: str):
        self.title, self.scorer, self.weight, self.where = title, scorer, weight, where

    def __call__(self, batch: Completions) -> list[float]:
        return _floats(self.scorer(batch.texts), len(batch.texts), f"reward adapter {self.title}", self.where)


def _floats(values: Any, n: int, what: str, where: str) -> list[float]:
    """``values`` as ``n`` floats (None becomes NaN: no reward from this source)."""
    fix = "return one float (or None) per completion, in the order given"
    if isinstance(values, torch.Tensor):
        values = values.detach().float().reshape(-1).tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise PeftkitError(f"{what} returned {type(values).__name__}, not a list", where, fix)
    if len(values) != n:
        raise PeftkitError(f"{what} returned {len(values)} values for {n} completions", where, fix)
    out = []
    for v in values:
        try:
            out.append(math.nan if v is None else float(v))
        except (TypeError, ValueError):
            raise PeftkitError(f"{what} returned {v!r}, not a number", where, fix) from None
    return out


def load_function(spec: str, where: str) -> Callable[..., Any]:
    """The function ``spec`` names: ``"path/to/file.py:name"`` (the file is run as a module) or
    ``"module:name"`` (imported).

    Raises:
        PeftkitError: no such file, module or name, or the file fails to run.
    """
    target, sep, name = spec.rpartition(":")
    fix = 'write function: "path/to/file.py:name" or "package.module:name"'
    if not sep or not target or not name:
        raise PeftkitError(f"reward function {spec!r} does not say FILE:NAME", where, fix)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise PeftkitError(f"reward file {target} not found", where, fix)
            module_name = f"peftkit_reward_{abs(hash(str(path.resolve())))}"
            found = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(found)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except PeftkitError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise PeftkitError(f"cannot load {target}: {type(exc).__name__}: {first}", where, fix) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise PeftkitError(f"{target} has no function {name!r}", where, fix)
    return function


def shared_scorer(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    head: ScoreHead,
    label: int | None,
    max_length: int,
    batch_size: int = 32,
) -> Callable[[list[str]], list[float]]:
    """Scores from the frozen named adapter ``name`` on ``model`` (the policy's base) and its
    ``head``: the probability of class ``label``, or the one output itself (None)."""
    from .data import collate, tokenize
    from .lm_loss import final_hidden_states
    from .methods.base import unwrapped

    def score(texts: list[str]) -> list[float]:
        inner = unwrapped(model)
        device = next(inner.parameters()).device
        features = tokenize(tokenizer, texts, max_length, cache=False)
        out: list[float] = []
        was = inner.training
        inner.eval()
        try:
            with torch.no_grad(), active_adapters(inner, name):
                for s in range(0, len(features), batch_size):
                    batch = {
                        k: v.to(device) for k, v in collate(features[s : s + batch_size], head.pad_id or 0).items()
                    }
                    logits = head.scores(final_hidden_states(inner, **batch), batch["input_ids"])
                    values = logits[:, 0] if label is None else logits.softmax(-1)[:, label]
                    out += values.tolist()
        finally:
            inner.train(was)
        return out

    return score
