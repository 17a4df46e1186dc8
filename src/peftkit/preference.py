"""Preference tuning of a causal LM (task ``preference``): DPO and its kin, SimPO, ORPO and KTO,
with TRL's losses and metric names.

The reference model is never a second copy of the model: it is the same base with the trained
adapter switched off (:func:`~peftkit.methods.base.adapters_disabled`), or a frozen adapter
(the SFT one) loaded beside the trained one (:func:`~peftkit.methods.base.active_adapters`).
With ``precompute_reference`` its log-probabilities are computed once, before the first step,
and kept in peftkit's cache folder.

Log-probabilities of an answer are summed over its tokens (SimPO and ORPO take their mean);
the logits are formed a chunk of answer tokens at a time, never for the whole batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .config import PreferenceConfig
from .inject import output_embedding
from .lm_loss import CHUNK_ELEMENTS, final_hidden_states
from .methods.base import active_adapters, adapters_disabled, unwrapped
from .pairs import PairsEncoded, collate_pairs, collate_unpaired

REFERENCE = "reference"  # the name of a frozen reference adapter on the trained model

#: the metrics of every loss (TRL's names); KTO reports ``kl`` and no accuracies
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def completion_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "", whole: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's log-probability of its answer tokens, summed, and how many there are; with
    ``whole``, also the summed log-probability of every token of the first ``whole`` rows,
    prompt included (ORPO's NLL), from the same forward pass.

    ``batch`` holds ``{prefix}input_ids``, ``{prefix}attention_mask`` and ``{prefix}completion_mask``
    (:func:`~peftkit.pairs.sequences`). The model runs up to its output layer once; the scored
    positions' logits are then formed a chunk at a time (recomputed in backward), so no
    ``tokens x vocabulary`` tensor of the whole batch ever exists.
    """
    ids, answer = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"][:, 1:].bool()
    hidden = final_hidden_states(model, input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"])
    hidden = hidden[:, -ids.shape[1] :]  # virtual tokens (prompt tuning) come first: not scored
    scored = answer.clone()
    if whole:
        scored[:whole] = batch[f"{prefix}attention_mask"][:whole, 1:].bool()
    per_token = _scored_logps(output_embedding(model), hidden[:, :-1][scored], ids[:, 1:][scored])
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(scored)[scored]
    zeros = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
    sums = zeros.index_add(0, rows, per_token * answer[scored])
    full = zeros.index_add(0, rows, per_token)[:whole] if whole else None
    return sums, answer.sum(1), full


def _scored_logps(
    head: nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    step = max(1, chunk_elements // head.weight.shape[0])
    pieces = []
    for s in range(0, len(targets), step):
        args = (head, states[s : s + step], targets[s : s + step])
        grad = torch.is_grad_enabled()
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if grad else _token_logps(*args))
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def _token_logps(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairOutcome:
    """One batch's per-row losses and the metrics' per-row values."""

    losses: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> one value per pair
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> one value per batch


def pair_losses(
    cfg: PreferenceConfig,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor] | None,
    chosen_nll: torch.Tensor | None = None,
) -> PairOutcome:
    """The paired losses, per pair, from summed answer log-probabilities (policy, and reference
    where the loss has one) and the answers' token counts; rewards as TRL reports them.
    ``chosen_nll`` (ORPO): the mean negative log-likelihood of the chosen rows' tokens."""
    beta = cfg.beta
    n_chosen, n_rejected = (c.clamp(min=1).to(chosen.dtype) for c in counts)
    if cfg.loss in ("simpo", "orpo"):  # no reference: the answers' mean log-probabilities
        chosen_mean, rejected_mean = chosen / n_chosen, rejected / n_rejected
        if cfg.loss == "simpo":
            logits = beta * (chosen_mean - rejected_mean) - cfg.simpo_gamma
            losses = -F.logsigmoid(logits) * (1 - cfg.label_smoothing) - F.logsigmoid(-logits) * cfg.label_smoothing
            extra = {}
        else:
            log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
            ratio = F.logsigmoid(log_odds)
            assert chosen_nll is not None
            nll = chosen_nll
            losses = nll - beta * ratio
            extra = {
                "nll_loss": nll.detach(),
                "log_odds_ratio": ratio.detach().mean(),
                "log_odds_chosen": log_odds.detach().mean(),
            }
        c_rew, r_rew = beta * chosen_mean.detach(), beta * rejected_mean.detach()
        values = {"logps/chosen": chosen_mean.detach(), "logps/rejected": rejected_mean.detach()}
        return PairOutcome(losses, {**values, **_rewards(c_rew, r_rew)}, extra)
    assert ref is not None
    c_ratio, r_ratio = chosen - ref[0], rejected - ref[1]
    delta = c_ratio - r_ratio
    if cfg.loss == "dpo":
        losses = -F.logsigmoid(beta * delta)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif cfg.loss == "ipo":  # per-token log-ratios, as the IPO authors normalise them
        losses = (c_ratio / n_chosen - r_ratio / n_rejected - 1 / (2 * beta)) ** 2
    else:  # robust: unbiased under a label_smoothing share of flipped pairs
        eps = cfg.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    values = {"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
    return PairOutcome(losses, {**values, **_rewards(beta * c_ratio.detach(), beta * r_ratio.detach())})


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
    }


def kto_losses(
    cfg: PreferenceConfig,
    logps: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO's loss over a batch of single answers (``labels`` true: desirable) and its metrics;
    the KL term is estimated from the batch's mismatched prompt/answer rows, as TRL does."""
    kl = torch.zeros((), device=logps.device)
    if kl_logps is not None and ref_kl_logps is not None:
        kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref
    desirable, undesirable = ratio[labels], ratio[~labels]
    losses = torch.cat(
        [
            cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (desirable - kl))),
            cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - undesirable))),
        ]
    )
    metrics = {"kl": float(kl)}
    if labels.any():
        metrics["rewards/chosen"] = float(cfg.beta * desirable.detach().mean())
        metrics["logps/chosen"] = float(logps[labels].detach().mean())
    if (~labels).any():
        metrics["rewards/rejected"] = float(cfg.beta * undesirable.detach().mean())
        metrics["logps/rejected"] = float(logps[~labels].detach().mean())
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


