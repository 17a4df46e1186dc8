"""Reward models (task ``reward``): a sequence classifier with one output, the score, trained on
preference pairs with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

A pair's two texts are the prompt followed by each answer, tokenized as TRL's ``RewardTrainer``
does: conversational rows through the chat template, plain rows as text with EOS after the
answer. A text over ``data.max_length`` loses the start of its prompt (its first token kept when
it is a special one), so the answers, where a pair differs, are always scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .causal import Rows
from .config import DataConfig, RewardConfig
from .data import column_lists
from .errors import PeftkitError
from .methods.base import unwrapped
from .pairs import PairEncoder, pad_rows, to_pair_rows

SCORE = "score"  # the reward head's one label


def to_reward_rows(table: Any, cfg: DataConfig, source: str, split: str, margin_column: str | None = None) -> Rows:
    """Paired rows (:func:`~peftkit.pairs.to_pair_rows`), with each row's margin when asked."""
    rows = to_pair_rows(table, cfg, source, split)
    if rows.kind != "paired":
        raise PeftkitError(
            f"the {split} split holds single answers (KTO's layout); a reward model learns from pairs",
            source,
            f"give {cfg.chosen_column} and {cfg.rejected_column} columns",
        )
    if margin_column:
        columns = list(table.column_names) if hasattr(table, "column_names") else list(table)
        if margin_column not in columns:
            raise PeftkitError(
                f"margin column '{margin_column}' not found in the {split} split",
                source,
                f"set reward.margin_column to one of: {', '.join(columns)}, or remove it",
            )
        for row, margin in zip(rows.rows, column_lists(table, [margin_column])[margin_column]):
            row["margin"] = margin
    return rows


@dataclass
class RewardEncoded:
    features: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0


def encode_reward_split(encoder: PairEncoder, rows: Rows, where: str) -> RewardEncoded:
    """Each pair's chosen and rejected text as token ids (``input_ids``, ``rejected``)."""
    out = RewardEncoded()
    tok, limit = encoder.tok, encoder.cfg.max_length
    special = set(tok.all_special_ids)
    for i, row in enumerate(rows.rows):
        at = f"{where}, row {i + 1}"
        encoder.check(row, "paired", at)
        prompt, (chosen, rejected) = encoder.split_ids(row.get("prompt"), [row["chosen"], row["rejected"]], at)
        texts = []
        for answer in (chosen, rejected):
            ids = prompt + answer
            if len(ids) > limit:
                out.truncated += 1
                keep = 1 if ids[0] in special else 0
                ids = ids[:keep] + ids[len(ids) - (limit - keep) :]
            texts.append(ids)
        feature: dict[str, Any] = {"input_ids": texts[0], "rejected": texts[1]}
        if "margin" in row:
            try:
                feature["margin"] = float(row["margin"])
            except (TypeError, ValueError):
                raise PeftkitError(f"margin {row['margin']!r} is not a number", at, "give numbers") from None
        out.features.append(feature)
    return out


def score_batch(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen texts first, then rejected ones, right-padded; ``margin`` when the rows have one."""
    ids = [f["input_ids"] for f in features] + [f["rejected"] for f in features]
    batch = {"input_ids": pad_rows(ids, pad_id), "attention_mask": pad_rows([[1] * len(s) for s in ids], 0)}
    if "margin" in features[0]:
        batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
    return batch


@dataclass
class RewardTask:
    """Bradley-Terry training of a one-output classifier; see the module docstring."""

    name: ClassVar[str] = "reward"
    cfg: RewardConfig
    encoded: dict[str, RewardEncoded]
    pad_id: int
    meta: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def features(self) -> dict[str, list[dict[str, Any]]]:
        return {s: e.features for s, e in self.encoded.items()}

    def describe(self) -> str:
        parts = ", ".join(f"{s} {len(e.features)}" for s, e in self.encoded.items())
        cut = "; ".join(f"{s}: {e.truncated} texts cut" for s, e in self.encoded.items() if e.truncated)
        return f"{parts} pairs; a scalar score, Bradley-Terry loss" + (f" ({cut})" if cut else "")

    def start(self, model: nn.Module, device: Any, autocast: Callable[[], Any], say: Callable[[str], None]) -> None:
        return None

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        feats = self.encoded["train"].features
        return score_batch([feats[i] for i in indices], self.pad_id)

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = logits.squeeze(-1).float().chunk(2)
        return chosen, rejected

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        margin = batch.get("margin")
        loss = -F.logsigmoid(chosen - rejected - (margin if margin is not None else 0.0)).mean()
        if self.cfg.center_rewards_coefficient is not None:
            loss = loss + self.cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.scores(model, batch)
        self.last_metrics = {
            "accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).detach().mean()),
        }
        return self.pair_loss(chosen, rejected, batch)

    def best_metric(self, wanted: str) -> str:
        return "loss" if wanted == "loss" else "accuracy"

    @torch.no_grad()
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
        """Pair accuracy (the chosen text scored higher), mean margin, loss and the scores' range;
        every process computes the whole split."""
        inner = unwrapped(model)
        was = inner.training
        inner.eval()
        feats = self.encoded[split].features
        chosen, rejected, losses = [], [], []
        for s in range(0, len(feats), batch_size):
            part = feats[s : s + batch_size]
            batch = {k: v.to(device) for k, v in score_batch(part, self.pad_id).items()}
            c, r = self.scores(inner, batch)
            losses.append(float(self.pair_loss(c, r, batch)) * len(part))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        inner.train(was)
        c, r = torch.cat(chosen), torch.cat(rejected)
        every = torch.cat([c, r])
        return {
            "n": len(feats),
            "loss": sum(losses) / len(feats),
            "accuracy": float((c > r).float().mean()),
            "margin": float((c - r).mean()),
            "mean_reward": float(every.mean()),
            "min_reward": float(every.min()),
            "max_reward": float(every.max()),
        }

    @staticmethod
    def line(metrics: dict[str, Any]) -> str:
        return f"loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} margin {metrics['margin']:.4f}"

    def summary(self) -> dict[str, Any]:
        return {
            "label_names": [SCORE],
            "truncation": {s: {"texts_cut": e.truncated} for s, e in self.encoded.items()},
        }


def evaluate_reward(
    clf: Any, source: str, split: str = "test", *, max_samples: int | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """A reward adapter (:class:`~peftkit.predict.AdaptedClassifier`) on a split of pairs: pair
    accuracy, mean margin, loss and the scores' range."""
    from .data import load_one_split, subsample

    meta = clf.adapter.meta
    cfg = DataConfig(max_length=clf.max_length, system_prompt=meta.get("system_prompt"))
    rows = subsample(load_one_split(source, split, cfg, convert=to_reward_rows), max_samples, meta.get("seed", 0))
    encoded = encode_reward_split(PairEncoder(clf.tokenizer, cfg), rows, f"{source}, {split} split")
    task = RewardTask(RewardConfig(), {split: encoded}, clf.tokenizer.pad_token_id)
    metrics = task.evaluate(clf.model, split, batch_size, next(clf.model.parameters()).device)
    return {"dataset": source, "split": split, "texts_cut": encoded.truncated, **metrics}
