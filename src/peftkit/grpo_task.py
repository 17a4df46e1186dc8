"""Online RL from rewards (``task: grpo``): prompts in; per step, completions sampled with the
current adapter by peftkit's own decoder (:class:`~peftkit.generation.StepDecoder`), scored by the
recipe's rewards (:mod:`peftkit.rewards`), and GRPO's clipped loss (:mod:`peftkit.grpo`) out.

One micro-batch of ``batch_size`` prompts becomes ``batch_size x num_generations`` completions: a
:class:`Rollout`. With ``num_iterations`` > 1 the loop presents the same micro-batches that many
times (:class:`~peftkit.data.RepeatedWindows`) and the rollout is reused, the importance ratio
against the probabilities it was sampled with doing its work; the rollouts waiting for their
next use are part of a checkpoint (:meth:`GRPOTask.state_dict`). Sampling draws from torch's
global generator, which checkpoints keep too, so a resumed run samples what the first would have.

The reference, when ``beta`` > 0, is the base with the adapter off, or a frozen adapter
(``grpo.reference``) beside the trained one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .causal import LMEncoder
from .config import DataConfig, GRPOConfig
from .errors import PeftkitError
from .generation import Sequence, StepDecoder
from .grpo import completion_token_logps, group_advantages, policy_loss
from .methods.base import unwrapped
from .preference import Reference
from .rewards import Completions


@dataclass
class PromptRows:
    """One split's prompts (a string, or a list of chat messages) and their other columns."""

    rows: list[dict[str, Any]]  # {"prompt": ..., "columns": {name: value}}
    kind: str = "prompts"
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int]) -> PromptRows:
        return PromptRows([self.rows[i] for i in indices], self.kind)


def to_prompt_rows(table: Any, cfg: DataConfig, source: str, split: str) -> PromptRows:
    """A loaded table as prompts: its ``data.prompt_column``; else ``data.prompt_template``
    filled with the text column; else the text column itself. Every column goes to the rewards."""
    from .data import column_lists

    columns = list(table.column_names) if hasattr(table, "column_names") else list(table)
    lists = column_lists(table, columns)
    n = len(lists[columns[0]]) if columns else 0
    if cfg.prompt_column in columns:
        prompts = lists[cfg.prompt_column]
    elif cfg.text_column in columns:
        texts = lists[cfg.text_column]
        pairs = lists.get(cfg.text_pair_column) if cfg.text_pair_column else None
        template = cfg.prompt_template
        prompts = [
            template.format(text=t, text_pair=pairs[i] if pairs else "") if template else t for i, t in enumerate(texts)
        ]
    else:
        raise PeftkitError(
            f"no prompts in the {split} split (found: {', '.join(columns)})",
            source,
            "give a prompt column (text or chat messages), or set data.text_column (with data.prompt_template)",
        )
    rows = [{"prompt": prompts[i], "columns": {c: lists[c][i] for c in columns}} for i in range(n)]
    return PromptRows(rows)


@dataclass
class Rollout:
    """One micro-batch's completions, scored, as tensors the loss reads (``N`` completions,
    prompts left-padded to ``P`` and completions right-padded to ``C`` tokens)."""

    input_ids: torch.Tensor  # (N, P + C)
    attention_mask: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C): 1 on completion tokens that count
    advantages: torch.Tensor  # (N,)
    old_logps: torch.Tensor | None  # (N, C) when num_iterations > 1
    ref_logps: torch.Tensor | None  # (N, C) when beta > 0
    metrics: dict[str, float]
    uses: int = 0

    @property
    def completion_length(self) -> int:
        return self.completion_mask.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "completion_mask": self.completion_mask,
            "advantages": self.advantages,
            "uses": torch.tensor(self.uses),
        }
        out.update({k: v for k, v in (("old_logps", self.old_logps), ("ref_logps", self.ref_logps)) if v is not None})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], metrics: dict[str, float]) -> Rollout:
        return cls(
            t["input_ids"],
            t["attention_mask"],
            t["completion_mask"],
            t["advantages"],
            t.get("old_logps"),
            t.get("ref_logps"),
            metrics,
            int(t["uses"]),
        )


