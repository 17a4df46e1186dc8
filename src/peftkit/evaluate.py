"""Evaluation: classification metrics and batched inference over tokenized examples, and what a
decoder is measured on (loss and perplexity; for labelled prompts, label scoring and exact match
of the generated answer). The tasks (:mod:`peftkit.tasks`) call these for every split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import IGNORE_INDEX as IGNORE
from .data import LengthGroupedBatches, collate


def classification_metrics(
    labels: list[int], probs: np.ndarray, label_names: list[str], loss: float | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, (loss) and the confusion matrix (rows: true, columns: predicted).

    Computed with numpy, with scikit-learn's definitions (a class's F1 is ``2 tp / (2 tp + fp +
    fn)``, 0 where it never occurs nor is predicted; the macro average weighs every label
    alike); importing ``sklearn.metrics`` would add its large import tree to the process.
    """
    k = len(label_names)
    truth = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(probs).argmax(axis=-1).astype(np.int64) if len(truth) else truth
    confusion = np.bincount(truth * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    out: dict[str, Any] = {"accuracy": float(tp.sum() / len(truth)) if len(truth) else 0.0, "f1": float(f1.mean())}
    if loss is not None:
        out["loss"] = float(loss)
    out["n"] = len(labels)
    out["confusion_matrix"] = confusion.tolist()
    return out


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    features: list[dict[str, list[int]]],
    *,
    pad_id: int,
    batch_size: int = 64,
    labels: list[int] | None = None,
    device: torch.device | str = "cpu",
    num_processes: int = 1,
    process_index: int = 0,
    padding_side: str = "right",
) -> tuple[np.ndarray, float | None]:
    """Class probabilities for every example (in input order), and the mean loss if ``labels``.

    Examples are run longest-first in batches of similar length. With several processes
    each runs its share and the results are gathered, so every process returns all rows.
    """
    was_training = model.training
    model.eval()
    sampler = LengthGroupedBatches(
        [len(f["input_ids"]) for f in features],
        batch_size,
        shuffle=False,
        num_processes=num_processes,
        process_index=process_index,
    )
    rows: list[tuple[int, np.ndarray, float]] = []
    for idx in sampler:
        batch = collate([features[i] for i in idx], pad_id, padding_side=padding_side)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        probs = logits.softmax(-1).cpu().numpy()
        if labels is not None:
            target = torch.tensor([labels[i] for i in idx], device=logits.device)
            losses = F.cross_entropy(logits, target, reduction="none").cpu().tolist()
        else:
            losses = [0.0] * len(idx)
        rows += list(zip(idx, probs, losses))
    if num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    model.train(was_training)
    rows.sort(key=lambda r: r[0])
    probs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, 0))
    loss = float(np.mean([r[2] for r in rows])) if labels is not None and rows else None
    return probs, loss


# ---- decoders ----
@torch.inference_mode()
def lm_eval_loss(
    model: nn.Module, features: list[dict[str, list[int]]], pad_id: int, batch_size: int, device: Any = "cpu"
) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens, and its perplexity."""
    from .causal import collate_lm
    from .lm_loss import causal_lm_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in LengthGroupedBatches([len(f["input_ids"]) for f in features], batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate_lm([features[i] for i in idx], pad_id).items()}
        total += causal_lm_loss(model, num_items=1, **batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.inference_mode()
def label_probs(
    model: nn.Module,
    prompts: list[list[int]],
    label_tokens: list[int],
    pad_id: int,
    batch_size: int,
    device: Any = "cpu",
) -> np.ndarray:
    """``(len(prompts), len(label_tokens))``: the softmax, over the label words only, of the
    next-token scores after each prompt (prompts right-padded; each read at its last token)."""
    from .causal import collate_lm
    from .inject import output_embedding
    from .lm_loss import final_hidden_states

    was_training = model.training
    model.eval()
    head = output_embedding(model)
    out = np.zeros((len(prompts), len(label_tokens)), dtype=np.float32)
    for idx in LengthGroupedBatches([len(p) for p in prompts], batch_size, shuffle=False):
        batch = collate_lm([{"input_ids": prompts[i], "labels": prompts[i]} for i in idx], pad_id)
        hidden = final_hidden_states(
            model, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        last = batch["attention_mask"].sum(1) - 1 + (hidden.shape[1] - batch["input_ids"].shape[1])
        scores = head(hidden[torch.arange(len(idx)), last.to(hidden.device)]).float()[:, label_tokens]
        out[idx] = scores.softmax(-1).cpu().numpy()
    model.train(was_training)
    return out


def normalise_answer(text: str) -> str:
    return text.strip().strip(".!\"'").strip().lower()


def exact_match(answers: list[str], classes: list[int], label_names: list[str]) -> dict[str, float]:
    """Accuracy of generated answers against the label names, and the share that is a valid label."""
    names = [normalise_answer(n) for n in label_names]
    said = [normalise_answer(a) for a in answers]
    return {
        "exact_match": float(np.mean([s == names[c] for s, c in zip(said, classes)])) if said else 0.0,
        "valid_label_rate": float(np.mean([s in names for s in said])) if said else 0.0,
    }
