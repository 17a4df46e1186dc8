"""What the training loop asks of a task (:class:`Task`): batches, the loss, evaluation, adapter
metadata.

:class:`ClassificationTask`: a head over labels (encoders, and decoders as classifiers).
:class:`CausalLMTask`: next-token loss on a decoder (see :mod:`peftkit.causal`).
:class:`~peftkit.preference.PreferenceTask` (DPO and kin) and :class:`~peftkit.reward.RewardTask`
(reward models) are built here too. A new kind of run implements :class:`Task`; the loop needs
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .causal import LMEncoder, collate_lm, pack
from .config import RunConfig
from .data import collate, encode_labels, tokenize
from .errors import PeftkitError
from .evaluate import classification_metrics, exact_match, label_probs, lm_eval_loss, predict_probs
from .generation import generate
from .lm_loss import causal_lm_loss


class Task(Protocol):
    """A run's task, as :class:`~peftkit.train.Trainer` uses it.

    Attributes:
        name: written to the adapter's peftkit.json as its task (``classification``...).
        features: tokenized examples per split (``train``, ``validation``, ``test``), each a dict
            with at least ``input_ids``; the sampler groups the train split by their lengths.
        meta: facts the adapter's peftkit.json keeps (prompt format, label columns...).
    """

    name: ClassVar[str]
    features: dict[str, list[dict[str, list[int]]]]
    meta: dict[str, Any]
    last_metrics: dict[str, float]  # metrics of the last ``loss`` call besides the loss (logged as means)

    def describe(self) -> str:
        """One line for the log: split sizes and what is predicted."""
        ...

    def start(self, model: nn.Module, device: Any, autocast: Callable[[], Any], say: Callable[[str], None]) -> None:
        """Once, before the first step (every process): what the task computes from the model."""
        ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The train split's examples ``indices`` as one padded batch of tensors."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of ``batch`` (a graph for backward)."""
        ...

    def best_metric(self, wanted: str) -> str:
        """The validation metric the best checkpoint follows (``wanted`` where it applies)."""
        ...

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
        """Metrics of ``split`` (every process calls it; each takes its share of the rows)."""
        ...

    def line(self, metrics: dict[str, Any]) -> str:
        """``metrics`` as the log shows them."""
        ...

    def summary(self) -> dict[str, Any]:
        """What summary.json says of the task."""
        ...


class _Plain:
    """What a task with nothing to compute before training, and no metrics besides its loss, has."""

    last_metrics: ClassVar[dict[str, float]] = {}

    def start(self, model: nn.Module, device: Any, autocast: Callable[[], Any], say: Callable[[str], None]) -> None:
        return None


@dataclass
class ClassificationTask(_Plain):
    name: ClassVar[str] = "classification"
    label_names: list[str]
    features: dict[str, list[dict[str, list[int]]]]
    labels: dict[str, list[int]]
    pad_id: int
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{s} {len(f)}" for s, f in self.features.items()) + f"; labels {self.label_names}"

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        feats, labels = self.features["train"], self.labels["train"]
        return collate([feats[i] for i in indices], self.pad_id, [labels[i] for i in indices])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def best_metric(self, wanted: str) -> str:
        return wanted

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
        # the model itself, not its DDP wrapper: a wrapped forward is a collective (it broadcasts
        # buffers), and the processes may run different numbers of evaluation batches
        probs, loss = predict_probs(
            getattr(model, "module", model),
            self.features[split],
            pad_id=self.pad_id,
            batch_size=batch_size,
            labels=self.labels[split],
            device=device,
            num_processes=num_processes,
            process_index=process_index,
        )
        return classification_metrics(self.labels[split], probs, self.label_names, loss)

    @staticmethod
    def line(metrics: dict[str, Any]) -> str:
        return f"loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f}"

    def summary(self) -> dict[str, Any]:
        return {"label_names": self.label_names}