@dataclass
class GRPOTask:
    """Prompts and rewards for a causal LM; see the module docstring."""

    name: ClassVar[str] = "causal_lm"  # what the adapter is: a causal-LM adapter, used as any other
    cfg: GRPOConfig
    encoder: LMEncoder
    prompts: dict[str, PromptRows]
    features: dict[str, list[dict[str, list[int]]]]  # split -> the prompts' token ids
    tokenizer: Any
    rewards: list[Any] = field(default_factory=list)  # rewards.FunctionReward / AdapterReward
    reference: Reference = field(default_factory=Reference)
    meta: dict[str, Any] = field(default_factory=dict)
    truncated_prompts: dict[str, int] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    #: what the log line shows of ``last_metrics``
    shown: ClassVar[tuple[str, ...]] = ("reward", "reward_std", "completion_length", "kl")
    rollouts: dict[tuple[int, ...], Rollout] = field(default_factory=dict)  # waiting for their next use
    samples: list[dict[str, Any]] = field(default_factory=list)  # the last rollout's completions, for the log
    #: the entry point's decoding speed-up, ``(model, dtype) -> context manager`` (accel's
    #: DecodeProducts, whose ``step`` the decoder then uses), and the dtype training samples in
    #: (evaluation samples in float32)
    decoding: Callable[[nn.Module, torch.dtype], Any] | None = None
    sample_dtype: torch.dtype = torch.float32
    sample_every: int = 0  # steps between the sample completions the trainer writes

    @property
    def repeats(self) -> int:
        return self.cfg.num_iterations

    def describe(self) -> str:
        parts = ", ".join(f"{s} {len(f)}" for s, f in self.features.items())
        cut = "; ".join(f"{s}: {n} prompts cut to data.max_length" for s, n in self.truncated_prompts.items() if n)
        c = self.cfg
        return (
            f"{parts} prompts; {c.num_generations} completions each (temperature {c.temperature}, top_p {c.top_p}, "
            f"at most {c.max_completion_length} tokens); loss {c.loss_type}, beta {c.beta}"
            + (f" against {self.reference.describe()}" if c.beta > 0 else "")
            + f"; rewards {', '.join(f'{r.title} x {r.weight:g}' for r in self.rewards)}"
            + (f"; {cut}" if cut else "")
        )

    def start(self, model: nn.Module, device: Any, autocast: Callable[[], Any], say: Callable[[str], None]) -> None:
        return None  # nothing to compute before the first step

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(indices)}

    # ---- sampling and scoring ----
    def sample(
        self, model: nn.Module, split: str, indices: list[int], generations: int, temperature: float
    ) -> tuple[list[Sequence], Completions]:
        """``generations`` completions of each prompt ``indices`` of ``split`` (adjacent), with
        the model as it stands (dropout off), and what the rewards see of them."""
        inner = unwrapped(model)
        c = self.cfg
        stops = frozenset(self.encoder.stop_ids)
        seqs = [
            Sequence(self.features[split][i]["input_ids"], c.max_completion_length, None, temperature, c.top_p, stops)
            for i in indices
            for _ in range(generations)
        ]
        was = inner.training
        inner.eval()
        dtype = self.sample_dtype if temperature > 0 else torch.float32
        try:
            with self.decoding(inner, dtype) if self.decoding else contextlib.nullcontext() as products:
                step = (lambda: products.step) if products is not None else None  # the speed layer's own step
                decoder = StepDecoder(inner, self.tokenizer.pad_token_id, rng=torch.default_generator, decode_step=step)
                decoder.run(seqs, copies=generations)  # each prompt prefilled once for its group
        finally:
            inner.train(was)
        rows = [self.prompts[split].rows[i] for i in indices for _ in range(generations)]
        texts = self.tokenizer.batch_decode([s.tokens for s in seqs], skip_special_tokens=True)
        chat = [isinstance(r["prompt"], list) for r in rows]
        batch = Completions(
            prompts=[r["prompt"] for r in rows],
            completions=[[{"role": "assistant", "content": t}] if ch else t for t, ch in zip(texts, chat)],
            completion_ids=[list(s.tokens) for s in seqs],
            columns={k: [r["columns"][k] for r in rows] for k in (rows[0]["columns"] if rows else {})},
            texts=[t if ch else r["prompt"] + t for t, ch, r in zip(texts, chat, rows)],
        )
        return seqs, batch

    def score(self, batch: Completions) -> torch.Tensor:
        """``(N, rewards)``: each reward's value per completion (NaN: none from that reward)."""
        return torch.tensor([reward(batch) for reward in self.rewards], dtype=torch.float32).T.reshape(
            len(batch.texts), len(self.rewards)
        )

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the rewards per completion (NaN ones count 0, as in TRL)."""
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        return torch.nansum(values * weights, dim=1)

    def _rollout(self, model: nn.Module, indices: list[int]) -> Rollout:
        c = self.cfg
        began = time.perf_counter()
        seqs, batch = self.sample(model, "train", indices, c.num_generations, c.temperature)
        generated = time.perf_counter() - began
        values = self.score(batch)
        rewards = self.total(values)
        scored = time.perf_counter() - began - generated
        advantages = group_advantages(rewards, c.num_generations, c.scale_rewards)
        device = next(unwrapped(model).parameters()).device
        ids, mask, keep = self._tensors(seqs, device)
        truncated = torch.tensor([s.finish == "length" for s in seqs])
        if c.mask_truncated_completions:
            keep = keep * (~truncated).to(keep.dtype)[:, None].to(device)
        roll = Rollout(ids, mask, keep, advantages.to(device), None, None, {})
        if c.num_iterations > 1:
            roll.old_logps = self._logps(model, roll, grad=False)
        if c.beta > 0:
            with self.reference.using(unwrapped(model)):
                roll.ref_logps = self._logps(model, roll, grad=False)
        grouped = rewards.view(-1, c.num_generations)
        lengths = torch.tensor([float(len(s.tokens) + (s.stop_token is not None)) for s in seqs])
        roll.metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(grouped.std(1).mean()) if c.num_generations > 1 else 0.0,
            "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()),
            "completion_length": float(lengths.mean()),
            "truncated_ratio": float(truncated.float().mean()),
            "generate_seconds": generated,
            "reward_seconds": scored,
            "tokens_generated": float(lengths.sum()),
        }
        for j, r in enumerate(self.rewards):
            column = values[:, j]
            roll.metrics[f"rewards/{r.title}/mean"] = float(column.nanmean())
            roll.metrics[f"rewards/{r.title}/std"] = float(column[~column.isnan()].std()) if len(column) > 1 else 0.0
        self.samples = [
            {
                "prompt": p,
                "completion": t,
                "reward": float(rewards[i]),
                "advantage": float(advantages[i]),
                **{r.title: float(values[i, j]) for j, r in enumerate(self.rewards)},
            }
            for i, (p, t) in enumerate(zip(batch.prompts, batch.completions))
        ]
        return roll

    def _tensors(self, seqs: list[Sequence], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts left-padded, completions (with the stop token that ended them) right-padded."""
        pad = self.tokenizer.pad_token_id
        done = [s.tokens + ([s.stop_token] if s.stop_token is not None else []) for s in seqs]
        width, length = max(len(s.prompt) for s in seqs), max(1, max(len(d) for d in done))
        ids = [[pad] * (width - len(s.prompt)) + s.prompt + d + [pad] * (length - len(d)) for s, d in zip(seqs, done)]
        mask = [
            [0] * (width - len(s.prompt)) + [1] * (len(s.prompt) + len(d)) + [0] * (length - len(d))
            for s, d in zip(seqs, done)
        ]
        mask_t = torch.tensor(mask, device=device)
        return torch.tensor(ids, device=device), mask_t, mask_t[:, width:].float()

    def _logps(self, model: nn.Module, roll: Rollout, grad: bool) -> torch.Tensor:
        positions = (roll.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.set_grad_enabled(grad):
            logps = completion_token_logps(
                model if grad else unwrapped(model),
                roll.input_ids,
                roll.attention_mask,
                roll.completion_length,
                self.cfg.temperature,
                positions,
            )
        return logps if grad else logps.detach()

    # ---- the loss ----
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sample and score this micro-batch's completions (or take the rollout waiting for
        its next use), then GRPO's loss of the policy as it stands."""
        c = self.cfg
        key = tuple(int(i) for i in batch["index"].tolist())
        roll = self.rollouts.pop(key, None) or self._rollout(model, list(key))
        out = policy_loss(
            self._logps(model, roll, grad=True),
            roll.advantages,
            roll.completion_mask,
            old_logps=roll.old_logps,
            ref_logps=roll.ref_logps,
            loss_type=c.loss_type,
            epsilon=c.epsilon,
            epsilon_high=c.epsilon_high,
            beta=c.beta,
            max_completion_length=c.max_completion_length,
        )
        roll.uses += 1
        if roll.uses < c.num_iterations:
            self.rollouts[key] = roll
        first = roll.uses == 1  # time and tokens count once per rollout
        self.last_metrics = {
            **{k: v for k, v in roll.metrics.items() if first or not k.endswith(("_seconds", "tokens_generated"))},
            "clip_ratio": out.clipped,
            **({"kl": out.kl} if out.kl is not None else {}),
        }
        return out.loss

    def state_dict(self) -> dict[str, Any]:
        """The rollouts waiting for their next use (a checkpoint between iterations keeps them)."""
        return {
            "rollouts": [
                {"key": list(k), "tensors": {n: t.cpu() for n, t in r.tensors().items()}, "metrics": r.metrics}
                for k, r in self.rollouts.items()
            ]
        }

    def load_state_dict(self, state: dict[str, Any], device: Any) -> None:
        self.rollouts = {
            tuple(item["key"]): Rollout.from_tensors(
                {n: t.to(device) for n, t in item["tensors"].items()}, item["metrics"]
            )
            for item in (state or {}).get("rollouts", [])
        }

    # ---- evaluation ----
    def best_metric(self, wanted: str) -> str:
        return "reward"

    def evaluate(
        self,
        model: nn.Module,
        split: str,
        batch_size: int,
        device: Any,
        num_processes: int = 1,
        process_index: int = 0,
        final: bool = False,
    ) -> dict[str, Any]:
        """Each prompt's greedy completion, scored: the mean of every reward and of their
        weighted sum. Every process computes the whole split."""
        n = len(self.features[split])
        values, lengths, truncated = [], [], 0
        sample: list[dict[str, Any]] = []
        for s in range(0, n, batch_size):
            seqs, batch = self.sample(model, split, list(range(s, min(n, s + batch_size))), 1, 0.0)
            values.append(self.score(batch))
            lengths += [len(q.tokens) for q in seqs]
            truncated += sum(q.finish == "length" for q in seqs)
            if not sample:
                sample = [{"prompt": p, "completion": t} for p, t in list(zip(batch.prompts, batch.completions))[:5]]
        table = torch.cat(values) if values else torch.zeros(0, len(self.rewards))
        metrics: dict[str, Any] = {"n": n, "reward": float(self.total(table).mean()) if n else 0.0}
        for j, r in enumerate(self.rewards):
            metrics[f"rewards/{r.title}/mean"] = float(table[:, j].nanmean()) if n else 0.0
        metrics["completion_length"] = sum(lengths) / max(1, n)
        metrics["truncated_ratio"] = truncated / max(1, n)
        if final:
            metrics["completions_sample"] = sample
        return metrics

    @staticmethod
    def line(metrics: dict[str, Any]) -> str:
        parts = [f"reward {metrics['reward']:.4f}"]
        parts += [f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.startswith("rewards/")]
        return " ".join(parts) + f" completion length {metrics['completion_length']:.1f}"

    def summary(self) -> dict[str, Any]:
        return {
            "grpo": self.cfg.model_dump(mode="json"),
            "rewards": [{"title": r.title, "weight": r.weight} for r in self.rewards],
        }