class Reference:
    """Runs the reference model: the same base with the trained adapter off, or with the frozen
    adapter ``reference`` on in its place."""

    def __init__(self, adapter: str | None = None):
        self.adapter = adapter  # the reference adapter's folder, or None: the base

    def describe(self) -> str:
        return f"the adapter {self.adapter} (frozen)" if self.adapter else "the base model (adapter disabled)"

    def using(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return active_adapters(model, REFERENCE) if self.adapter else adapters_disabled(model)

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        inner = unwrapped(model)  # a data-parallel wrapper's forward is a collective: not for this
        with self.using(inner):
            return completion_logps(inner, batch, prefix)[0]


@dataclass
class PreferenceTask:
    """Preference pairs (or KTO rows) for a causal LM; see the module docstring."""

    name: ClassVar[str] = "causal_lm"  # what the adapter is: a causal-LM adapter, used as any other
    cfg: PreferenceConfig
    encoded: dict[str, PairsEncoded]
    pad_id: int
    reference: Reference
    meta: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""  # what the precomputed reference log-probabilities depend on, besides the model
    last_metrics: dict[str, float] = field(default_factory=dict)
    precomputed: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> (rows, 1 or 2 or 3)

    @property
    def features(self) -> dict[str, list[dict[str, Any]]]:
        return {s: e.features for s, e in self.encoded.items()}

    @property
    def paired(self) -> bool:
        return self.cfg.loss != "kto"

    def describe(self) -> str:
        unit = "pairs" if self.paired else "answers"
        parts = ", ".join(f"{s} {len(e.features)}" for s, e in self.encoded.items())
        cut = "; ".join(
            f"{s}: {e.truncated} cut to max_length, {e.dropped} dropped (prompt fills max_length)"
            for s, e in self.encoded.items()
            if e.truncated or e.dropped
        )
        against = f"reference {self.reference.describe()}" if self.cfg.uses_reference else "no reference"
        return f"{parts} {unit}; loss {self.cfg.loss}, beta {self.cfg.beta}, {against}" + (f"; {cut}" if cut else "")

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._collate("train", indices)

    def _collate(self, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of ``split`` as a batch; ``index`` and ``split`` (its position among
        the splits) find their precomputed reference log-probabilities."""
        feats = self.encoded[split].features
        collate = collate_pairs if self.paired else collate_unpaired
        batch = collate([feats[i] for i in indices], self.pad_id, indices)
        batch["split"] = torch.tensor(list(self.encoded).index(split))
        return batch

    # ---- the reference ----
    def start(self, model: nn.Module, device: Any, autocast: Callable[[], Any], say: Callable[[str], None]) -> None:
        """Before the first step: turn dropout off (TRL's default) and, when asked, compute the
        reference log-probabilities of every split (or read them from the cache)."""
        if self.cfg.disable_dropout:
            for module in list(unwrapped(model).modules()):
                for child_name, child in module.named_children():
                    if isinstance(child, nn.Dropout):
                        setattr(module, child_name, nn.Identity())
        if not (self.cfg.precompute_reference and self.cfg.uses_reference):
            return
        from . import fsio

        folder = fsio.cache_dir() / "reference"
        for split, enc in self.encoded.items():
            key = hashlib.sha256(f"{self.cache_key}\0{split}\0{_features_digest(enc.features)}".encode()).hexdigest()
            path = folder / f"{key[:32]}.pt"
            cached = _read_tensor(path, len(enc.features))
            if cached is None:
                say(f"precomputing reference log-probabilities: {split}, {len(enc.features)} rows")
                cached = self._reference_table(model, split, device, autocast)
                _write_tensor(path, cached)
            else:
                say(f"reference log-probabilities of {split}: from the cache ({path.name})")
            self.precomputed[split] = cached

    def _reference_table(self, model: nn.Module, split: str, device: Any, autocast: Callable[[], Any]) -> torch.Tensor:
        was = model.training
        model.eval()
        rows = []
        n = len(self.encoded[split].features)
        step = 8
        for s in range(0, n, step):
            batch = {k: v.to(device) for k, v in self._collate(split, list(range(s, min(n, s + step)))).items()}
            with autocast():
                rows.append(self._reference_now(model, batch).float().cpu())
        model.train(was)
        return torch.cat(rows)

    def _reference_now(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's log-probabilities of a batch: ``(pairs, 2)`` chosen and rejected, or
        ``(rows, 2)`` answer and KL row for KTO."""
        logps = self.reference.logps(model, batch)
        if self.paired:
            return torch.stack(logps.chunk(2), dim=1)
        kl = self.reference.logps(model, batch, "kl_") if "kl_input_ids" in batch else torch.zeros_like(logps)
        return torch.stack([logps, kl], dim=1)

    def _reference(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        split = list(self.encoded)[int(batch["split"])]
        if split in self.precomputed:
            return self.precomputed[split][batch["index"].cpu()].to(batch["input_ids"].device)
        return self._reference_now(model, batch)

    # ---- loss and metrics ----
    def outcome(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch's loss (a graph) and metrics: per-pair tensors under their names, and
        per-batch scalars."""
        # the reference (and KTO's KL rows) first, without a graph: their activations are gone
        # before the policy's, which backward needs, are built
        ref = self._reference(model, batch) if self.cfg.uses_reference else None
        kl = None
        if not self.paired and "kl_input_ids" in batch:
            with torch.no_grad():
                kl = completion_logps(model, batch, "kl_")[0]
        pairs = batch["input_ids"].shape[0] // 2
        orpo = self.cfg.loss == "orpo"  # its NLL term: prompt and chosen answer, every token (TRL's)
        logps, counts, whole = completion_logps(model, batch, whole=pairs if orpo else 0)
        if not self.paired:
            assert ref is not None
            return kto_losses(self.cfg, logps, ref[:, 0], batch["label"], kl, ref[:, 1])
        chosen, rejected = logps.chunk(2)
        nll = None
        if whole is not None:
            nll = -whole.sum() / (batch["attention_mask"][:pairs, 1:].sum())
        pair_ref = (ref[:, 0], ref[:, 1]) if ref is not None else None
        result = pair_losses(self.cfg, chosen, rejected, counts.chunk(2), pair_ref, nll)
        return result.losses.mean(), {**result.values, **result.extra}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, metrics = self.outcome(model, batch)
        self.last_metrics = {k: float(v.float().mean()) for k, v in _tensors(metrics).items()}
        return loss

    def best_metric(self, wanted: str) -> str:
        if wanted in ("accuracy", "f1"):
            wanted = "rewards/accuracies"
        if wanted == "rewards/accuracies" and not self.paired:
            return "rewards/margins"  # KTO has no pairs to rank
        return wanted

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
        """Loss and TRL's metrics over the split in batches of ``batch_size``: longest rows first
        where every metric is a mean over rows, in the split's order where a term is per batch
        (KTO's KL, ORPO's NLL), as TRL computes them. Every process computes the whole split."""
        inner = unwrapped(model)
        was = inner.training
        inner.eval()
        feats = self.encoded[split].features
        n = len(feats)
        order = list(range(n))
        if self.paired and self.cfg.loss != "orpo":  # per-row metrics: batches of similar lengths pad least
            order.sort(key=lambda i: -len(feats[i]["input_ids"]))
        per_row: dict[str, list[torch.Tensor]] = {}
        per_batch: dict[str, list[float]] = {}
        weights: list[int] = []
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            batch = {k: v.to(device) for k, v in self._collate(split, idx).items()}
            loss, metrics = self.outcome(inner, batch)
            weights.append(len(idx))
            per_batch.setdefault("loss", []).append(float(loss))
            for k, v in metrics.items():
                if isinstance(v, torch.Tensor) and v.dim() == 1:
                    per_row.setdefault(k, []).append(v.float().cpu())
                else:
                    per_batch.setdefault(k, []).append(float(v))
        inner.train(was)
        out: dict[str, Any] = {"n": n}
        total = sum(weights)
        out["loss"] = sum(w * x for w, x in zip(weights, per_batch.pop("loss"))) / total
        for k, values in per_row.items():
            out[k] = float(torch.cat(values).mean())
        for k, values in per_batch.items():
            out[k] = sum(values) / len(values)
        return out

    def line(self, metrics: dict[str, Any]) -> str:
        text = f"loss {metrics['loss']:.4f}"
        for key in ("rewards/accuracies", "rewards/margins", "kl"):
            if key in metrics:
                text += f" {key} {metrics[key]:.4f}"
        return text

    def summary(self) -> dict[str, Any]:
        return {
            "preference": self.cfg.model_dump(mode="json"),
            "truncation": {
                s: {"over_max_length": e.truncated, "prompt_fills_max_length": e.dropped}
                for s, e in self.encoded.items()
            },
        }


def _tensors(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in metrics.items()}


def folder_digest(folder: Any) -> str:
    """A digest of every file of an adapter folder (what a cached reference depends on)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _features_digest(features: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for f in features:
        for key in sorted(f):
            h.update(f"{key}:{f[key]}\0".encode())
    return h.hexdigest()


def _read_tensor(path: Any, rows: int) -> torch.Tensor | None:
    try:
        table = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    return table if isinstance(table, torch.Tensor) and table.shape[0] == rows else None


def _write_tensor(path: Any, table: torch.Tensor) -> None:
    from .fsio import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(table, tmp)
    except OSError:
        pass