@dataclass
class CausalLMTask(_Plain):
    """Next-token loss; with labelled prompts also label scoring, and exact match at the end."""

    name: ClassVar[str] = "causal_lm"
    encoder: Any  # causal.LMEncoder
    features: dict[str, list[dict[str, list[int]]]]
    encoded: dict[str, Any]  # split -> causal.Encoded (prompts, classes, truncation counts)
    pad_id: int
    tokenizer: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str] | None:
        return self.encoder.label_names

    def describe(self) -> str:
        parts = [f"{s} {len(f)}" for s, f in self.features.items()]
        cut = [
            f"{s}: {e.truncated} over the limit, {e.completion_cut} of them lost part of the completion"
            for s, e in self.encoded.items()
            if e.truncated or e.completion_cut
        ]
        labels = f"; labels {self.label_names}" if self.label_names else ""
        return (
            ", ".join(parts)
            + labels
            + (f"; truncated to {self.encoder.cfg.max_length} tokens (" + "; ".join(cut) + ")" if cut else "")
        )

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_lm([self.features["train"][i] for i in indices], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(model, **batch, across_processes=True)

    def best_metric(self, wanted: str) -> str:
        return wanted if self.label_names else "loss"

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
        """Loss and perplexity; labelled prompts add label-scoring accuracy and F1 (and, when
        ``final``, exact match of greedy answers). Every process computes the whole split."""
        unwrapped = getattr(model, "module", model)
        metrics = {
            "n": len(self.features[split]),
            **lm_eval_loss(unwrapped, self.features[split], self.pad_id, batch_size, device),
        }
        enc = self.encoded[split]
        if self.label_names:
            probs = label_probs(unwrapped, enc.prompts, self.encoder.label_tokens, self.pad_id, batch_size, device)
            metrics.update(classification_metrics(enc.classes, probs, self.label_names, metrics["loss"]))
            if final:
                longest = max(len(self.tokenizer(n, add_special_tokens=False)["input_ids"]) for n in self.label_names)
                answers = generate(
                    unwrapped,
                    self.tokenizer,
                    enc.prompts,
                    max_new_tokens=longest + 2,
                    batch_size=batch_size,
                    stop_ids=self.encoder.stop_ids,
                )
                metrics.update(exact_match(answers, enc.classes, self.label_names))
                metrics["answers_sample"] = answers[:5]
        return metrics

    @staticmethod
    def line(metrics: dict[str, Any]) -> str:
        text = f"loss {metrics['loss']:.4f} perplexity {metrics['perplexity']:.2f}"
        if "accuracy" in metrics:
            text += f" accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f}"
        return text

    def summary(self) -> dict[str, Any]:
        return {
            "label_names": self.label_names,
            "truncation": {
                s: {"over_max_length": e.truncated, "completion_cut": e.completion_cut} for s, e in self.encoded.items()
            },
        }


def build_task(cfg: RunConfig, tokenizer: Any, splits: dict[str, Any], label_names: list[str] | None) -> Any:
    """The task object for ``cfg.task`` over loaded splits (tokenizing them).

    ``label_names``: the run's labels (inferred once, by the caller), or None for unlabelled
    causal-LM data.
    """
    meta = {
        "seed": cfg.seed,
        "max_length": cfg.data.max_length,
        "text_column": cfg.data.text_column,
        "label_column": cfg.data.label_column,
        "text_pair_column": cfg.data.text_pair_column,
    }
    classes = None
    if label_names is not None:
        classes = {s: encode_labels(sp, label_names, f"{cfg.dataset}, {s} split") for s, sp in splits.items()}
    if cfg.task in ("preference", "reward"):
        return _pair_task(cfg, tokenizer, splits, meta)
    if cfg.task == "grpo":
        from .grpo_task import build_grpo_task

        return build_grpo_task(cfg, tokenizer, splits, meta)
    if cfg.task == "classification":
        features = {
            s: tokenize(tokenizer, sp.texts, cfg.data.max_length, sp.pairs, cache=cfg.data.token_cache)
            for s, sp in splits.items()
        }
        return ClassificationTask(
            label_names, features, classes, tokenizer.pad_token_id, {"id2label": dict(enumerate(label_names)), **meta}
        )
    encoder = LMEncoder(tokenizer, cfg.data, label_names)
    encoded = {
        s: encoder.encode_split(sp, f"{cfg.dataset}, {s} split", classes and classes[s]) for s, sp in splits.items()
    }
    features = {s: e.features for s, e in encoded.items()}
    if cfg.data.packing:
        features["train"] = pack(features["train"], cfg.data.max_length, cfg.seed)
    meta.update(
        chat_template=encoder.chat,
        prompt_template=cfg.data.prompt_template,
        system_prompt=cfg.data.system_prompt,
        label_names=label_names,
    )
    return CausalLMTask(encoder, features, encoded, tokenizer.pad_token_id, tokenizer, meta)


def _pair_task(cfg: RunConfig, tokenizer: Any, splits: dict[str, Any], meta: dict[str, Any]) -> Any:
    """A preference or reward task over paired rows (:mod:`peftkit.pairs`)."""
    from .pairs import PairEncoder

    encoder = PairEncoder(tokenizer, cfg.data)
    chat = any(isinstance(v, list) for sp in splits.values() for v in (sp.rows[0].values() if sp.rows else ()))
    meta = {**meta, "chat_template": chat, "system_prompt": cfg.data.system_prompt, "prompt_template": None}
    if cfg.task == "reward":
        from .reward import SCORE, RewardTask, encode_reward_split

        encoded = {s: encode_reward_split(encoder, sp, f"{cfg.dataset}, {s} split") for s, sp in splits.items()}
        return RewardTask(cfg.reward, encoded, tokenizer.pad_token_id, {**meta, "id2label": {0: SCORE}})
    from .pairs import check_layout
    from .preference import PreferenceTask, Reference

    check_layout(cfg.preference.loss, {sp.kind for sp in splits.values()}, cfg.dataset)
    group = cfg.train.batch_size if cfg.preference.loss == "kto" else 0
    encoded = {s: encoder.encode_split(sp, f"{cfg.dataset}, {s} split", group) for s, sp in splits.items()}
    for s, e in encoded.items():
        if not e.features:
            raise PeftkitError(
                f"every row of the {s} split has a prompt of data.max_length {cfg.data.max_length} tokens or more",
                cfg.dataset,
                "raise data.max_length",
            )
    key = f"{cfg.model}\0{cfg.quantization}\0{cfg.train.mixed_precision}\0{cfg.preference.loss == 'kto'}"
    meta["alignment"] = cfg.preference.model_dump(mode="json", exclude={"precompute_reference"})
    return PreferenceTask(cfg.preference, encoded, tokenizer.pad_token_id, Reference(), meta, cache_key=key)