def build_grpo_task(cfg: Any, tokenizer: Any, splits: dict[str, PromptRows], meta: dict[str, Any]) -> GRPOTask:
    """The task for a ``task: grpo`` run over loaded prompt splits (rewards come later, once the
    model they may sit on is loaded)."""
    encoder = LMEncoder(tokenizer, cfg.data)
    room = cfg.data.max_length
    features: dict[str, list[dict[str, list[int]]]] = {}
    cut: dict[str, int] = {}
    for split, rows in splits.items():
        ids = [
            encoder.chat_prompt_ids(r["prompt"])
            if isinstance(r["prompt"], list)
            else encoder.prompt_ids(str(r["prompt"]))
            for r in rows.rows
        ]
        cut[split] = sum(len(i) > room for i in ids)
        features[split] = [{"input_ids": i[-room:]} for i in ids]  # the end of a prompt asks the question
    meta = {
        **meta,
        "chat_template": encoder.chat,
        "prompt_template": cfg.data.prompt_template,
        "system_prompt": cfg.data.system_prompt,
        "label_names": None,
    }
    every = cfg.grpo.log_completions_steps or cfg.train.log_steps
    return GRPOTask(
        cfg.grpo, encoder, splits, features, tokenizer, meta=meta, truncated_prompts=cut, sample_every=every
    )
