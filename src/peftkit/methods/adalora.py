"""AdaLoRA: an SVD-shaped low-rank update whose rank budget is re-allocated during training.

Each targeted layer learns ``A`` (``r x in``), ``E`` (``r x 1``, the "singular values", starting
at zero) and ``B`` (``out x r``) and computes ``y = W x + b + s * B (E * A) dropout(x)`` with
``s = alpha / (init_r + 1e-5)``, as peft does. :class:`RankAllocator` is the training schedule
(the Injection's ``schedule``): after every optimizer step it smooths each parameter entry's
importance ``|p * grad|`` and its uncertainty, and at the steps the budget schedule says, zeroes
the least important singular values across all layers until the total rank fits the budget;
its ``penalty()`` (added to the training loss) keeps ``A``'s rows and ``B``'s columns near
orthonormal. Which ranks survive is each layer's ``rank_mask``, written as peft's
``rank_pattern``; adapter files hold only the kept ranks (peft's ``ADALORA`` layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from .base import Attached, Attachment
from .layer import DEFAULT, AdaptedLinear, AdditiveUpdate, chosen_layers, wrap_targets
from .tuner_configs import AdaLoraConfig


class AdaLoraUpdate(AdditiveUpdate):
    """One AdaLoRA adapter on one frozen linear layer (``nn.Linear``, quantized ones included, or
    ``Conv1D``): an update of rank ``r`` (``init_r`` while training, the kept ranks once loaded).

    Shapes: ``lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)``, ``lora_B`` ``(out, r)``.
    """

    def __init__(
        self, base: nn.Module, r: int, init_r: int, alpha: float, dropout: float = 0.0, kept: list[bool] | None = None
    ):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / (init_r + 1e-5)
        kw = {"device": self.device, "dtype": self.dtype}
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        mask = torch.ones(init_r, dtype=torch.bool) if kept is None else torch.tensor(kept, dtype=torch.bool)
        self.register_buffer("rank_mask", mask.to(self.device))  # which of the init_r ranks are kept

    def tensors(self) -> dict[str, torch.Tensor]:
        # the mask is not trained, but checkpoints and the best state must carry it with E
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E, "rank_mask": self.rank_mask}

    def export_state(self) -> dict[str, torch.Tensor]:
        """The file's tensors: only the kept ranks (the parameters themselves, which loading
        copies into, once the layer holds those alone or nothing was pruned)."""
        if self.r != self.rank_mask.numel() or bool(self.rank_mask.all()):
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.r == 0:
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype)) @ (self.lora_A * self.lora_E).T
        return out + (h @ self.lora_B.T * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={int(self.rank_mask.sum())}/{self.rank_mask.numel()}"


def svd_layers(model: nn.Module, adapter: str = DEFAULT) -> dict[str, AdaLoraUpdate]:
    """The AdaLoRA updates of adapter ``adapter``, by layer path."""
    return {
        name: u
        for name, m in model.named_modules()
        if isinstance(m, AdaptedLinear) and isinstance(u := m.update_of(adapter), AdaLoraUpdate)
    }


class RankAllocator:
    """AdaLoRA's training hooks (:class:`~.base.MethodHooks`) over the updates of one model."""

    def __init__(self, layers: dict[str, AdaLoraUpdate], cfg: AdaLoraConfig):
        self.cfg, self.layers = cfg, layers
        self.init_budget = sum(m.r for m in self.layers.values())
        self.target_budget = cfg.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict[str, torch.Tensor] = {}
        self.avg_unc: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": getattr(m, k) for n, m in self.layers.items() for k in ("lora_A", "lora_B", "lora_E")}

    # ---- what the trainer calls ----
    def penalty(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over layers."""
        terms = []
        for m in self.layers.values():
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based), with the gradients still in place."""
        cfg = self.cfg
        final = cfg.total_step - cfg.tfinal
        if step < final:
            self._update_importance()
            budget, due = self.budget(step)
            if due:
                self._mask_to(budget)
        elif step == final:
            self._mask_to(self.target_budget)
            self.reset()
        else:  # the final phase: the kept ranks stay as they are
            for m in self.layers.values():
                m.lora_E.masked_fill_(~m.rank_mask[:, None], 0.0)

    def budget(self, step: int) -> tuple[int, bool]:
        """The total rank allowed at ``step`` and whether ranks are re-allocated then (peft's cubic)."""
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        return int((self.init_budget - self.target_budget) * left**3 + self.target_budget), step % cfg.deltaT == 0

    def _update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, p in self._params().items():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.avg_ipt.get(key, torch.zeros_like(p)) * b1 + (1 - b1) * ipt
            self.avg_unc[key] = self.avg_unc.get(key, torch.zeros_like(p)) * b2 + (1 - b2) * (ipt - avg).abs()
            self.avg_ipt[key] = avg

    def _score(self, key: str) -> torch.Tensor:
        return self.avg_ipt[key] * self.avg_unc[key]

    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` most important singular values over all layers; zero the rest."""
        if not self.avg_ipt or self.init_budget - budget <= 0:
            return
        scores = {}
        for n in self.layers:  # a triplet's score: E's, plus A's row mean and B's column mean
            a, b, e = (self._score(f"{n}.{k}") for k in ("lora_A", "lora_B", "lora_E"))
            scores[n] = e.view(-1) + a.mean(dim=1) + b.mean(dim=0)
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        for n, m in self.layers.items():
            drop = scores[n] <= threshold
            m.lora_E.masked_fill_(drop[:, None], 0.0)
            m.rank_mask.copy_(~drop)

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {"avg_ipt": dict(self.avg_ipt), "avg_unc": dict(self.avg_unc)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        self.avg_ipt = {k: v.to(params[k]) for k, v in state.get("avg_ipt", {}).items()}
        self.avg_unc = {k: v.to(params[k]) for k, v in state.get("avg_unc", {}).items()}


def attach_adalora(model: nn.Module, cfg: AdaLoraConfig, at: Attachment) -> Attached:
    """Give the targeted linear layers adapter ``at.name``'s AdaLoRA update (at the ranks
    ``cfg.rank_pattern`` keeps, when an adapter file gave one); while ranks are still to be
    allocated, the :class:`RankAllocator` comes back as the training hooks."""
    targets = chosen_layers(model, cfg, at.modules_to_save)
    pattern = cfg.rank_pattern or {}
    for name in targets:
        kept = pattern.get(f"{name}.lora_E")
        if kept is not None and len(kept) != cfg.init_r:
            raise PeftkitError(
                f"rank_pattern for {name} has {len(kept)} entries, init_r is {cfg.init_r}",
                "adapter_config.json",
                "save the adapter again",
            )

    def make(path: str, base: nn.Module) -> AdaLoraUpdate:
        kept = pattern.get(f"{path}.lora_E")
        r = cfg.init_r if kept is None else sum(bool(k) for k in kept)
        return AdaLoraUpdate(base, r, cfg.init_r, cfg.alpha, cfg.dropout, kept)

    wrap_targets(model, targets, make, at.name, at.routing)
    # a loaded adapter's ranks are settled
    schedule = None if pattern else RankAllocator(svd_layers(model, at.name), cfg)
    return Attached(replaced=targets, schedule=schedule)
